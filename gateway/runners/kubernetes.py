"""Runs jobs in a cluster: each submitted job becomes a TranscriptionJob for the operator."""

from __future__ import annotations

import logging

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from transcription import resources
from transcription.errors import ClusterUnavailable
from transcription.kubeclient import api_client, pod_namespace
from transcription.lifecycle import Lifecycle

log = logging.getLogger(__name__)

#: What a refused submission tells the client to wait: API servers come back within seconds
#: from a restart, or take minutes when the control plane is being upgraded.
RETRY_AFTER_SECONDS = 30


class KubernetesJobRunner:
    """Creates a TranscriptionJob per job and deletes it on cancellation; the operator does the
    rest. Each API call gives up after ``timeout`` seconds; call it off the event loop."""

    def __init__(
        self,
        lc: Lifecycle,
        *,
        namespace: str | None = None,
        api: client.ApiClient | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.lc = lc
        self.timeout = timeout
        self._namespace = namespace
        self._api = api
        self._custom: client.CustomObjectsApi | None = None

    @property
    def namespace(self) -> str:
        return self._namespace or "default"

    def start(self) -> None:
        if self._api is None:
            # Without urllib3's own retries, ``timeout`` bounds a whole call: an address that
            # drops packets would otherwise be tried four times over.
            self._api = api_client(retries=False)
        self._namespace = self._namespace or pod_namespace()
        self._custom = client.CustomObjectsApi(self._api)

    def stop(self) -> None:
        if self._api is not None:
            self._api.close()

    def readiness(self) -> str:
        return "ok" if self._custom is not None else "starting"

    def submit(self, job_id: str) -> None:
        """Create the job's TranscriptionJob, or raise ``ClusterUnavailable`` if the API server
        cannot be reached, does not answer in time or refuses it (the caller refunds the job).
        One that exists already (a retried request, or the operator came first) counts."""
        assert self._custom is not None, "start() the runner first"
        job = self.lc.get(job_id)
        body = resources.transcription_job(
            job_id=job_id,
            namespace=self.namespace,
            spec=resources.TranscriptionJobSpec.of(job),
            submitted_at=job.created_at,
        )
        try:
            self._custom.create_namespaced_custom_object(
                resources.GROUP,
                resources.VERSION,
                self.namespace,
                resources.TJ_PLURAL,
                body,
                _request_timeout=self.timeout,
            )
        except ApiException as exc:
            if exc.status == 409:
                return
            log.warning(
                "could not create TranscriptionJob %s (%s)",
                job_id,
                exc.reason,
                extra={"job_id": job_id},
            )
            raise self._unavailable() from exc
        except Exception as exc:
            # urllib3's errors: refused, unreachable, or no answer within the timeout.
            log.warning(
                "could not create TranscriptionJob %s (%s)", job_id, exc, extra={"job_id": job_id}
            )
            raise self._unavailable() from exc

    def _unavailable(self) -> ClusterUnavailable:
        return ClusterUnavailable(
            "The cluster could not take the job right now; it was cancelled and its credit "
            f"refunded. Try again in {RETRY_AFTER_SECONDS} s.",
            retry_after=RETRY_AFTER_SECONDS,
        )

    def cancel(self, job_id: str) -> None:
        """Delete the TranscriptionJob; the operator's finalizer stops its Job. The cancel is
        already durable in the database, so if this fails the operator's reconciliation still
        stops the Job and reports the final phase."""
        assert self._custom is not None, "start() the runner first"
        try:
            self._custom.delete_namespaced_custom_object(
                resources.GROUP,
                resources.VERSION,
                self.namespace,
                resources.TJ_PLURAL,
                resources.resource_name(job_id),
                _request_timeout=self.timeout,
            )
        except ApiException as exc:
            if exc.status != 404:
                log.warning(
                    "could not delete TranscriptionJob %s (%s)",
                    job_id,
                    exc.reason,
                    extra={"job_id": job_id},
                )
        except Exception:
            log.warning(
                "could not delete TranscriptionJob %s",
                job_id,
                exc_info=True,
                extra={"job_id": job_id},
            )
