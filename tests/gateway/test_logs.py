"""Structured logs: a real ``whisperctl serve`` writing JSON lines through a full job, and the
request ID on answers the app gives from outside its routes (a refused body, a crash)."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.gateway import ADMIN, FixedEngine, MakeClient, auth
from tests.fixtures.server import Server

DATA = Path(__file__).resolve().parents[1] / "data"
GENERATED = re.compile(r"[0-9a-f]{32}")


def _records(server: Server) -> list[dict[str, Any]]:
    """Every line the server wrote, each parsed as JSON (failing on the first that is not)."""
    records = []
    for number, line in enumerate(server.log().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"log line {number} is not JSON: {line!r}")
    return records


def _phrases(text: str, length: int = 3) -> set[str]:
    words = re.findall(r"[a-z']+", text.lower())
    return {" ".join(words[i : i + length]) for i in range(len(words) - length + 1)}


@pytest.mark.slow
def test_a_full_jobs_log_is_json_lines_with_request_and_job_ids_and_no_secrets(
    start_server: Callable[..., Server],
) -> None:
    server = start_server(env={"WHISPER_LOG_FORMAT": "json"})
    code = server.create_code()
    admin_token = server.env["WHISPER_ADMIN_TOKEN"]
    submitted_as = f"client-{uuid.uuid4()}"
    returned: list[str] = []
    with httpx.Client(base_url=server.base_url, headers=auth(code), timeout=60) as client:
        with (DATA / "speech.mp3").open("rb") as audio:
            response = client.post(
                "/v1/transcriptions",
                files={"file": ("speech.mp3", audio, "audio/mpeg")},
                headers={"X-Request-ID": submitted_as},
            )
        assert response.status_code == 202, response.text
        assert response.headers["X-Request-ID"] == submitted_as
        job_id = response.json()["id"]
        deadline = time.monotonic() + 300
        while True:
            polled = client.get(f"/v1/transcriptions/{job_id}")
            returned.append(polled.headers["X-Request-ID"])
            if polled.json()["status"] in ("succeeded", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline, "the job did not finish"
            time.sleep(0.5)
        assert polled.json()["status"] == "succeeded", polled.text
        transcript = client.get(f"/v1/transcriptions/{job_id}/transcript.txt")
        assert transcript.status_code == 200
        # A header that is no sane token is replaced, never logged.
        forged = client.get("/v1/credits", headers={"X-Request-ID": 'x" level=ERROR'})
        assert GENERATED.fullmatch(forged.headers["X-Request-ID"])
        refused = client.get("/v1/transcriptions/tr_0000000000000000")
        assert refused.status_code == 404
        assert GENERATED.fullmatch(refused.headers["X-Request-ID"])
    server.stop()  # everything written, shutdown included

    records = _records(server)
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert all(GENERATED.fullmatch(r) for r in returned) and len(set(returned)) == len(returned)
    access = [r for r in records if r["logger"] == "uvicorn.access"]
    by_id = {r["request_id"]: r for r in access}
    assert len(by_id) == len(access), "every request is logged once, with its own ID"
    assert by_id[submitted_as]["method"] == "POST"
    assert by_id[submitted_as]["status"] == 202
    assert {by_id[r]["path"] for r in returned} == {f"/v1/transcriptions/{job_id}"}
    assert by_id[forged.headers["X-Request-ID"]]["path"] == "/v1/credits"
    assert by_id[refused.headers["X-Request-ID"]]["status"] == 404
    # The submission's line ties the request to the job.
    assert any(
        r.get("request_id") == submitted_as and r.get("job_id") == job_id for r in records
    ), records
    # The worker's lines, the engine's own among them, name the job and no request.
    worker = [r for r in records if r.get("job_id") == job_id and "request_id" not in r]
    assert {"faster_whisper", "transcription.lifecycle"} <= {r["logger"] for r in worker}
    assert all(r.get("job_id") == job_id for r in records if r["logger"] == "faster_whisper")
    text = server.log()
    assert code.removeprefix("wt_") not in text
    assert admin_token not in text
    spoken = _phrases(transcript.text)
    assert spoken, transcript.text
    logged = set().union(*(_phrases(r["message"]) for r in records))
    assert not spoken & logged


def test_request_ids_are_on_refusals_and_crashes_too(make_client: MakeClient) -> None:
    client = make_client(engine=FixedEngine(), raise_server_exceptions=False, max_body_bytes=16)
    too_large = client.post(
        "/v1/admin/codes", json={"seconds": 60, "label": "x" * 64}, headers=ADMIN
    )
    assert too_large.status_code == 413
    assert GENERATED.fullmatch(too_large.headers["X-Request-ID"])

    @client.app.get("/boom")  # type: ignore[attr-defined]
    def boom() -> None:
        raise RuntimeError("boom")

    crashed = client.get("/boom", headers={"X-Request-ID": "trace-1"})
    assert crashed.status_code == 500
    assert crashed.headers["X-Request-ID"] == "trace-1"
    kept = client.get("/healthz", headers={"X-Request-ID": "a" * 128})
    assert kept.headers["X-Request-ID"] == "a" * 128
    too_long = client.get("/healthz", headers={"X-Request-ID": "a" * 129})
    assert GENERATED.fullmatch(too_long.headers["X-Request-ID"])
