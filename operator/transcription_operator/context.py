"""What the handlers share: settings, the database, the ledger key and Kubernetes clients."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from transcription import resources
from transcription.blobstore import BlobStore, open_blob_store
from transcription.db.session import Database
from transcription.jobfiles import JobFiles
from transcription.kubeclient import api_client
from transcription.lifecycle import Lifecycle
from transcription.settings import OperatorSettings
from transcription_operator import builders

log = logging.getLogger(__name__)


@dataclass
class Context:
    settings: OperatorSettings
    db: Database
    lifecycle: Lifecycle
    files: JobFiles
    code_key: bytes
    core: client.CoreV1Api
    batch: client.BatchV1Api
    custom: client.CustomObjectsApi

    @classmethod
    def build(cls, settings: OperatorSettings) -> Context:
        db = Database(settings.resolved_database_url())
        blobs: BlobStore = open_blob_store(settings.resolved_blob_url())
        api = api_client()
        lifecycle = Lifecycle(db, blobs)
        return cls(
            settings=settings,
            db=db,
            lifecycle=lifecycle,
            files=lifecycle.files,
            code_key=settings.code_key(),
            core=client.CoreV1Api(api),
            batch=client.BatchV1Api(api),
            custom=client.CustomObjectsApi(api),
        )

    def close(self) -> None:
        self.db.dispose()
        self.core.api_client.close()

    def patch_status(
        self,
        plural: str,
        namespace: str,
        name: str,
        status: dict[str, Any],
        *,
        resource_version: str | None = None,
    ) -> bool:
        """Merge ``status`` into the resource's status; with ``resource_version``, only if the
        object is still at that version. False when it changed meanwhile or is gone."""
        body: dict[str, Any] = {"status": status}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            self.custom.patch_namespaced_custom_object_status(
                resources.GROUP,
                resources.VERSION,
                namespace,
                plural,
                name,
                body,
                _content_type="application/merge-patch+json",
            )
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    def patch_tj_status(self, tj: dict[str, Any], status: dict[str, Any]) -> bool:
        """Merge ``status`` into the TranscriptionJob only if it is still the version read, so
        news written meanwhile (by another step) is never overwritten with older news."""
        meta = tj["metadata"]
        return self.patch_status(
            resources.TJ_PLURAL,
            meta["namespace"],
            meta["name"],
            status,
            resource_version=meta["resourceVersion"],
        )

    def post_event(
        self, involved: dict[str, Any], reason: str, message: str, *, warning: bool = False
    ) -> None:
        body = builders.event(
            involved, reason=reason, message=message, now=datetime.now(UTC), warning=warning
        )
        try:
            self.core.create_namespaced_event(
                involved["metadata"]["namespace"],
                body,  # type: ignore[arg-type]
            )
        except ApiException:
            # Events are a courtesy to humans; losing one must not fail the reconciliation.
            log.warning("could not post event %s on %s", reason, involved["metadata"]["name"])
