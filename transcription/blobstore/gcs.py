"""Blob store on a Google Cloud Storage bucket; import it only when a gs:// URL is opened."""

from __future__ import annotations

import io
import mimetypes
import os
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO, cast

from google.api_core.exceptions import NotFound
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY

from transcription.blobstore.base import BlobNotFound, check_key, check_prefix
from transcription.blobstore.local import atomic_writer

# Uploads and BlobReader hold about three chunks at once (the library keeps the previous chunk's
# request alive while reading the next); its defaults (100 MiB up, 40 MiB down) would hold a
# whole hour of audio. Must be a multiple of 256 KiB.
CHUNK_SIZE = 4 * 1024 * 1024


def _make_client() -> storage.Client:
    # project=None: blob operations need no project, and inferring one can fail off GCP.
    project = os.environ.get("GOOGLE_CLOUD_PROJECT")
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        # The emulator ignores auth; anonymous credentials skip the Application Default
        # Credentials lookup, which is slow or fails on a developer machine.
        return storage.Client(project=project or "emulator", credentials=AnonymousCredentials())
    return storage.Client(project=project)


class GCSBlobStore:
    """Blobs as objects named ``prefix/key`` in one bucket, through one shared client."""

    def __init__(self, bucket: str, prefix: str = "") -> None:
        if not bucket:
            raise ValueError("GCS blob store needs a bucket name")
        self.bucket_name = bucket
        self.prefix = check_prefix(prefix.strip("/"))
        # The client is thread-safe (requests over urllib3's pool); Blob objects are not, so
        # every call makes its own.
        self._client = _make_client()
        self._bucket = self._client.bucket(bucket)

    def _name(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _blob(self, key: str) -> storage.Blob:
        return self._bucket.blob(self._name(key))

    def _upload_blob(self, key: str) -> storage.Blob:
        # Only uploads get a chunk size: with one, downloads become a range request per chunk
        # instead of one streamed GET (and ranged reads of empty objects trip the emulator).
        return self._bucket.blob(self._name(key), chunk_size=CHUNK_SIZE)

    def _list_prefix(self, prefix: str) -> str:
        full = "/".join(part for part in (self.prefix, check_prefix(prefix)) if part)
        return f"{full}/" if full else ""

    def _not_found(self, key: str) -> BlobNotFound:
        return BlobNotFound(key, self.uri(key))

    def uri(self, key: str) -> str:
        return f"gs://{self.bucket_name}/{self._name(key)}"

    def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> str:
        self._upload_blob(key).upload_from_filename(
            str(path), content_type=content_type or _guess_type(key)
        )
        return self.uri(key)

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> str:
        self._upload_blob(key).upload_from_string(
            data, content_type=content_type or _guess_type(key)
        )
        return self.uri(key)

    def open(self, key: str) -> BinaryIO:
        blob = self._bucket.get_blob(self._name(key))
        if blob is None:
            raise self._not_found(key)
        if blob.size == 0:
            # An empty object has no byte range to request.
            return io.BytesIO()
        # Pinning the generation makes a concurrent overwrite fail the read instead of
        # splicing two versions together.
        reader = blob.open("rb", chunk_size=CHUNK_SIZE, if_generation_match=blob.generation)
        return cast(BinaryIO, reader)

    def get_bytes(self, key: str) -> bytes:
        try:
            return cast(bytes, self._blob(key).download_as_bytes())
        except NotFound:
            raise self._not_found(key) from None

    def download(self, key: str, dest: Path) -> None:
        try:
            with atomic_writer(dest) as f:
                self._blob(key).download_to_file(f)
        except NotFound:
            raise self._not_found(key) from None

    def local_path(self, key: str) -> None:
        check_key(key)
        return None

    def exists(self, key: str) -> bool:
        return bool(self._blob(key).exists())

    def delete(self, key: str) -> None:
        # Deleting is idempotent here, so it is safe to retry unconditionally.
        with suppress(NotFound):
            self._blob(key).delete(retry=DEFAULT_RETRY)

    def delete_prefix(self, prefix: str) -> int:
        deleted = 0
        for blob in list(self._client.list_blobs(self._bucket, prefix=self._list_prefix(prefix))):
            with suppress(NotFound):
                blob.delete(retry=DEFAULT_RETRY)
                deleted += 1
        return deleted

    def list(self, prefix: str) -> list[str]:
        start = len(self.prefix) + 1 if self.prefix else 0
        blobs = self._client.list_blobs(
            self._bucket, prefix=self._list_prefix(prefix), fields="items(name),nextPageToken"
        )
        # Names ending in "/" are folder placeholders made by the console, not blobs.
        return sorted(blob.name[start:] for blob in blobs if not blob.name.endswith("/"))


def _guess_type(key: str) -> str | None:
    return mimetypes.guess_type(key)[0]
