"""One server per data directory: an advisory lock that names the process holding it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE_NAME = "serve.lock"


class DataDirInUse(RuntimeError):
    """Another process serves this data directory."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(
            f"The data directory {path} is in use by {holder}; stop it or choose another "
            "directory (--data-dir or WHISPER_DATA_DIR)."
        )
        self.path = path
        self.holder = holder


class DataDirLock:
    """Held for the life of the process (the kernel drops it when the process dies, however it
    dies), so a crashed server never leaves a stale lock behind."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir.absolute() / LOCK_FILE_NAME
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise DataDirInUse(self.path.parent, holder or "another process") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
