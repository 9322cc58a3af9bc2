"""Runs jobs in a cluster: each submitted job becomes a TranscriptionJob for the operator."""

from __future__ import annotations

import logging

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from transcription import resources
from transcription.kubeclient import api_client, pod_namespace
from transcription.lifecycle import Lifecycle

log = logging.getLogger(__name__)


class KubernetesJobRunner:
    """Creates a TranscriptionJob per job and deletes it on cancellation; the operator does the rest."""

    def __init__(
        self, lc: Lifecycle, *, namespace: str | None = None, api: client.ApiClient | None = None
    ) -> None:
        self.lc = lc
        self._namespace = namespace
        self._api = api
        self._custom: client.CustomObjectsApi | None = None

    @property
    def namespace(self) -> str:
        return self._namespace or "default"

    def start(self) -> None:
        if self._api is None:
            self._api = api_client()
        self._namespace = self._namespace or pod_namespace()
        self._custom = client.CustomObjectsApi(self._api)

    def stop(self) -> None:
        if self._api is not None:
            self._api.close()

    def readiness(self) -> str:
        return "ok" if self._custom is not None else "starting"

    def submit(self, job_id: str) -> None:
        """Create the job's TranscriptionJob. If that fails (or this process dies first), the
        operator's reconciliation creates it from the database, so a failure here is logged,
        not fatal: the job stays queued with its credit held until it runs."""
        assert self._custom is not None, "start() the runner first"
        try:
            job = self.lc.get(job_id)
            body = resources.transcription_job(
                job_id=job_id,
                namespace=self.namespace,
                spec=resources.TranscriptionJobSpec.of(job),
                submitted_at=job.created_at,
            )
            self._custom.create_namespaced_custom_object(
                resources.GROUP, resources.VERSION, self.namespace, resources.TJ_PLURAL, body
            )
        except ApiException as exc:
            if exc.status != 409:  # 409: submitted before (a retried request), same job
                log.warning(
                    "could not create TranscriptionJob %s (%s); the operator will",
                    job_id,
                    exc.reason,
                )
        except Exception:
            log.warning(
                "could not create TranscriptionJob %s; the operator will", job_id, exc_info=True
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
            )
        except ApiException as exc:
            if exc.status != 404:
                log.warning("could not delete TranscriptionJob %s (%s)", job_id, exc.reason)
        except Exception:
            log.warning("could not delete TranscriptionJob %s", job_id, exc_info=True)
