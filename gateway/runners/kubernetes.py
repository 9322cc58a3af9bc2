"""Runs jobs in a cluster: each submitted job becomes a TranscriptionJob for the operator."""

from __future__ import annotations

import logging

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from transcription import resources
from transcription.kubeclient import api_client, pod_namespace
from transcription.lifecycle import Lifecycle

log = logging.getLogger(__name__)

PLURAL = "transcriptionjobs"


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
        assert self._custom is not None, "start() the runner first"
        job = self.lc.get(job_id)
        spec = resources.TranscriptionJobSpec(
            audio_key=job.audio_key,
            audio_seconds=job.audio_seconds,
            code_id=job.code_id,
            engine="openai" if job.engine == "openai" else "local",
            model=job.model,
            mode="accurate" if job.mode == "accurate" else "fast",
            language=job.language,
            prompt=job.prompt,
        )
        body = resources.transcription_job(
            job_id=job_id, namespace=self.namespace, spec=spec, submitted_at=job.created_at
        )
        try:
            self._custom.create_namespaced_custom_object(
                resources.GROUP, resources.VERSION, self.namespace, PLURAL, body
            )
        except ApiException as exc:
            if exc.status == 409:  # submitted before (a retried request): same job
                return
            log.error("the cluster refused TranscriptionJob %s: %s", job_id, exc.reason)
            self.lc.fail(
                job_id,
                code="runner_unavailable",
                message="The cluster did not accept the job; the credit was refunded.",
            )

    def cancel(self, job_id: str) -> None:
        """Delete the TranscriptionJob; the operator's finalizer stops its Job."""
        assert self._custom is not None, "start() the runner first"
        try:
            self._custom.delete_namespaced_custom_object(
                resources.GROUP,
                resources.VERSION,
                self.namespace,
                PLURAL,
                resources.resource_name(job_id),
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
