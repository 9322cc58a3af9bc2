"""The job lifecycle on SQLite and PostgreSQL: one way to succeed, the cancellation rules, leases,
and each transition moving credit at most once (the ledger always summing to the counters)."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from tests.transcription.test_ledger import counters, issue, new_job, submit_job
from tests.transcription.test_ledger_concurrency import run_together
from transcription import jobfiles
from transcription.blobstore import LocalBlobStore
from transcription.db.models import Job, LedgerEntry, Transcript, utcnow
from transcription.db.session import Database
from transcription.errors import UsesExhausted
from transcription.jobfiles import JobFiles, RunError, RunResult
from transcription.lifecycle import WORKER_LOST, Lifecycle, submit
from transcription.states import CreditState, JobStatus

LEASE = 30.0


@pytest.fixture
def blobs(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


@pytest.fixture
def lifecycle(db: Database, blobs: LocalBlobStore) -> Lifecycle:
    return Lifecycle(db, blobs)


def run_result(job_id: str, duration_seconds: float, **fields: object) -> RunResult:
    """What a run reports after transcribing ``duration_seconds`` of speech."""
    values: dict[str, object] = {
        "job_id": job_id,
        "outcome": "transcribed",
        "text": "Hello and welcome to the show.",
        "language": "en",
        "duration_seconds": duration_seconds,
        "segment_count": 3,
        "uris": {"txt": f"file:///blobs/jobs/{job_id}/transcript.txt"},
        "model": "tiny.en",
        "engine": "local",
        **fields,
    }
    return RunResult.model_validate(values)


def stored_transcripts(db: Database, job_id: str) -> list[Transcript]:
    with db.read() as session:
        return list(session.scalars(select(Transcript).where(Transcript.job_id == job_id)))


def entries(db: Database, job_id: str, kind: str) -> int:
    with db.read() as session:
        return (
            session.scalar(
                select(func.count())
                .select_from(LedgerEntry)
                .where(LedgerEntry.job_id == job_id, LedgerEntry.kind == kind)
            )
            or 0
        )


def credit(job: Job) -> tuple[JobStatus, CreditState, int | None]:
    return (job.status, job.credit_state, job.charged_seconds)


# --- finishing: the one way a job succeeds ---------------------------------------------------


def test_a_job_runs_to_success_and_is_charged_once(db: Database, lifecycle: Lifecycle) -> None:
    """Submit, start, progress and finish: the transcript appears, the audio measured at upload
    is charged once (a run that reports less pays no less), and replaying the finish changes
    nothing."""
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 42.3)
    assert (job.status, job.reserved_seconds) == (JobStatus.QUEUED, 43)

    started = lifecycle.start(job.id, lease_owner="worker-a", lease_seconds=LEASE)
    assert started is not None
    assert (started.status, started.attempts, started.lease_owner) == (
        JobStatus.RUNNING,
        1,
        "worker-a",
    )
    assert lifecycle.progress(job.id, 0.5) is True
    assert lifecycle.get(job.id).progress == 0.5
    assert lifecycle.transcript(job.id) is None, "no text before the job succeeded"

    done = lifecycle.finish(job.id, run_result(job.id, 41.2), lease_owner="worker-a")
    assert done is not None
    assert credit(done) == (JobStatus.SUCCEEDED, CreditState.SETTLED, 43)
    assert (done.progress, done.language, done.lease_owner, done.lease_expires_at) == (
        1.0,
        "en",
        None,
        None,
    )
    assert done.completed_at is not None
    [row] = stored_transcripts(db, job.id)
    assert (row.text, row.language, row.segment_count, row.model) == (
        "Hello and welcome to the show.",
        "en",
        3,
        "tiny.en",
    )
    assert row.uris == {"txt": f"file:///blobs/jobs/{job.id}/transcript.txt"}
    visible = lifecycle.transcript(job.id)
    assert visible is not None and visible.id == row.id
    assert counters(db, code_id) == {"budget": 100, "reserved": 0, "spent": 43, "uses": 1}

    # A replay (the operator finishing again, a second worker) is a no-op.
    assert lifecycle.finish(job.id, run_result(job.id, 10)) is None
    assert lifecycle.finish(job.id, run_result(job.id, 10), lease_owner="worker-a") is None
    assert len(stored_transcripts(db, job.id)) == 1
    assert entries(db, job.id, "settle") == 1
    assert credit(lifecycle.get(job.id)) == (JobStatus.SUCCEEDED, CreditState.SETTLED, 43)
    assert counters(db, code_id) == {"budget": 100, "reserved": 0, "spent": 43, "uses": 1}


def test_a_queued_job_can_finish(db: Database, lifecycle: Lifecycle) -> None:
    """In the cluster a Job may end before the operator saw it running: finish still works."""
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 30)
    done = lifecycle.finish(job.id, run_result(job.id, 30))
    assert done is not None
    assert credit(done) == (JobStatus.SUCCEEDED, CreditState.SETTLED, 30)
    assert counters(db, code_id) == {"budget": 100, "reserved": 0, "spent": 30, "uses": 1}


def test_finishing_never_charges_more_than_the_audio(db: Database, lifecycle: Lifecycle) -> None:
    """A run reporting more seconds than the upload is charged for the upload only."""
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 42.3)
    lifecycle.start(job.id)
    done = lifecycle.finish(job.id, run_result(job.id, 500))
    assert done is not None and done.charged_seconds == 43
    assert counters(db, code_id) == {"budget": 100, "reserved": 0, "spent": 43, "uses": 1}


def test_the_detected_language_fills_in_only_a_missing_one(
    db: Database, lifecycle: Lifecycle
) -> None:
    code_id = issue(db, 100, max_uses=2).record.id
    with db.transaction() as session:
        asked = submit(session, replace(new_job(code_id, 10), language="fr"))
    done = lifecycle.finish(asked.id, run_result(asked.id, 10, language="en"))
    assert done is not None and done.language == "fr"
    unknown = submit_job(db, code_id, 10)
    done = lifecycle.finish(unknown.id, run_result(unknown.id, 10, language=None))
    assert done is not None and done.language is None
    assert stored_transcripts(db, unknown.id)[0].language is None


def test_a_rejected_run_cannot_finish_a_job(db: Database, lifecycle: Lifecycle) -> None:
    """Only a transcript makes a job succeed; a rejected run's result is refused outright."""
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 30)
    lifecycle.start(job.id)
    rejected = RunResult(
        job_id=job.id,
        outcome="rejected",
        error=RunError(code="audio_undecodable", message="The audio could not be decoded."),
    )
    with pytest.raises(ValueError, match="rejected"):
        lifecycle.finish(job.id, rejected)
    assert credit(lifecycle.get(job.id)) == (JobStatus.RUNNING, CreditState.HELD, None)
    assert stored_transcripts(db, job.id) == []
    assert counters(db, code_id) == {"budget": 100, "reserved": 30, "spent": 0, "uses": 1}


def test_finish_and_fail_racing_finish_the_job_once(db: Database, lifecycle: Lifecycle) -> None:
    """A finish racing a failure (or a cancel) on the same job: exactly one of them wins."""
    code_id = issue(db, 10_000, max_uses=20).record.id
    for _ in range(6):
        job_id = submit_job(db, code_id, 10).id
        lifecycle.start(job_id)

        def act(index: int, job_id: str = job_id) -> Job | None:
            if index == 0:
                return lifecycle.finish(job_id, run_result(job_id, 10))
            if index == 1:
                return lifecycle.fail(job_id, code="engine_error", message="It broke.")
            return lifecycle.cancel(job_id)

        winners = [job for job in run_together(3, act) if job is not None]
        assert len(winners) == 1
        stored = lifecycle.get(job_id)
        assert stored.status == winners[0].status
        assert entries(db, job_id, "settle") + entries(db, job_id, "release") == 1
        assert len(stored_transcripts(db, job_id)) == int(stored.status == JobStatus.SUCCEEDED)
    counters(db, code_id)


# --- cancelling -----------------------------------------------------------------------------


def test_progress_is_refused_once_the_job_is_cancelled(db: Database, lifecycle: Lifecycle) -> None:
    """A worker reporting progress on a cancelled job is told to stop and records nothing."""
    job = submit_job(db, issue(db, 100).record.id, 30)
    lifecycle.start(job.id)
    assert lifecycle.progress(job.id, 0.25) is True
    cancelled = lifecycle.cancel(job.id)
    assert cancelled is not None
    assert credit(cancelled) == (JobStatus.CANCELLED, CreditState.SETTLED, 8)
    assert lifecycle.progress(job.id, 0.75) is False
    assert lifecycle.get(job.id).progress == 0.25


def test_cancelling_a_queued_job_refunds_it_and_returns_the_use(
    db: Database, lifecycle: Lifecycle
) -> None:
    """Cancelling before the job runs releases everything, so a single-use code works again."""
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 30)
    cancelled = lifecycle.cancel(job.id)
    assert cancelled is not None
    assert credit(cancelled) == (JobStatus.CANCELLED, CreditState.RELEASED, 0)
    assert counters(db, code_id) == {"budget": 100, "reserved": 0, "spent": 0, "uses": 0}
    assert lifecycle.start(job.id) is None
    assert lifecycle.cancel(job.id) is None
    assert lifecycle.finish(job.id, run_result(job.id, 30)) is None
    assert stored_transcripts(db, job.id) == []
    submit_job(db, code_id, 100)
    assert counters(db, code_id) == {"budget": 100, "reserved": 100, "spent": 0, "uses": 1}


def test_cancelling_a_running_job_charges_what_was_transcribed(
    db: Database, lifecycle: Lifecycle
) -> None:
    """Cancelled at 52 % of 600 s: ceil(0.52 * 600) = 312 s are charged, the rest released,
    and the use stays spent, so a single-use code cannot start another job."""
    code_id = issue(db, 1000).record.id
    job = submit_job(db, code_id, 600)
    lifecycle.start(job.id, lease_owner="worker-a", lease_seconds=LEASE)
    assert lifecycle.progress(job.id, 0.52) is True

    cancelled = lifecycle.cancel(job.id)
    assert cancelled is not None
    assert credit(cancelled) == (JobStatus.CANCELLED, CreditState.SETTLED, math.ceil(0.52 * 600))
    assert cancelled.charged_seconds == 312
    assert (cancelled.lease_owner, cancelled.lease_expires_at) == (None, None)
    assert counters(db, code_id) == {"budget": 1000, "reserved": 0, "spent": 312, "uses": 1}
    assert (entries(db, job.id, "settle"), entries(db, job.id, "release")) == (1, 0)
    assert stored_transcripts(db, job.id) == []

    with pytest.raises(UsesExhausted) as refused:
        submit_job(db, code_id, 10)
    assert refused.value.code == "code_used"
    assert lifecycle.cancel(job.id) is None
    assert lifecycle.renew(job.id, "worker-a", LEASE) is False
    assert lifecycle.finish(job.id, run_result(job.id, 600), lease_owner="worker-a") is None
    assert counters(db, code_id) == {"budget": 1000, "reserved": 0, "spent": 312, "uses": 1}


def test_cancel_at_99_percent_is_charged_and_the_code_is_spent(
    db: Database, lifecycle: Lifecycle
) -> None:
    """The reproduction from issue 11: submit an hour, cancel at 99 %, submit again. The
    cancellation charges at least 99 % of the audio, and the single-use code is used up."""
    code_id = issue(db, 3600).record.id
    job = submit_job(db, code_id, 3600)
    lifecycle.start(job.id, lease_owner="worker-a", lease_seconds=LEASE)
    assert lifecycle.progress(job.id, 0.99) is True

    cancelled = lifecycle.cancel(job.id)
    assert cancelled is not None
    assert cancelled.charged_seconds is not None
    assert cancelled.charged_seconds >= 0.99 * 3600
    assert counters(db, code_id)["spent"] == cancelled.charged_seconds
    with pytest.raises(UsesExhausted):
        submit_job(db, code_id, 1)
    assert counters(db, code_id) == {
        "budget": 3600,
        "reserved": 0,
        "spent": cancelled.charged_seconds,
        "uses": 1,
    }


def test_cancel_trusts_the_progress_record_when_it_is_ahead(
    db: Database, lifecycle: Lifecycle, blobs: LocalBlobStore
) -> None:
    """In the cluster the transcriber writes progress to the blob store before it reaches the
    database: a cancel charges the seconds the record says were done."""
    code_id = issue(db, 1000).record.id
    job = submit_job(db, code_id, 600)
    lifecycle.start(job.id)
    lifecycle.progress(job.id, 0.1)
    JobFiles(blobs).write_progress(job.id, 0.5, 330.2)

    cancelled = lifecycle.cancel(job.id)
    assert cancelled is not None
    assert credit(cancelled) == (JobStatus.CANCELLED, CreditState.SETTLED, 331)
    assert counters(db, code_id) == {"budget": 1000, "reserved": 0, "spent": 331, "uses": 1}


def test_cancel_uses_the_records_fraction_and_never_charges_past_the_reservation(
    db: Database, lifecycle: Lifecycle, blobs: LocalBlobStore
) -> None:
    code_id = issue(db, 1000, max_uses=2).record.id
    by_fraction = submit_job(db, code_id, 200)
    lifecycle.start(by_fraction.id)
    JobFiles(blobs).write_progress(by_fraction.id, 0.75, 0)
    cancelled = lifecycle.cancel(by_fraction.id)
    assert cancelled is not None and cancelled.charged_seconds == 150

    overreported = submit_job(db, code_id, 99.5)
    lifecycle.start(overreported.id)
    JobFiles(blobs).write_progress(overreported.id, 1.0, 10_000)
    cancelled = lifecycle.cancel(overreported.id)
    assert cancelled is not None and cancelled.charged_seconds == 100
    assert counters(db, code_id) == {"budget": 1000, "reserved": 0, "spent": 250, "uses": 2}


def test_a_job_still_queued_in_the_database_but_transcribing_is_charged_on_cancel(
    db: Database, lifecycle: Lifecycle, blobs: LocalBlobStore
) -> None:
    code_id = issue(db, 3600).record.id
    job = submit_job(db, code_id, 3600)
    JobFiles(blobs).write_progress(job.id, 0.99, 3564)  # the pod ran; the operator did not look
    cancelled = lifecycle.cancel(job.id)
    assert cancelled is not None and cancelled.charged_seconds is not None
    assert cancelled.charged_seconds >= 0.99 * 3600
    assert counters(db, code_id)["uses"] == 1


def test_cancel_ignores_an_unreadable_progress_record(
    db: Database, lifecycle: Lifecycle, blobs: LocalBlobStore
) -> None:
    """A record cut short by a crash reads as absent: the database's progress is charged."""
    code_id = issue(db, 1000).record.id
    job = submit_job(db, code_id, 100)
    lifecycle.start(job.id)
    lifecycle.progress(job.id, 0.2)
    blobs.put_bytes(jobfiles.progress_key(job.id), b'{"fraction": 0.9, "seconds_d')
    cancelled = lifecycle.cancel(job.id)
    assert cancelled is not None and cancelled.charged_seconds == 20


def test_cancelling_after_success_changes_nothing(db: Database, lifecycle: Lifecycle) -> None:
    """A finished job cannot be cancelled: its status, charge and transcript stay."""
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 30)
    lifecycle.start(job.id)
    lifecycle.finish(job.id, run_result(job.id, 30))
    before = counters(db, code_id)

    assert lifecycle.cancel(job.id) is None
    assert credit(lifecycle.get(job.id)) == (JobStatus.SUCCEEDED, CreditState.SETTLED, 30)
    assert len(stored_transcripts(db, job.id)) == 1
    assert (
        counters(db, code_id)
        == before
        == {
            "budget": 100,
            "reserved": 0,
            "spent": 30,
            "uses": 1,
        }
    )


def test_failure_releases_everything_and_keeps_the_error(
    db: Database, lifecycle: Lifecycle
) -> None:
    """A failed job charges nothing, gives the use back and says why it failed."""
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 30)
    lifecycle.start(job.id)
    lifecycle.progress(job.id, 0.9)
    failed = lifecycle.fail(job.id, code="transcription_failed", message="The engine crashed.")
    assert failed is not None
    assert credit(failed) == (JobStatus.FAILED, CreditState.RELEASED, 0)
    assert (failed.error_code, failed.error_message) == (
        "transcription_failed",
        "The engine crashed.",
    )
    assert counters(db, code_id) == {"budget": 100, "reserved": 0, "spent": 0, "uses": 0}

    assert lifecycle.fail(job.id, code="other", message="Again.") is None
    assert lifecycle.finish(job.id, run_result(job.id, 30)) is None
    assert lifecycle.cancel(job.id) is None
    stored = lifecycle.get(job.id)
    assert (stored.status, stored.error_code) == (JobStatus.FAILED, "transcription_failed")
    assert stored_transcripts(db, job.id) == []
    assert counters(db, code_id) == {"budget": 100, "reserved": 0, "spent": 0, "uses": 0}


def test_a_long_error_message_is_cut_to_fit(db: Database, lifecycle: Lifecycle) -> None:
    job = submit_job(db, issue(db, 100).record.id, 30)
    failed = lifecycle.fail(job.id, code="engine_error", message="x" * 10_000)
    assert failed is not None and failed.error_message == "x" * 2000


# --- leases ---------------------------------------------------------------------------------


def test_an_expired_lease_puts_the_job_back_in_the_queue(
    db: Database, lifecycle: Lifecycle
) -> None:
    """A worker that stops renewing loses the job: it is queued again with its credit held,
    and the lost worker can no longer finish, fail or renew it."""
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 30)
    lifecycle.start(job.id, lease_owner="worker-a", lease_seconds=LEASE)
    lifecycle.progress(job.id, 0.4)

    assert lifecycle.expire_leases(3) == [], "the lease has not expired yet"
    later = utcnow() + timedelta(seconds=LEASE + 1)
    assert lifecycle.expire_leases(3, now=later) == [job.id]
    stored = lifecycle.get(job.id)
    assert (stored.status, stored.progress, stored.lease_owner, stored.lease_expires_at) == (
        JobStatus.QUEUED,
        0.0,
        None,
        None,
    )
    assert (stored.credit_state, stored.attempts) == (CreditState.HELD, 1)
    assert counters(db, code_id) == {"budget": 100, "reserved": 30, "spent": 0, "uses": 1}
    assert lifecycle.expire_leases(3, now=later) == []
    assert lifecycle.queued_ids() == [job.id]

    assert lifecycle.renew(job.id, "worker-a", LEASE) is False
    assert lifecycle.finish(job.id, run_result(job.id, 30), lease_owner="worker-a") is None
    assert lifecycle.fail(job.id, code="x", message="late", lease_owner="worker-a") is None

    again = lifecycle.start(job.id, lease_owner="worker-b", lease_seconds=LEASE)
    assert again is not None and (again.attempts, again.lease_owner) == (2, "worker-b")
    done = lifecycle.finish(job.id, run_result(job.id, 30), lease_owner="worker-b")
    assert done is not None and credit(done) == (JobStatus.SUCCEEDED, CreditState.SETTLED, 30)
    assert counters(db, code_id) == {"budget": 100, "reserved": 0, "spent": 30, "uses": 1}


def test_a_job_out_of_attempts_fails_as_worker_lost_and_is_refunded(
    db: Database, lifecycle: Lifecycle
) -> None:
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 30)
    far = timedelta(seconds=LEASE + 1)
    for attempt in (1, 2):
        started = lifecycle.start(job.id, lease_owner=f"worker-{attempt}", lease_seconds=LEASE)
        assert started is not None and started.attempts == attempt
        assert lifecycle.expire_leases(3, now=utcnow() + far) == [job.id]
    lifecycle.start(job.id, lease_owner="worker-3", lease_seconds=LEASE)

    assert lifecycle.expire_leases(3, now=utcnow() + far) == []
    failed = lifecycle.get(job.id)
    assert credit(failed) == (JobStatus.FAILED, CreditState.RELEASED, 0)
    assert failed.error_code == WORKER_LOST
    assert failed.error_message is not None and "refunded" in failed.error_message
    assert (failed.attempts, failed.lease_owner) == (3, None)
    assert counters(db, code_id) == {"budget": 100, "reserved": 0, "spent": 0, "uses": 0}
    assert lifecycle.expire_leases(3, now=utcnow() + far) == []
    assert entries(db, job.id, "release") == 1


def test_expiry_leaves_live_leases_and_leaseless_jobs_alone(
    db: Database, lifecycle: Lifecycle
) -> None:
    """Only a running job whose lease ran out is taken back: a renewed lease, a job the operator
    runs (no lease) and a queued job stay as they are."""
    code_id = issue(db, 1000, max_uses=5).record.id
    renewed, leaseless, queued = (submit_job(db, code_id, 10).id for _ in range(3))
    lifecycle.start(renewed, lease_owner="worker-a", lease_seconds=1)
    lifecycle.start(leaseless)
    soon = utcnow() + timedelta(seconds=5)
    assert lifecycle.renew(renewed, "worker-a", LEASE) is True
    assert lifecycle.renew(renewed, "worker-b", LEASE) is False
    assert lifecycle.expire_leases(1, now=soon) == []
    assert [lifecycle.get(j).status for j in (renewed, leaseless, queued)] == [
        JobStatus.RUNNING,
        JobStatus.RUNNING,
        JobStatus.QUEUED,
    ]
    assert lifecycle.renew(leaseless, "worker-a", LEASE) is False


def test_a_database_owner_takes_back_leaseless_running_jobs_too(
    db: Database, lifecycle: Lifecycle
) -> None:
    """``unleased``: the only process on a database knows a running job without a lease has no
    worker (it was left by a server older than leases); out of attempts it fails instead."""
    code_id = issue(db, 1000, max_uses=5).record.id
    leaseless, spent, live = (submit_job(db, code_id, 10).id for _ in range(3))
    lifecycle.start(leaseless)
    for _ in range(2):
        lifecycle.begin_attempt(spent)
    lifecycle.start(spent)
    lifecycle.start(live, lease_owner="worker-a", lease_seconds=LEASE)

    assert lifecycle.expire_leases(2, unleased=True) == [leaseless]
    assert lifecycle.get(leaseless).status == JobStatus.QUEUED
    failed = lifecycle.get(spent)
    assert (failed.status, failed.error_code) == (JobStatus.FAILED, WORKER_LOST)
    assert lifecycle.get(live).status == JobStatus.RUNNING
    assert counters(db, code_id) == {"budget": 1000, "reserved": 20, "spent": 0, "uses": 2}


def test_a_renewed_lease_is_not_taken_back(db: Database, lifecycle: Lifecycle) -> None:
    """Expiry takes a job only if its lease is still the expired one it saw: the worker that
    renewed meanwhile (or a new worker that started it) keeps it."""
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 30)
    lifecycle.start(job.id, lease_owner="worker-a", lease_seconds=LEASE)
    later = utcnow() + timedelta(seconds=LEASE + 1)
    with db.transaction() as session:
        # The worker renewed past ``later`` after the check's clock was read.
        session.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(lease_expires_at=later + timedelta(seconds=LEASE))
        )
    assert lifecycle.expire_leases(1, now=later) == []
    stored = lifecycle.get(job.id)
    assert (stored.status, stored.lease_owner) == (JobStatus.RUNNING, "worker-a")


def test_progress_from_a_worker_that_lost_the_job_is_refused(
    db: Database, lifecycle: Lifecycle
) -> None:
    job = submit_job(db, issue(db, 100).record.id, 30)
    lifecycle.start(job.id, lease_owner="worker-a", lease_seconds=LEASE)
    assert lifecycle.progress(job.id, 0.3, lease_owner="worker-a") is True
    assert lifecycle.progress(job.id, 0.9, lease_owner="worker-b") is False
    assert lifecycle.get(job.id).progress == 0.3
    lifecycle.expire_leases(3, now=utcnow() + timedelta(seconds=LEASE + 1))
    lifecycle.start(job.id, lease_owner="worker-b", lease_seconds=LEASE)
    assert lifecycle.progress(job.id, 0.9, lease_owner="worker-a") is False
    assert lifecycle.progress(job.id, 0.1, lease_owner="worker-b") is True
    assert lifecycle.get(job.id).progress == 0.1


def test_only_the_lease_holder_can_finish_or_fail_a_job(db: Database, lifecycle: Lifecycle) -> None:
    code_id = issue(db, 100, max_uses=2).record.id
    job = submit_job(db, code_id, 30)
    lifecycle.start(job.id, lease_owner="worker-a", lease_seconds=LEASE)

    assert lifecycle.finish(job.id, run_result(job.id, 30), lease_owner="worker-b") is None
    assert lifecycle.fail(job.id, code="x", message="not mine", lease_owner="worker-b") is None
    assert credit(lifecycle.get(job.id)) == (JobStatus.RUNNING, CreditState.HELD, None)
    assert stored_transcripts(db, job.id) == []

    failed = lifecycle.fail(job.id, code="engine_error", message="Mine.", lease_owner="worker-a")
    assert failed is not None and credit(failed) == (JobStatus.FAILED, CreditState.RELEASED, 0)

    other = submit_job(db, code_id, 30)
    lifecycle.start(other.id, lease_owner="worker-a", lease_seconds=LEASE)
    done = lifecycle.finish(other.id, run_result(other.id, 30), lease_owner="worker-a")
    assert done is not None and done.status == JobStatus.SUCCEEDED
    assert counters(db, code_id) == {"budget": 100, "reserved": 0, "spent": 30, "uses": 1}


def test_renewing_fails_once_the_job_is_cancelled(db: Database, lifecycle: Lifecycle) -> None:
    job = submit_job(db, issue(db, 100).record.id, 30)
    started = lifecycle.start(job.id, lease_owner="worker-a", lease_seconds=LEASE)
    assert started is not None and started.lease_expires_at is not None
    assert lifecycle.renew(job.id, "worker-a", 3 * LEASE) is True
    renewed = lifecycle.get(job.id).lease_expires_at
    assert renewed is not None and renewed > started.lease_expires_at
    lifecycle.cancel(job.id)
    assert lifecycle.renew(job.id, "worker-a", LEASE) is False


def test_attempts_count_each_start_with_a_lease_and_each_job_created(
    db: Database, lifecycle: Lifecycle
) -> None:
    """The embedded worker counts an attempt when it takes a lease; the operator counts one
    each time it creates a Job (``begin_attempt``); a finished job counts no more."""
    code_id = issue(db, 100, max_uses=2).record.id
    job = submit_job(db, code_id, 30)
    assert lifecycle.begin_attempt(job.id) == 1
    started = lifecycle.start(job.id)
    assert started is not None and started.attempts == 1
    assert lifecycle.begin_attempt(job.id) == 2
    lifecycle.finish(job.id, run_result(job.id, 30))
    assert lifecycle.begin_attempt(job.id) is None
    assert lifecycle.get(job.id).attempts == 2


# --- queue ----------------------------------------------------------------------------------


def test_the_queue_and_the_unfinished_jobs_are_listed_oldest_first(
    db: Database, lifecycle: Lifecycle
) -> None:
    code_id = issue(db, 1000, max_uses=5).record.id
    newest, oldest, middle, done, running = (submit_job(db, code_id, 10).id for _ in range(5))
    base = utcnow() - timedelta(hours=1)
    with db.transaction() as session:
        for minutes, job_id in enumerate([oldest, running, middle, done, newest]):
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(created_at=base + timedelta(minutes=minutes))
            )
    lifecycle.start(running, lease_owner="worker-a", lease_seconds=LEASE)
    lifecycle.finish(done, run_result(done, 10))

    assert lifecycle.queued_ids() == [oldest, middle, newest]
    assert [job.id for job in lifecycle.unfinished()] == [oldest, running, middle, newest]
    assert counters(db, code_id) == {"budget": 1000, "reserved": 40, "spent": 10, "uses": 5}


def test_start_is_claimed_by_exactly_one_of_two_racing_workers(
    db: Database, lifecycle: Lifecycle
) -> None:
    """Two workers starting the same queued job at once: one gets it, the other gets None."""
    code_id = issue(db, 1000, max_uses=5).record.id
    for _ in range(5):
        job_id = submit_job(db, code_id, 10).id

        def take(index: int, job_id: str = job_id) -> Job | None:
            return lifecycle.start(job_id, lease_owner=f"worker-{index}", lease_seconds=LEASE)

        claims = run_together(2, take)
        winners = [claim for claim in claims if claim is not None]
        assert len(winners) == 1
        assert winners[0].status == JobStatus.RUNNING
        stored = lifecycle.get(job_id)
        assert (stored.attempts, stored.lease_owner) == (1, winners[0].lease_owner)


def test_mark_deleted_forgets_the_transcript_and_keeps_the_books(
    db: Database, lifecycle: Lifecycle
) -> None:
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 30)
    lifecycle.finish(job.id, run_result(job.id, 30))
    deleted = lifecycle.mark_deleted(job.id)
    assert deleted.deleted_at is not None
    assert lifecycle.transcript(job.id) is None
    again = lifecycle.mark_deleted(job.id)
    assert again.deleted_at == deleted.deleted_at
    assert credit(lifecycle.get(job.id)) == (JobStatus.SUCCEEDED, CreditState.SETTLED, 30)
    assert counters(db, code_id) == {"budget": 100, "reserved": 0, "spent": 30, "uses": 1}
