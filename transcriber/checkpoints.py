"""Checkpoints of a running job kept in the blob store, next to its audio, so that a worker that
dies mid-job leaves its finished parts behind for the next attempt."""

from __future__ import annotations

from transcription.blobstore import BlobNotFound, BlobStore


class BlobCheckpoints:
    """The ``Checkpoints`` of one job, as blobs under ``prefix``."""

    def __init__(self, blobs: BlobStore, prefix: str) -> None:
        self.blobs = blobs
        self.prefix = prefix

    def load(self, name: str) -> bytes | None:
        try:
            return self.blobs.get_bytes(f"{self.prefix}/{name}")
        except BlobNotFound:
            return None

    def save(self, name: str, data: bytes) -> None:
        self.blobs.put_bytes(f"{self.prefix}/{name}", data, content_type="application/json")
