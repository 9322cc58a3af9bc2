"""Everything the gateway's routes need, built once per app in its lifespan."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.jobwatch import JobNotifier
from gateway.ratelimit import FailedAuthLimiter
from gateway.runners import JobRunner
from gateway.uploads import UploadSlots
from transcription.blobstore import BlobStore
from transcription.db.session import Database
from transcription.lifecycle import Lifecycle
from transcription.settings import GatewaySettings


@dataclass
class Services:
    settings: GatewaySettings
    db: Database
    blobs: BlobStore
    lifecycle: Lifecycle
    notifier: JobNotifier
    runner: JobRunner
    code_key: bytes
    engine_name: str
    model_name: str | None
    uploads: UploadSlots
    auth_limiter: FailedAuthLimiter

    @property
    def upload_dir(self) -> Path:
        return self.settings.data_dir / "uploads"
