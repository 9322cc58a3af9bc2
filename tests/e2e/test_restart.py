"""A server killed mid-job finishes the work after a restart on the same data dir, charging once."""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.gateway import audit
from tests.fixtures.server import WHISPERCTL, Server, clean_env
from tests.wer import wer

DATA = Path(__file__).parents[1] / "data"
FINISHED = {"succeeded", "failed", "cancelled"}


def poll(client: httpx.Client, code: str, until: set[str], timeout: float = 120) -> dict[str, Any]:
    """The code's only job, as soon as it exists and its status is one of ``until``."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get("/v1/transcriptions", headers={"Authorization": f"Bearer {code}"})
        assert response.status_code == 200, response.text
        jobs: list[dict[str, Any]] = response.json()["data"]
        assert len(jobs) <= 1, jobs
        if jobs and jobs[0]["status"] in until:
            return jobs[0]
        assert time.monotonic() < deadline, f"no job reached {until}: {jobs}"
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_server_finishes_running_and_queued_jobs_after_restart(
    start_server: Callable[..., Server], mp3_5s: Path, tmp_path: Path
) -> None:
    """SIGKILL with one job running and one queued: after the restart both succeed and are
    charged exactly once, and a ``submit --wait`` that was following the first still saves it.

    The running job's lease would last an hour: the restarted server, alone on its data
    directory, takes the job back at once instead of waiting for it."""
    server = start_server(env={"WHISPER_CONCURRENCY": "1", "WHISPER_LEASE_SECONDS": "3600"})
    codes = {"running": server.create_code(), "queued": server.create_code()}
    saved = tmp_path / "speech.txt"
    waiting = subprocess.Popen(
        [WHISPERCTL, "submit", str(DATA / "speech.mp3"), "--code", codes["running"],
         "--url", server.base_url, "--wait", "-o", str(saved), "--quiet"],
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            before = {"running": poll(client, codes["running"], {"running"} | FINISHED)}
            queued = client.post(
                "/v1/transcriptions",
                headers={"Authorization": f"Bearer {codes['queued']}"},
                files={"file": (mp3_5s.name, mp3_5s.read_bytes(), "audio/mpeg")},
            )
            assert queued.status_code == 202, queued.text
            before["queued"] = poll(client, codes["queued"], {"queued"} | FINISHED)
            server.kill()
        assert {k: job["status"] for k, job in before.items()} == {
            "running": "running",
            "queued": "queued",
        }

        restarted_at = datetime.now(UTC)
        server.start()
        _, stderr = waiting.communicate(timeout=300)
        assert waiting.returncode == 0, stderr
        assert wer((DATA / "speech.txt").read_text(), saved.read_text()) <= 0.15
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate()

    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        for kind, code in codes.items():
            done = poll(client, code, FINISHED)
            assert done["status"] == "succeeded", done
            assert datetime.fromisoformat(done["completed_at"]) > restarted_at
            charge = math.ceil(before[kind]["audio_seconds"])
            assert done["charged_seconds"] == charge
            balance = client.get("/v1/credits", headers={"Authorization": f"Bearer {code}"}).json()
            assert balance["spent_seconds"] == charge
            assert (balance["reserved_seconds"], balance["uses"]) == (0, 1)
    with server.database() as db:
        jobs = audit(db)
    attempts = {kind: jobs[before[kind]["id"]].attempts for kind in codes}
    assert attempts == {"running": 2, "queued": 1}
