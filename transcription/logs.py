"""Logging for every process: JSON lines or human text on stderr, each line carrying the
request and job it belongs to, and credit codes, tokens and other secrets blanked out.

The IDs come from context variables: the gateway's request middleware sets the request's, and
whatever works on a job (a local worker thread, an operator step, the transcriber Job) sets the
job's with ``job_context``. A record's own ``extra={"job_id": …}`` wins over the context.
"""

from __future__ import annotations

import copy
import logging
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

from pydantic import BaseModel, SecretStr
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from transcription.ledger import CODE_PREFIX
from transcription.settings import LogFormat

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id: ContextVar[str | None] = ContextVar("job_id", default=None)

REDACTED = "[redacted]"
#: A configured secret shorter than this is not blanked out: it would blank common words.
MIN_SECRET_LENGTH = 8
# Anything shaped like a credit code, valid or not (a mistyped code is nearly the code), and
# any bearer credential (the scheme of every token the API takes), whatever logged it.
_CODE = re.compile(rf"(?<![A-Za-z0-9]){re.escape(CODE_PREFIX)}[A-Za-z0-9_-]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+")
# Attributes some libraries put on records that are no log fields: uvicorn's ANSI-coloured copy
# of the message, kopf's event-posting flags and settings object (kopf's object reference is
# kept, as ``object``).
_DROPPED = ("color_message", "k8s_skip", "settings", "k8s_ref")
_IDS = ("request_id", "job_id")


@contextmanager
def job_context(value: str) -> Iterator[None]:
    """Mark every line logged inside the block (in this thread or task) with job ``value``."""
    token = job_id.set(value)
    try:
        yield
    finally:
        job_id.reset(token)


def secret_values(settings: BaseModel) -> list[str]:
    """The values of a settings object's secret fields (code key, admin token, API keys)."""
    return [
        value.get_secret_value()
        for value in (getattr(settings, name) for name in type(settings).model_fields)
        if isinstance(value, SecretStr) and value.get_secret_value()
    ]


class Redactor:
    """Blanks out credit codes, bearer tokens and the given secret values in text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another is blanked out whole.
        literals = sorted(
            {s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True
        )
        self._literals = [re.compile(re.escape(s)) for s in literals]

    def __call__(self, text: str) -> str:
        for literal in self._literals:
            text = literal.sub(REDACTED, text)
        text = _CODE.sub(CODE_PREFIX + REDACTED, text)
        return _BEARER.sub(rf"\1{REDACTED}", text)


class ContextFilter(logging.Filter):
    """Copies the current request and job IDs onto each record that has none of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in (("request_id", request_id), ("job_id", job_id)):
            value = var.get()
            if value is not None and getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


class JsonLogFormatter(JsonFormatter):
    """One JSON object per line: time, level (and ``severity``, which Cloud Logging reads; it
    files a stderr line without one as an error), logger, message, the IDs where there are any,
    then the record's extra fields; every string redacted."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            reserved_attrs=[*RESERVED_ATTRS, *_DROPPED],
        )
        self.redact = redact

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["time"] = datetime.fromtimestamp(record.created, UTC).isoformat(
            timespec="milliseconds"
        )
        super().add_fields(log_data, record, message_dict)
        log_data["severity"] = record.levelname
        reference = getattr(record, "k8s_ref", None)
        if reference is not None:
            log_data["object"] = reference
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            # uvicorn's access line: client, method, path with query, HTTP version, status.
            client, method, path, _, status = args
            log_data.update(client=client, method=method, path=path, status=status)

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        redacted: dict[str, Any] = self._redacted(log_data)
        return redacted

    def _redacted(self, value: Any) -> Any:
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, dict):
            return {key: self._redacted(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self._redacted(item) for item in value]
        # Any other object as text here, not later by the encoder, so none slips past.
        return self.redact(value if isinstance(value, str) else str(value))


class TextLogFormatter(logging.Formatter):
    """``time LEVEL logger [request …] [job …]: message`` for people, redacted."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s")
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        context = "".join(
            f" [{name.removesuffix('_id')} {getattr(record, name)}]"
            for name in _IDS
            if getattr(record, name, None) is not None
        )
        reference = getattr(record, "k8s_ref", None)
        if isinstance(reference, dict) and reference.get("name"):
            where = (reference.get("namespace"), reference["name"])
            context += f" [{'/'.join(str(part) for part in where if part)}]"
        # A copy: other handlers (a test's capture, kopf's event poster) see the record as is.
        record = copy.copy(record)
        record.context = context
        return self.redact(super().format(record))


def use_json(fmt: LogFormat, stream: TextIO) -> bool:
    """Whether ``fmt`` means JSON lines on ``stream``: ``auto`` is JSON unless it is a terminal."""
    return fmt == "json" or (fmt == "auto" and not stream.isatty())


class _Handler(logging.StreamHandler[TextIO]):
    """The handler ``configure_logging`` installs, told apart so a second call replaces it."""


def configure_logging(
    level: str | int = "INFO",
    fmt: LogFormat = "auto",
    *,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Send every logger's records (uvicorn's and kopf's included) to stderr in one format,
    with the current request and job IDs, and ``secrets`` blanked out with codes and tokens."""
    stream = stream or sys.stderr
    redact = Redactor(secrets)
    handler = _Handler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(
        JsonLogFormatter(redact) if use_json(fmt, stream) else TextLogFormatter(redact)
    )
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _Handler)]
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # Whatever handlers uvicorn or an earlier configuration gave them: through ours instead.
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        # And at the root's level, whatever level an earlier uvicorn.Config left them at.
        logger.setLevel(logging.NOTSET)
        logger.disabled = False
    # Off first: a second call would otherwise keep a warnings hook that something (pytest's
    # per-test warning capture, say) has replaced since the first.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
