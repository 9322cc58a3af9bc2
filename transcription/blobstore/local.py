"""Blob store on a local directory, with atomic, durable writes and private permissions."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from transcription.blobstore.base import BlobNotFound, check_key, check_prefix

# Temp files share the target's directory so os.replace stays a same-filesystem rename; the
# reserved prefix keeps them out of list() and out of the key space.
_TEMP_PREFIX = ".blobtmp-"
_COPY_BUFFER = 1024 * 1024
_NOT_A_FILE = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing ancestors with mode 0o700, durably."""
    missing: list[Path] = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue
        _fsync_dir(directory.parent)


@contextmanager
def atomic_writer(dest: Path) -> Iterator[BinaryIO]:
    """Yield a private (0o600) temp file that atomically and durably replaces ``dest`` when the
    block succeeds, and vanishes when it fails."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=_TEMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(dest.parent)


class LocalBlobStore:
    """Blobs as files under ``root``; readers may use the files in place via ``local_path``."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        make_private_dirs(self.root)

    def _path(self, key: str) -> Path:
        parts = check_key(key).split("/")
        if any(part.startswith(_TEMP_PREFIX) for part in parts):
            raise ValueError(f"blob key {key!r} uses the reserved prefix {_TEMP_PREFIX!r}")
        return self.root.joinpath(*parts)

    @contextmanager
    def _writer(self, key: str) -> Iterator[BinaryIO]:
        path = self._path(key)
        make_private_dirs(path.parent)
        with atomic_writer(path) as f:
            yield f

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> str:
        """Store ``path``; a private file on the store's filesystem is hard-linked, not copied,
        so the caller must not change it afterwards (deleting it is fine)."""
        if stat.S_IMODE(path.stat().st_mode) & 0o077 == 0 and self._link(path, self._path(key)):
            return self.uri(key)
        with path.open("rb") as src, self._writer(key) as dst:
            shutil.copyfileobj(src, dst, _COPY_BUFFER)
        return self.uri(key)

    def _link(self, src: Path, dest: Path) -> bool:
        """Atomically and durably put a hard link to ``src`` at ``dest``; False when ``src`` is
        on another filesystem (or links are not supported), with nothing left behind."""
        make_private_dirs(dest.parent)
        tmp = dest.parent / f"{_TEMP_PREFIX}{secrets.token_hex(8)}"
        try:
            os.link(src, tmp)
        except OSError:
            return False
        try:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, dest)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(dest.parent)
        return True

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> str:
        with self._writer(key) as dst:
            dst.write(data)
        return self.uri(key)

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return path.open("rb")
        except _NOT_A_FILE:
            raise BlobNotFound(key, path.as_uri()) from None

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def download(self, key: str, dest: Path) -> None:
        with self.open(key) as src, atomic_writer(dest) as dst:
            shutil.copyfileobj(src, dst, _COPY_BUFFER)

    def local_path(self, key: str) -> Path:
        """The blob's file; it may not exist, so a reader must still handle a missing file."""
        return self._path(key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        with suppress(*_NOT_A_FILE):
            self._path(key).unlink()

    def delete_prefix(self, prefix: str) -> int:
        deleted = 0
        for key in self.list(prefix):
            with suppress(FileNotFoundError):
                self.root.joinpath(key).unlink()
                deleted += 1
        base = self._base(prefix)
        # Prune emptied directories under the prefix only: ancestors may be shared with blobs
        # that other threads are writing.
        for dirpath, _, _ in os.walk(base, topdown=False):
            if Path(dirpath) != self.root:
                with suppress(OSError):
                    os.rmdir(dirpath)
        return deleted

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        for dirpath, _, filenames in os.walk(self._base(prefix)):
            rel = Path(dirpath).relative_to(self.root)
            keys.extend(
                (rel / name).as_posix() for name in filenames if not name.startswith(_TEMP_PREFIX)
            )
        return sorted(keys)

    def _base(self, prefix: str) -> Path:
        prefix = check_prefix(prefix)
        return self._path(prefix) if prefix else self.root
