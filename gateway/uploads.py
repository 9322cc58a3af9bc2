"""Streams a multipart upload straight to a named temporary file, hashing and size-capping it.

Starlette's form parser spools files into anonymous temporary files and parses the whole body
before the handler runs; audio probing needs a real path and oversize uploads should stop early.
Uploads in flight are capped per code and in total, since each holds a connection and disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from transcription import metrics
from transcription.errors import (
    DomainError,
    InvalidRequest,
    TooManyUploads,
    UploadTimeout,
    UploadTooLarge,
)

MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 32
#: Seconds a refused upload is told to wait: most uploads finish within that.
RETRY_UPLOAD_AFTER = 10


@dataclass
class Upload:
    """The uploaded file on disk plus the form's text fields."""

    path: Path | None = None
    filename: str | None = None
    size: int = 0
    sha256: str = ""
    fields: dict[str, list[str]] = field(default_factory=dict)
    release: Callable[[], None] | None = field(default=None, repr=False)

    def field(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else None

    def discard(self) -> None:
        """Delete the file and give back the upload's slot."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None
        if self.release is not None:
            self.release()
            self.release = None


class UploadSlots:
    """Uploads in flight in this process (so per gateway replica), at most ``per_code`` for one
    code and ``total`` in all; 0 means no cap. Used from the event loop only."""

    def __init__(self, *, total: int, per_code: int) -> None:
        self.total = total
        self.per_code = per_code
        self.held: Counter[str] = Counter()

    def acquire(self, holder: str) -> Callable[[], None]:
        """Take a slot for ``holder`` (a code's ID) or raise TooManyUploads; returns its release."""
        if self.per_code and self.held[holder] >= self.per_code:
            raise TooManyUploads(
                f"This code already has {self.per_code} uploads in progress; send this one "
                "when one of them has finished.",
                retry_after=RETRY_UPLOAD_AFTER,
            )
        if self.total and self.held.total() >= self.total:
            raise TooManyUploads(
                "The server is receiving as many uploads as it can; try again shortly.",
                retry_after=RETRY_UPLOAD_AFTER,
            )
        self.held[holder] += 1

        def release() -> None:
            self.held[holder] -= 1
            if not self.held[holder]:
                del self.held[holder]

        return release


def human_size(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


class _Receiver:
    """python-multipart callbacks writing the file part to disk and collecting fields."""

    def __init__(self, upload: Upload, tmp_dir: Path, max_bytes: int, file_field: str) -> None:
        self.upload = upload
        self.tmp_dir = tmp_dir
        self.max_bytes = max_bytes
        self.file_field = file_field
        self.header_name = b""
        self.header_value = b""
        self.disposition = b""
        self.name = ""
        self.is_file = False
        self.sink: IO[bytes] | None = None
        self.hasher = hashlib.sha256()
        self.buffer = bytearray()
        self.fields = 0
        self.ended = False

    def on_part_begin(self) -> None:
        self.disposition = b""
        self.buffer = bytearray()
        self.is_file = False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name = b""
        self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        if b"name" not in options:
            raise InvalidRequest("Every form part needs a name in its Content-Disposition.")
        self.name = options[b"name"].decode("utf-8", "replace")
        self.is_file = self.name == self.file_field and b"filename" in options
        if self.is_file:
            if self.upload.path is not None:
                raise InvalidRequest("Send exactly one file.", param=self.file_field)
            self.upload.filename = os.path.basename(options[b"filename"].decode("utf-8", "replace"))
            fd, name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=self.tmp_dir)
            self.upload.path = Path(name)
            self.sink = os.fdopen(fd, "wb")
        else:
            self.fields += 1
            if self.fields > MAX_FIELDS:
                raise InvalidRequest("Too many form fields.")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self.is_file and self.sink is not None:
            self.upload.size += len(chunk)
            if self.upload.size > self.max_bytes:
                raise UploadTooLarge(
                    f"The file is larger than the {human_size(self.max_bytes)} limit.",
                    param=self.file_field,
                )
            self.hasher.update(chunk)
            self.sink.write(chunk)
        else:
            self.buffer.extend(chunk)
            if len(self.buffer) > MAX_FIELD_BYTES:
                raise InvalidRequest(f"The form field {self.name!r} is too long.", param=self.name)

    def on_part_end(self) -> None:
        if self.is_file:
            self.close()
        else:
            value = self.buffer.decode("utf-8", "replace")
            self.upload.fields.setdefault(self.name, []).append(value)

    def on_end(self) -> None:
        self.ended = True

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None
            self.upload.sha256 = self.hasher.hexdigest()


#: The window a minimum upload rate is measured over when uploads have no idle deadline.
DEFAULT_RATE_WINDOW = 30.0


class _Pace:
    """Bytes received per window: a client that trickles a byte just often enough to beat the
    idle deadline would otherwise hold an upload slot (and its temp file) for as long as it likes."""

    def __init__(self, min_rate: float, window: float) -> None:
        self.min_rate, self.window = min_rate, window
        self.started = time.monotonic()
        self.received = 0

    def too_slow(self, size: int) -> bool:
        if not self.min_rate:
            return False
        self.received += size
        elapsed = time.monotonic() - self.started
        if elapsed < self.window:
            return False
        if self.received < self.min_rate * elapsed:
            return True
        self.started, self.received = time.monotonic(), 0
        return False


async def receive_upload(
    request: Request,
    *,
    tmp_dir: Path,
    max_bytes: int,
    idle_timeout: float,
    slots: UploadSlots,
    holder: str,
    min_rate: float = 0.0,
    file_field: str = "file",
) -> Upload:
    """Parse a multipart/form-data body in one of ``holder``'s slots, refusing it when no byte
    arrives for ``idle_timeout`` seconds, or fewer than ``min_rate`` bytes a second arrive over
    a window of that length (0: no limit); the caller must ``discard()`` the upload."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise InvalidRequest(
            "Send the audio as multipart/form-data with the file in the 'file' field.",
            param=file_field,
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + MAX_FIELD_BYTES:
        raise UploadTooLarge(
            f"The file is larger than the {human_size(max_bytes)} limit.", param=file_field
        )
    upload = Upload()
    receiver = _Receiver(upload, tmp_dir, max_bytes, file_field)
    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": receiver.on_part_begin,
            "on_part_data": receiver.on_part_data,
            "on_part_end": receiver.on_part_end,
            "on_header_field": receiver.on_header_field,
            "on_header_value": receiver.on_header_value,
            "on_header_end": receiver.on_header_end,
            "on_headers_finished": receiver.on_headers_finished,
            "on_end": receiver.on_end,
        },
    )
    upload.release = slots.acquire(holder)
    received = 0
    pace = _Pace(min_rate, idle_timeout or DEFAULT_RATE_WINDOW)
    metrics.UPLOADS_IN_FLIGHT.inc()
    try:
        chunks = request.stream()
        while True:
            try:
                async with asyncio.timeout(idle_timeout or None):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise UploadTimeout(
                    f"No part of the upload arrived for {idle_timeout:g} s; send it again.",
                    param=file_field,
                ) from None
            received += len(chunk)
            if pace.too_slow(len(chunk)):
                raise UploadTimeout(
                    f"The upload arrived at under {human_size(int(min_rate))} a second; "
                    "send it again over a faster connection.",
                    param=file_field,
                    code="upload_too_slow",
                )
            parser.write(chunk)
        parser.finalize()
        if not receiver.ended:
            raise InvalidRequest(
                "The upload ended before its closing multipart boundary; send it again.",
                param=file_field,
            )
    except BaseException as exc:
        receiver.close()
        upload.discard()
        if isinstance(exc, DomainError):
            raise
        if isinstance(exc, Exception):
            raise InvalidRequest("The multipart body could not be parsed.") from exc
        raise
    finally:
        metrics.UPLOADS_IN_FLIGHT.dec()
        metrics.UPLOAD_BYTES.inc(received)
    receiver.close()
    if upload.path is None:
        upload.discard()
        raise InvalidRequest("No file was uploaded: send it in the 'file' field.", param=file_field)
    return upload
