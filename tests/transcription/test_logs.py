"""transcription.logs: the JSON and text formats, the request and job IDs, and redaction."""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from transcription import ledger
from transcription.logs import (
    REDACTED,
    ContextFilter,
    JsonLogFormatter,
    Redactor,
    TextLogFormatter,
    configure_logging,
    job_context,
    job_id,
    request_id,
    secret_values,
)
from transcription.settings import GatewaySettings

TOKEN = "admin-token-0123456789"


def record(message: str, *args: Any, name: str = "test", **attributes: Any) -> logging.LogRecord:
    """A record as a logger makes it, after the handler's context filter."""
    made = logging.LogRecord(name, logging.INFO, __file__, 1, message, args, None)
    made.__dict__.update(attributes)
    ContextFilter().filter(made)
    return made


def as_json(made: logging.LogRecord, *secrets: str) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(JsonLogFormatter(Redactor(secrets)).format(made))
    return parsed


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """Put the root logger, uvicorn's loggers and warnings capture back after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    uvicorn = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "uvicorn.access")]
    saved = [(logger.handlers[:], logger.propagate) for logger in uvicorn]
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for logger, (kept, propagate) in zip(uvicorn, saved, strict=True):
        logger.handlers[:] = kept
        logger.propagate = propagate
    logging.captureWarnings(False)


def test_a_json_line_has_time_level_logger_message_and_the_ids_in_context() -> None:
    request_token = request_id.set("req-1")
    try:
        with job_context("tr_0123456789abcdef"):
            line = as_json(record("job %s took %.1f s", "tr_0123456789abcdef", 2.0))
    finally:
        request_id.reset(request_token)
    assert line["level"] == line["severity"] == "INFO"
    assert line["logger"] == "test"
    assert line["message"] == "job tr_0123456789abcdef took 2.0 s"
    assert line["request_id"] == "req-1"
    assert line["job_id"] == "tr_0123456789abcdef"
    assert line["time"].endswith("+00:00")
    assert job_id.get() is None


def test_a_json_line_without_ids_has_none_and_an_explicit_id_wins() -> None:
    assert {"request_id", "job_id"}.isdisjoint(as_json(record("started")))
    with job_context("tr_aaaaaaaaaaaaaaaa"):
        line = as_json(record("cancelled", job_id="tr_bbbbbbbbbbbbbbbb"))
    assert line["job_id"] == "tr_bbbbbbbbbbbbbbbb"


def test_codes_bearer_credentials_and_configured_secrets_are_redacted_everywhere() -> None:
    code = ledger.generate_code()
    try:
        raise ValueError(f"refused {code}")
    except ValueError:
        made = record(
            "Authorization: Bearer %s, token %s, mistyped %s",
            code,
            TOKEN,
            code[:-3],
            exc_info=sys.exc_info(),
            detail={"header": f"bearer {TOKEN}", "codes": [code], "error": ValueError(code)},
        )
    line = as_json(made, TOKEN)
    text = json.dumps(line)
    assert code.removeprefix(ledger.CODE_PREFIX)[:-3] not in text
    assert TOKEN not in text
    assert line["message"] == (
        f"Authorization: Bearer {REDACTED}, token {REDACTED}, mistyped wt_{REDACTED}"
    )
    assert f"refused wt_{REDACTED}" in line["exc_info"]
    assert line["detail"] == {
        "header": f"bearer {REDACTED}",
        "codes": [f"wt_{REDACTED}"],
        "error": f"wt_{REDACTED}",
    }
    plain = TextLogFormatter(Redactor([TOKEN])).format(made)
    assert code.removeprefix(ledger.CODE_PREFIX)[:-3] not in plain
    assert TOKEN not in plain


def test_redaction_spares_look_alikes_and_short_secrets() -> None:
    redact = Redactor(["short"])
    assert redact("newt_abc and a short word") == "newt_abc and a short word"
    assert redact("code=wt_x") == f"code=wt_{REDACTED}"


def test_uvicorn_access_lines_get_http_fields_and_kopf_lines_their_object() -> None:
    access = as_json(
        record(
            '%s - "%s %s HTTP/%s" %d',
            "127.0.0.1:5000",
            "GET",
            "/v1/credits",
            "1.1",
            200,
            name="uvicorn.access",
            color_message="\x1b[1m...",
        )
    )
    assert (access["method"], access["path"], access["status"]) == ("GET", "/v1/credits", 200)
    assert "color_message" not in access
    reference = {"kind": "TranscriptionJob", "name": "tr-0123456789abcdef", "namespace": "ns"}
    kopf = record(
        "Handler succeeded.",
        name="kopf.objects",
        k8s_ref=reference,
        k8s_skip=False,
        settings=object(),
    )
    line = as_json(kopf)
    assert line["object"] == reference
    assert {"k8s_ref", "k8s_skip", "settings"}.isdisjoint(line)
    text = TextLogFormatter(Redactor()).format(kopf)
    assert text.endswith(" INFO kopf.objects [ns/tr-0123456789abcdef]: Handler succeeded.")


def test_a_text_line_names_the_request_and_job() -> None:
    token = request_id.set("req-2")
    try:
        with job_context("tr_0123456789abcdef"):
            text = TextLogFormatter(Redactor()).format(record("done"))
    finally:
        request_id.reset(token)
    assert text.endswith(" INFO test [request req-2] [job tr_0123456789abcdef]: done")


@pytest.mark.usefixtures("restored_logging")
def test_configure_logging_writes_json_off_a_terminal_and_text_at_one() -> None:
    stream = io.StringIO()
    configure_logging("info", "auto", secrets=[TOKEN], stream=stream)
    configure_logging("info", "auto", secrets=[TOKEN], stream=stream)  # replaces, not adds
    logging.getLogger("uvicorn.error").info("Uvicorn running with %s", TOKEN)
    logging.getLogger("test").debug("below the level")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated", DeprecationWarning, stacklevel=1)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["logger"], line["level"]) for line in lines] == [
        ("uvicorn.error", "INFO"),
        ("py.warnings", "WARNING"),
    ]
    assert lines[0]["message"] == f"Uvicorn running with {REDACTED}"

    terminal = TtyStream()
    configure_logging("warning", "auto", stream=terminal)
    logging.getLogger("test").warning("at a terminal")
    assert terminal.getvalue().rstrip().endswith(" WARNING test: at a terminal")
    forced = TtyStream()
    configure_logging("info", "json", stream=forced)
    logging.getLogger("test").info("forced")
    assert json.loads(forced.getvalue())["message"] == "forced"


def test_secret_values_are_the_settings_secret_fields() -> None:
    settings = GatewaySettings(admin_token=TOKEN, code_secret="code-secret-value")
    assert {TOKEN, "code-secret-value"} <= set(secret_values(settings))
