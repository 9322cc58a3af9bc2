"""The blob store protocol, its not-found error, and the key rules every store enforces."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable


class BlobNotFound(KeyError):
    """No blob is stored under the key."""

    def __init__(self, key: str, uri: str | None = None) -> None:
        super().__init__(key)
        self.key = key
        self.uri = uri or key

    def __str__(self) -> str:
        return f"no blob at {self.uri}"


@runtime_checkable
class BlobStore(Protocol):
    """Blobs addressed by relative POSIX keys such as ``jobs/tr_abc/audio.mp3``; safe to share
    between threads."""

    def uri(self, key: str) -> str:
        """The blob's address: ``file:///abs/path/key`` or ``gs://bucket/prefix/key``."""

    def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> str:
        """Store the file at ``path``, streaming it from disk; return the blob's URI."""

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> str:
        """Store ``data``; return the blob's URI."""

    def open(self, key: str) -> AbstractContextManager[BinaryIO]:
        """Open the blob for streaming reads."""

    def get_bytes(self, key: str) -> bytes:
        """The whole blob in memory."""

    def download(self, key: str, dest: Path) -> None:
        """Copy the blob to ``dest``, which is replaced atomically."""

    def local_path(self, key: str) -> Path | None:
        """The blob's own file for zero-copy readers, or None when the store has no local files."""

    def exists(self, key: str) -> bool:
        """Whether a blob is stored under ``key``."""

    def delete(self, key: str) -> None:
        """Remove the blob; a missing key is not an error."""

    def delete_prefix(self, prefix: str) -> int:
        """Remove every blob under the directory-like ``prefix`` (``""`` is all); return the
        count."""

    def list(self, prefix: str) -> list[str]:
        """Sorted keys under the directory-like ``prefix``: ``"jobs/a"`` matches ``jobs/a/x`` but
        not ``jobs/ab``; ``""`` lists everything."""


def check_key(key: str) -> str:
    """Return ``key`` unchanged if it is a relative POSIX path that cannot leave the store's root,
    else raise ValueError."""
    if not isinstance(key, str) or not key:
        raise ValueError("blob key must be a non-empty string")
    if key.startswith("/"):
        raise ValueError(f"blob key {key!r} must be relative, not absolute")
    if "\\" in key or any(ord(c) < 32 or c == "\x7f" for c in key):
        raise ValueError(f"blob key {key!r} must not contain backslashes or control characters")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"blob key {key!r} must not contain empty, '.' or '..' segments")
    return key


def check_prefix(prefix: str) -> str:
    """Validate a directory-like prefix and return it without a trailing slash (``""`` for all)."""
    if prefix == "":
        return ""
    return check_key(prefix.removesuffix("/"))
