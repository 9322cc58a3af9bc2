"""Faults in the embedded shape, through real ``whisperctl serve`` processes and the real local
engine: a second server on a data directory, a cancel mid-transcription, a server killed every
time it runs a job, a server frozen while it holds a lease. Each ends with the job succeeded and
charged once, or failed or cancelled and its credit resolved once, the ledger equal to the
counters and no job left unfinished."""

from __future__ import annotations

import math
import secrets
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.gateway import audit, eventually
from tests.fixtures.server import WHISPERCTL, Server, free_port
from tests.speech import SCRIPT, SPEECH, repeated_speech
from tests.wer import wer
from transcription.lifecycle import WORKER_LOST
from transcription.transcript import FORMATS

FINISHED = ("succeeded", "failed", "cancelled")
#: Long enough that only a restart that takes the job back at once can finish it in the test.
NEVER_EXPIRES = "3600"


class Api:
    """One code's view of a server's API."""

    def __init__(self, server: Server, code: str) -> None:
        self.server = server
        self.code = code
        self.http = httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {code}"}, timeout=60
        )

    def submit(self, audio: Path) -> httpx.Response:
        return self.http.post(
            "/v1/transcriptions", files={"file": (audio.name, audio.read_bytes(), "audio/mpeg")}
        )

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/transcriptions/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def credits(self) -> dict[str, Any]:
        body: dict[str, Any] = self.http.get("/v1/credits").json()
        return body

    def until(
        self, job_id: str, check: Callable[[dict[str, Any]], bool], what: str, timeout: float = 180
    ) -> dict[str, Any]:
        def polled() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if check(job) else None

        return eventually(polled, timeout=timeout, what=f"job {job_id}: {what}")

    def finished(self, job_id: str) -> dict[str, Any]:
        return self.until(job_id, lambda job: job["status"] in FINISHED, "finishing")


def test_a_second_serve_on_a_data_directory_in_use_refuses_and_names_the_first(
    start_server: Callable[..., Server],
) -> None:
    server = start_server(ready=False)
    second = subprocess.run(
        [WHISPERCTL, "serve", "--port", str(free_port()), "--data-dir", str(server.data_dir)],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 1, (second.stdout, second.stderr)
    assert f"process {server.pid}" in second.stderr
    assert str(server.data_dir.absolute()) in second.stderr
    assert "Uvicorn running" not in second.stdout + second.stderr
    assert httpx.get(server.base_url + "/healthz").status_code == 200

    # The kernel drops the lock with its holder, however it ends: a crash leaves none behind.
    server.kill()
    server.start(ready=False)
    assert httpx.get(server.base_url + "/healthz").status_code == 200


@pytest.mark.slow
def test_a_running_job_shows_no_transcript_and_its_cancel_charges_what_was_transcribed(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    """Issue 11's free transcript: while a job runs there is no text, link or download; a
    DELETE then cancels it, charges at least progress times audio, keeps the use spent, and the
    single-use code cannot start another job."""
    audio = tmp_path / "talk.mp3"
    repeated_speech(audio, 3)
    # One 30-s chunk per batch, so progress arrives while the job runs.
    server = start_server(env={"WHISPER_BATCH_SIZE": "1", "WHISPER_PROGRESS_INTERVAL": "0.2"})
    api = Api(server, server.create_code())
    submitted = api.submit(audio)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]

    def no_transcript(job: dict[str, Any]) -> bool:
        assert (job["text"], job["transcript"]) == (None, None), job
        if job["status"] != "running":
            assert job["status"] == "queued", job
            return False
        for fmt in FORMATS:
            response = api.http.get(f"/v1/transcriptions/{job_id}/transcript.{fmt}")
            assert response.status_code == 409, response.text
            assert response.json()["error"]["code"] == "transcript_not_ready"
        listed = api.http.get("/v1/transcriptions").json()["data"]
        assert [(j["id"], j["text"], j["transcript"]) for j in listed] == [(job_id, None, None)]
        return bool(job["progress"] > 0)

    seen = api.until(job_id, no_transcript, "running with some progress")
    response = api.http.delete(f"/v1/transcriptions/{job_id}")
    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    assert (cancelled["text"], cancelled["transcript"]) == (None, None)
    charged = cancelled["charged_seconds"]
    assert math.ceil(seen["progress"] * seen["audio_seconds"] - 1e-3) <= charged
    assert charged < cancelled["reserved_seconds"]

    assert api.job(job_id)["status"] == "cancelled"
    assert (api.job(job_id)["text"], api.job(job_id)["transcript"]) == (None, None)
    for fmt in FORMATS:
        download = api.http.get(f"/v1/transcriptions/{job_id}/transcript.{fmt}")
        assert download.status_code == 409, download.text
    balance = api.credits()
    assert (balance["spent_seconds"], balance["reserved_seconds"], balance["uses"]) == (
        charged,
        0,
        1,
    )
    again = api.submit(audio)
    assert again.status_code == 402, again.text
    assert again.json()["error"]["code"] == "code_used"

    # The worker stops at its next progress write; nothing of the job is left in the store.
    job_files = server.data_dir / "blobs" / "jobs" / job_id
    eventually(
        lambda: not any(p.is_file() for p in job_files.rglob("*")),
        timeout=60,
        what="the job's files being removed",
    )
    with server.database() as db:
        jobs = audit(db)
    assert jobs[job_id].charged_seconds == charged
    assert "Traceback" not in server.log()


@pytest.mark.slow
def test_a_job_that_kills_its_server_every_time_fails_worker_lost_and_is_refunded(
    start_server: Callable[..., Server],
) -> None:
    """SIGKILL the server whenever the job runs: each restart takes the job back at once (the
    server holds its data directory alone), and past the attempt limit it fails and refunds."""
    server = start_server(env={"WHISPER_MAX_ATTEMPTS": "2", "WHISPER_LEASE_SECONDS": NEVER_EXPIRES})
    api = Api(server, server.create_code())
    submitted = api.submit(SPEECH)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    for attempt in (1, 2):
        api.until(job_id, lambda job: job["status"] != "queued", f"attempt {attempt} starting")
        with server.database() as db:
            jobs = audit(db, settled=False)
        assert (jobs[job_id].status, jobs[job_id].attempts) == ("running", attempt)
        server.kill()
        server.start()

    failed = api.job(job_id)  # settled while the restarted server started up
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == WORKER_LOST
    assert "refunded" in failed["error"]["message"]
    assert (failed["charged_seconds"], failed["text"], failed["transcript"]) == (0, None, None)
    balance = api.credits()
    assert (balance["spent_seconds"], balance["reserved_seconds"], balance["uses"]) == (0, 0, 0)
    assert not any(p.is_file() for p in (server.data_dir / "blobs" / "jobs" / job_id).rglob("*"))
    with server.database() as db:
        assert audit(db)[job_id].attempts == 2
    # The use came back: the code pays for another try, which succeeds.
    retry = api.submit(SPEECH)
    assert retry.status_code == 202, retry.text
    assert api.finished(retry.json()["id"])["status"] == "succeeded"


@pytest.mark.slow
def test_a_frozen_servers_job_is_taken_over_when_its_lease_expires(
    start_server: Callable[..., Server], pg_url: str, tmp_path: Path, mp3_5s: Path
) -> None:
    """Two servers share PostgreSQL and a blob store. The one running a job freezes (SIGSTOP:
    no work, no lease renewal); its lease expires, the other runs the job to success and
    charges it once. Thawed, the first server gives the job up without touching the winner's
    transcripts, and goes on working."""
    shared = {
        "DATABASE_URL": pg_url,
        "WHISPER_BLOB_URL": (tmp_path / "shared-blobs").absolute().as_uri(),
        "WHISPER_CODE_SECRET": secrets.token_hex(32),
        "WHISPER_LEASE_SECONDS": "2",
    }
    # A session frozen inside a transaction would hold its row locks until thawed; PostgreSQL
    # ends it instead, as a deployment should configure.
    frozen_url = pg_url + "%20-cidle_in_transaction_session_timeout%3D2000"
    first = start_server(env={**shared, "DATABASE_URL": frozen_url})
    second = start_server(env=shared)
    api = Api(first, first.create_code())
    submitted = api.submit(SPEECH)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    api.until(job_id, lambda job: job["status"] == "running", "running on the first server")
    first.pause()
    try:
        done = Api(second, api.code).finished(job_id)
        assert done["status"] == "succeeded", done
        assert done["charged_seconds"] == math.ceil(done["audio_seconds"])
        assert wer(SCRIPT, done["text"]) <= 0.15
        with second.database() as db:
            owner = audit(db, settled=False)[job_id]
        assert owner.attempts == 2
    finally:
        first.resume()

    # The first server's worker is free again once it has let the job go: a new job runs.
    other = Api(first, first.create_code())
    tone = other.submit(mp3_5s)
    assert tone.status_code == 202, tone.text
    assert other.finished(tone.json()["id"])["status"] == "succeeded"
    for server in (first, second):
        view = Api(server, api.code)
        assert (view.job(job_id)["status"], view.job(job_id)["text"]) == ("succeeded", done["text"])
        for fmt in FORMATS:
            download = view.http.get(f"/v1/transcriptions/{job_id}/transcript.{fmt}")
            assert download.status_code == 200, (server.base_url, fmt, download.text)
    balance = api.credits()
    assert (balance["spent_seconds"], balance["reserved_seconds"], balance["uses"]) == (
        done["charged_seconds"],
        0,
        1,
    )
    with second.database() as db:
        audit(db)
