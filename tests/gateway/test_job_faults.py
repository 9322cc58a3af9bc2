"""Issue 11's reproductions and worker faults in the app: cancelling at 99 % buys nothing for
free, and a worker thread that dies leaves no job running for ever. Each ends with the books
balanced (ledger sums equal to the counters) and every job finished."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.audio import make_mp3
from tests.fixtures.gateway import (
    BlockingEngine,
    DyingEngine,
    MakeClient,
    audit,
    auth,
    credits,
    eventually,
    get_job,
    issue_code,
    services,
    submit,
    wait_for_job,
)
from transcription import jobfiles, ledger, lifecycle
from transcription.lifecycle import WORKER_LOST

#: Leases short enough that a dead worker's job is noticed within a second.
QUICK_LEASES = {"lease_seconds": 0.5}


@pytest.fixture
def mp3_100s(tmp_path: Path) -> Path:
    path = tmp_path / "hundred.mp3"
    make_mp3(path, 100)
    return path


def test_cancelling_at_99_percent_charges_what_was_transcribed_and_the_use_stays_spent(
    db_url: str, make_client: MakeClient, mp3_100s: Path
) -> None:
    """The issue's "submit an hour, cancel at 99 %, repeat": the cancel charges what was
    transcribed, so neither the single use nor the seconds come back for another go."""
    engine = BlockingEngine(hold_at=0.99)
    client = make_client(engine=engine, db_url=db_url)
    single = issue_code(client, seconds=150)
    job_id = submit(client, single.code, mp3_100s).json()["id"]

    def at_99() -> dict[str, Any] | None:
        job = get_job(client, single.code, job_id)
        return job if job["progress"] >= 0.99 else None

    job = eventually(at_99, what="the job reaching 99 %")
    assert (job["progress"], job["reserved_seconds"]) == (0.99, 101)  # 100.008 s of audio
    charge = math.ceil(0.99 * job["audio_seconds"])
    assert charge == 100
    response = client.delete(f"/v1/transcriptions/{job_id}", headers=auth(single.code))
    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["charged_seconds"] == charge
    assert (cancelled["text"], cancelled["transcript"]) == (None, None)
    balance = credits(client, single.code)
    assert (balance["spent_seconds"], balance["reserved_seconds"], balance["uses"]) == (
        charge,
        0,
        1,
    )
    assert balance["remaining_seconds"] == 150 - charge
    refused = submit(client, single.code, mp3_100s)
    assert (refused.status_code, refused.json()["error"]["code"]) == (402, "code_used")

    # With uses to spare, the seconds already charged stay charged: no second go for free.
    roomy = issue_code(client, seconds=150, max_uses=5)
    first = submit(client, roomy.code, mp3_100s).json()["id"]
    eventually(
        lambda: get_job(client, roomy.code, first)["progress"] >= 0.99, what="the second job"
    )
    assert client.delete(f"/v1/transcriptions/{first}", headers=auth(roomy.code)).status_code == 200
    again = submit(client, roomy.code, mp3_100s)
    assert (again.status_code, again.json()["error"]["code"]) == (402, "insufficient_credit")
    assert credits(client, roomy.code)["spent_seconds"] == charge

    engine.release()
    eventually(lambda: services(client).blobs.list("jobs") == [], what="the jobs' files going")
    jobs = audit(services(client).db)
    assert [jobs[j].charged_seconds for j in (job_id, first)] == [charge, charge]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_worker_thread_that_dies_is_replaced_and_its_job_runs_again_once(
    db_url: str, make_client: MakeClient, mp3_5s: Path
) -> None:
    engine = DyingEngine(deaths=1)  # SystemExit: the thread dies, nothing is recorded
    client = make_client(engine=engine, db_url=db_url, **QUICK_LEASES)
    issued = issue_code(client, max_uses=2)
    job_id = submit(client, issued.code, mp3_5s).json()["id"]

    done = wait_for_job(client, issued.code, job_id)
    assert (done["status"], done["charged_seconds"]) == ("succeeded", 6)
    assert len(engine.calls) == 2
    # The only worker died on the first call: the supervisor started the one that finished it.
    again = submit(client, issued.code, mp3_5s).json()["id"]
    assert wait_for_job(client, issued.code, again)["status"] == "succeeded"
    balance = credits(client, issued.code)
    assert (balance["spent_seconds"], balance["reserved_seconds"], balance["uses"]) == (12, 0, 2)
    jobs = audit(services(client).db)
    assert (jobs[job_id].attempts, jobs[again].attempts) == (2, 1)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_job_that_kills_every_worker_fails_worker_lost_and_is_refunded(
    db_url: str, make_client: MakeClient, mp3_5s: Path
) -> None:
    engine = DyingEngine(deaths=2)
    client = make_client(engine=engine, db_url=db_url, max_attempts=2, **QUICK_LEASES)
    issued = issue_code(client, seconds=60)
    job_id = submit(client, issued.code, mp3_5s).json()["id"]

    failed = wait_for_job(client, issued.code, job_id)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == WORKER_LOST
    assert "refunded" in failed["error"]["message"]
    assert (failed["charged_seconds"], failed["text"], failed["transcript"]) == (0, None, None)
    assert len(engine.calls) == 2
    balance = credits(client, issued.code)
    assert (balance["spent_seconds"], balance["reserved_seconds"], balance["uses"]) == (0, 0, 0)
    assert services(client).blobs.list(f"jobs/{job_id}") == []

    # The use came back, and a worker is there to run the next job.
    retry = submit(client, issued.code, mp3_5s)
    assert retry.status_code == 202, retry.text
    assert wait_for_job(client, issued.code, retry.json()["id"])["status"] == "succeeded"
    jobs = audit(services(client).db)
    assert (jobs[job_id].attempts, jobs[retry.json()["id"]].attempts) == (2, 1)


def test_a_queued_job_no_runner_was_told_about_still_runs(
    db_url: str, make_client: MakeClient, mp3_5s: Path
) -> None:
    """Level-based, not event-based: a job committed to the database whose hand-off to the
    runner was lost (another server sharing the database died with it in its queue) is found
    in the database and run, charged once."""
    client = make_client(db_url=db_url, **QUICK_LEASES)
    svc = services(client)
    code = issue_code(client)
    with svc.db.transaction() as session:
        record = ledger.authenticate(session, svc.code_key, code.code)
        job = lifecycle.submit(
            session,
            lifecycle.NewJob(
                code_id=record.id, audio_key=jobfiles.audio_key("tr_00000000000000aa"),
                audio_bytes=mp3_5s.stat().st_size, audio_seconds=5.0, filename="lost.mp3",
                language=None, prompt=None, mode="fast", engine="local", model=None,
                job_id="tr_00000000000000aa",
            ),
        )  # fmt: skip
    svc.blobs.put_file(job.audio_key, mp3_5s)
    done = wait_for_job(client, code.code, job.id)
    assert (done["status"], done["charged_seconds"]) == ("succeeded", 5)
    audit(svc.db)
