"""Blob stores: a local directory (embedded) or a GCS bucket (cluster), behind one protocol."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from transcription.blobstore.base import BlobNotFound, BlobStore
from transcription.blobstore.local import LocalBlobStore

__all__ = ["BlobNotFound", "BlobStore", "LocalBlobStore", "open_blob_store"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_FORMS = "use file:///absolute/dir, a directory path, or gs://bucket[/prefix]"


def open_blob_store(url: str) -> BlobStore:
    """Open the store at ``url``: ``file:///abs/dir``, a plain directory path, or
    ``gs://bucket[/prefix]``."""
    if not url:
        raise ValueError(f"blob store URL is empty; {_FORMS}")
    match = _SCHEME.match(url)
    if match is None:
        return LocalBlobStore(Path(url))
    scheme = match.group(1).lower()
    if scheme == "file":
        parts = urlsplit(url)
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise ValueError(f"blob store URL {url!r} must name an absolute local path; {_FORMS}")
        return LocalBlobStore(Path(path))
    if scheme == "gs":
        rest = url[len(match.group(0)) :]
        bucket, _, prefix = rest.removeprefix("//").partition("/")
        if not rest.startswith("//") or not bucket:
            raise ValueError(f"blob store URL {url!r} has no bucket; {_FORMS}")
        try:
            # Deferred so installs without the gcs extra never import google.cloud.storage.
            from transcription.blobstore.gcs import GCSBlobStore
        except ImportError as exc:
            if not (exc.name or "").startswith("google"):
                raise
            raise ImportError(
                f"{url!r} needs google-cloud-storage: "
                "pip install 'whisper-transcription-service[gcs]'"
            ) from exc
        return GCSBlobStore(bucket, prefix)
    raise ValueError(f"unsupported blob store URL scheme {scheme!r} in {url!r}; {_FORMS}")
