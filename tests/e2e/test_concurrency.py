"""Fifty simultaneous uploads paid with one single-use code, on SQLite and on PostgreSQL."""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.fixtures.gateway import audit
from tests.fixtures.server import Server

SUBMISSIONS = 50


@pytest.fixture(params=["sqlite", "postgresql"])
def database_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The server's database: its data directory's SQLite, or a fresh PostgreSQL schema. Asked
    for before the server, so the schema is dropped only after the server has stopped (dropping
    it under a running server deadlocks with the server's own queries)."""
    if request.param == "postgresql":
        return {"DATABASE_URL": request.getfixturevalue("pg_url")}
    return {}


def test_single_use_code_pays_for_exactly_one_of_50_concurrent_uploads(
    database_env: dict[str, str],
    start_server: Callable[..., Server],
    mp3_5s: Path,
) -> None:
    """One upload is accepted, 49 get 402 ``code_used``, none a 5xx; the code is charged once,
    nothing of the refused uploads is kept and the log holds neither tracebacks nor the code."""
    env = dict(database_env)
    # Without the caps on uploads in flight, which would refuse most of them (429) before they
    # race for the credit, the race this test is about.
    env |= {"WHISPER_MAX_UPLOADS": "0", "WHISPER_MAX_UPLOADS_PER_CODE": "0"}
    server = start_server(env=env, ready=False)
    code = server.create_code()
    auth = {"Authorization": f"Bearer {code}"}
    audio = mp3_5s.read_bytes()
    barrier = threading.Barrier(SUBMISSIONS)

    def upload(_: int) -> httpx.Response:
        with httpx.Client(base_url=server.base_url, headers=auth, timeout=120) as client:
            barrier.wait()
            return client.post(
                "/v1/transcriptions", files={"file": ("tone.mp3", audio, "audio/mpeg")}
            )

    with ThreadPoolExecutor(SUBMISSIONS) as pool:
        responses = list(pool.map(upload, range(SUBMISSIONS)))

    statuses = Counter(r.status_code for r in responses)
    assert statuses == {202: 1, 402: SUBMISSIONS - 1}, (statuses, server.log()[-3000:])
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 402} == {"code_used"}
    job = next(r.json() for r in responses if r.status_code == 202)
    with httpx.Client(base_url=server.base_url, headers=auth, timeout=30) as client:
        balance = client.get("/v1/credits").json()
        listed = client.get("/v1/transcriptions").json()["data"]
    assert balance["uses"] == 1
    assert job["reserved_seconds"] == math.ceil(job["audio_seconds"])
    assert balance["reserved_seconds"] + balance["spent_seconds"] == job["reserved_seconds"]
    assert [j["id"] for j in listed] == [job["id"]]
    assert not any((server.data_dir / "uploads").iterdir())
    blobs = server.data_dir / "blobs"
    stored = {p.relative_to(blobs).parts[:2] for p in blobs.rglob("*") if p.is_file()}
    assert stored <= {("jobs", job["id"])}, stored
    with server.database() as db:
        audit(db, settled=False)
    log = server.log()
    assert "Traceback" not in log
    assert code.removeprefix("wt_") not in log
