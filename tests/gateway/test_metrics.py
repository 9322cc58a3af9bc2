"""Metrics scraped from real ``whisperctl serve`` processes on their own port: they move as jobs
are submitted, succeed, fail and are cancelled, and the credit counters end equal to the ledger.
Requests that match no route share one series."""

from __future__ import annotations

import math
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from tests.fixtures.fault_proxy import FaultProxy
from tests.fixtures.gateway import ADMIN, MakeClient, eventually
from tests.fixtures.server import WHISPERCTL, Server, clean_env, free_port, running_server
from tests.speech import SPEECH
from transcription.db.models import LedgerEntry
from transcription.states import RESOLUTIONS, EntryKind

Samples = dict[str, float]
FINISHED = ("succeeded", "failed", "cancelled")
JOB_ROUTE = "/v1/transcriptions/{job_id}"


def key(name: str, **labels: str) -> str:
    inner = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}" if inner else name


def scrape(port: int) -> Samples:
    """Every sample the metrics port serves, parsed by prometheus_client's own parser."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    return {
        key(sample.name, **sample.labels): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def scraped(port: int, expected: Samples, timeout: float = 30.0) -> Samples:
    """Scrape until every ``expected`` sample has its value (counters move just after the
    commit or the response that moves them), and return that scrape."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        wrong = {k: samples.get(k) for k, value in expected.items() if samples.get(k, 0) != value}
        if not wrong:
            return samples
        if time.monotonic() > deadline:
            pytest.fail(f"after {timeout:g} s these samples still differ: {wrong}")
        time.sleep(0.1)


class Api:
    """One code's requests to a server."""

    def __init__(self, server: Server, code: str) -> None:
        self.http = httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {code}"}, timeout=60
        )

    def submit(self, audio: Path) -> httpx.Response:
        return self.http.post(
            "/v1/transcriptions", files={"file": (audio.name, audio.read_bytes(), "audio/mpeg")}
        )

    def wait(self, job_id: str) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            body: dict[str, Any] = self.http.get(f"/v1/transcriptions/{job_id}").json()
            return body if body["status"] in FINISHED else None

        return eventually(done, timeout=120, what=f"job {job_id} finishing")


def ledger_totals(server: Server) -> Samples:
    """The credit counters' values as the ledger table has them."""
    with server.database() as db, db.read() as session:

        def total(column: Any, *kinds: EntryKind) -> int:
            query = select(func.coalesce(func.sum(column), 0)).where(LedgerEntry.kind.in_(kinds))
            return int(session.scalar(query) or 0)

        reserved = total(LedgerEntry.reserved_delta, EntryKind.RESERVE)
        charged = total(LedgerEntry.spent_delta, EntryKind.SETTLE)
        resolved = -total(LedgerEntry.reserved_delta, *RESOLUTIONS)
    return {
        "whisper_credit_reserved_seconds_total": reserved,
        "whisper_credit_charged_seconds_total": charged,
        "whisper_credit_refunded_seconds_total": resolved - charged,
    }


@contextmanager
def metered_server(data_dir: Path, **env: str) -> Iterator[tuple[Server, int]]:
    port = free_port()
    with running_server(data_dir, env={"WHISPER_METRICS_PORT": str(port), **env}) as server:
        yield server, port


def test_a_served_job_moves_the_metrics_from_upload_to_charge(
    tmp_path: Path, damaged_mp3: Path, mp3_5s: Path
) -> None:
    """Refused, succeeded and cancelled submissions on the real local engine (a tone is
    transcribed in a moment), seen only on the metrics port; afterwards the credit counters
    equal the ledger's totals."""
    with metered_server(tmp_path / "data", WHISPER_CONCURRENCY="1") as (server, port):
        assert httpx.get(server.base_url + "/metrics").status_code == 404  # not on the API port
        start = scraped(
            port,
            {
                key("whisper_jobs", status="queued"): 0,
                key("whisper_jobs", status="running"): 0,
                key("whisper_model_load_seconds_count", engine="local"): 1,
                key("whisper_uploads_in_flight"): 0,
            },
        )
        assert start[key("whisper_codes", state="active")] == 0
        api = Api(server, server.create_code(seconds=600, max_uses=5))
        assert start.get(key("whisper_jobs_created_total", mode="fast", engine="local")) is None

        refused = api.submit(damaged_mp3)
        assert refused.status_code == 422, refused.text
        post = {"method": "POST", "route": "/v1/transcriptions"}
        after_refusal = scraped(port, {key("whisper_http_requests_total", status="422", **post): 1})
        assert after_refusal["whisper_upload_bytes_total"] > damaged_mp3.stat().st_size
        assert after_refusal[key("whisper_codes", state="active")] == 1
        assert (
            after_refusal.get(key("whisper_jobs_created_total", mode="fast", engine="local"))
            is None
        )

        submitted = api.submit(mp3_5s)
        assert submitted.status_code == 202, submitted.text
        job = api.wait(submitted.json()["id"])
        assert job["status"] == "succeeded", job
        # Long speech, so the cancel always finds it unfinished.
        cancelled = api.submit(SPEECH).json()["id"]
        response = api.http.delete(f"/v1/transcriptions/{cancelled}")
        assert response.json()["status"] == "cancelled", response.text
        assert api.http.get("/wp-login.php").status_code == 404

        ledger = ledger_totals(server)
        assert ledger["whisper_credit_charged_seconds_total"] >= math.ceil(job["audio_seconds"])
        final = scraped(
            port,
            {
                key("whisper_jobs_created_total", mode="fast", engine="local"): 2,
                key("whisper_jobs_finished_total", outcome="succeeded", error="none"): 1,
                key("whisper_jobs_finished_total", outcome="cancelled", error="none"): 1,
                key("whisper_job_run_seconds_count", mode="fast", engine="local"): 1,
                key("whisper_job_realtime_factor_count", mode="fast", engine="local"): 1,
                key("whisper_http_requests_total", status="202", **post): 2,
                key(
                    "whisper_http_requests_total", method="DELETE", route=JOB_ROUTE, status="200"
                ): 1,
                # /metrics on the API port, and the scan
                key("whisper_http_requests_total", method="GET", route="other", status="404"): 2,
                key("whisper_jobs", status="queued"): 0,
                key("whisper_jobs", status="running"): 0,
                key("whisper_codes", state="active"): 1,
                key("whisper_uploads_in_flight"): 0,
                **ledger,
            },
        )
        # A cancel that beat the worker to the job never started it.
        attempts = final["whisper_job_attempts_total"]
        assert attempts in (1, 2)
        assert final[key("whisper_job_queue_wait_seconds_count", mode="fast")] == attempts
        assert final["whisper_job_retries_total"] == 0
        run = final[key("whisper_job_run_seconds_sum", mode="fast", engine="local")]
        speed = final[key("whisper_job_realtime_factor_sum", mode="fast", engine="local")]
        assert speed == pytest.approx(run / job["audio_seconds"], rel=1e-3)  # rounded in the API
        assert (
            final[key("whisper_http_requests_total", method="GET", route=JOB_ROUTE, status="200")]
            >= 1
        )
        assert not any("wp-login" in name or cancelled in name for name in final)


def test_an_engine_failure_is_counted_with_its_code_and_refunded(
    tmp_path: Path, fault_proxy: Callable[..., FaultProxy]
) -> None:
    """The OpenAI engine against a server that answers 500 and then never answers: after its
    one retry the job fails ``engine_timeout``, and the engine's requests (one with no answer),
    retry and bytes show."""
    proxy = fault_proxy("http://127.0.0.1:9", script=["500", "stall"])
    with metered_server(
        tmp_path / "data",
        WHISPER_ENGINE="openai",
        OPENAI_API_KEY=secrets.token_hex(8),
        OPENAI_BASE_URL=proxy.base_url,
        WHISPER_OPENAI_MAX_RETRIES="1",
        WHISPER_OPENAI_TIMEOUT="1",
    ) as (server, port):
        api = Api(server, server.create_code(seconds=600))
        submitted = api.submit(SPEECH)
        assert submitted.status_code == 202, submitted.text
        job = api.wait(submitted.json()["id"])
        assert (job["status"], job["error"]["code"]) == ("failed", "engine_timeout"), job

        sent = proxy.transcriptions()
        assert [(seen.status, seen.retry_count) for seen in sent] == [(500, 0), (None, 1)]
        final = scraped(
            port,
            {
                key("whisper_jobs_created_total", mode="fast", engine="openai"): 1,
                key("whisper_jobs_finished_total", outcome="failed", error="engine_timeout"): 1,
                key("whisper_openai_requests_total", status="500"): 1,
                key("whisper_openai_requests_total", status="error"): 1,
                "whisper_openai_retries_total": 1,
                "whisper_openai_bytes_sent_total": sum(seen.size for seen in sent),
                "whisper_job_attempts_total": 1,
                "whisper_credit_charged_seconds_total": 0,
                **ledger_totals(server),
            },
        )
        assert final["whisper_credit_refunded_seconds_total"] == job["reserved_seconds"]
        assert key("whisper_job_run_seconds_count", mode="fast", engine="openai") not in final


def test_paths_and_methods_that_match_no_route_stay_one_series(make_client: MakeClient) -> None:
    """Scans, unknown methods and bodies refused before routing (the body limit) all land in
    route ``other``; a routed request is labelled with its template, never its ID."""
    client = make_client()

    def count(method: str, route: str, status: str) -> float:
        labels = {"method": method, "route": route, "status": status}
        return REGISTRY.get_sample_value("whisper_http_requests_total", labels) or 0.0

    watched = [
        ("GET", "other", "404"),
        ("other", "other", "404"),
        ("POST", "other", "413"),
        ("GET", JOB_ROUTE, "401"),
    ]
    before = [count(*labels) for labels in watched]
    for path in ("/.env", "/wp-login.php", f"/{secrets.token_hex(8)}"):
        assert client.get(path).status_code == 404
    assert client.request("BREW", "/coffee").status_code == 404
    too_large = client.post("/v1/admin/codes", headers=ADMIN, content=b"x" * 100_000)
    assert too_large.json()["error"]["code"] == "request_too_large"
    assert client.get(f"/v1/transcriptions/tr_{secrets.token_hex(8)}").status_code == 401
    moved = [count(*labels) - was for labels, was in zip(watched, before, strict=True)]
    assert moved == [3, 1, 1, 1]


def test_a_metrics_port_in_use_is_named_and_the_server_does_not_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        options = ["--data-dir", str(tmp_path / "data"), "--port", str(free_port())]
        result = subprocess.run(
            [WHISPERCTL, "serve", *options, "--metrics-port", str(busy)],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stderr
    assert f"cannot serve metrics on http://127.0.0.1:{busy}/metrics" in result.stderr
    assert "Traceback" not in result.stderr
