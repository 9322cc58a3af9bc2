"""The job lifecycle on SQLite and PostgreSQL: each transition moves credit at most once."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select, update

from tests.transcription.test_ledger import counters, issue, submit_job
from tests.transcription.test_ledger_concurrency import run_together
from transcription.db.models import Job, LedgerEntry, Transcript, utcnow
from transcription.db.session import Database
from transcription.lifecycle import Lifecycle, TranscriptRecord
from transcription.states import CreditState, JobStatus


def transcript(duration_seconds: float) -> TranscriptRecord:
    """What the pipeline reports after transcribing ``duration_seconds`` of speech."""
    return TranscriptRecord(
        text="Hello and welcome to the show.",
        language="en",
        duration_seconds=duration_seconds,
        segment_count=3,
        uris={"txt": "file:///blobs/jobs/x/transcript.txt"},
        model="tiny.en",
    )


def stored_transcripts(db: Database, job_id: str) -> list[Transcript]:
    with db.transaction() as session:
        return list(session.scalars(select(Transcript).where(Transcript.job_id == job_id)))


def settlements(db: Database, job_id: str) -> int:
    with db.transaction() as session:
        return (
            session.scalar(
                select(func.count())
                .select_from(LedgerEntry)
                .where(LedgerEntry.job_id == job_id, LedgerEntry.kind == "settle")
            )
            or 0
        )


def test_a_job_runs_to_success_and_is_charged_once(db: Database) -> None:
    """Submit, start, progress and succeed: the transcript is stored and the audio charged."""
    lifecycle = Lifecycle(db)
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 42.3)
    assert (job.status, job.reserved_seconds) == (JobStatus.QUEUED, 43)

    started = lifecycle.start(job.id)
    assert started is not None
    assert (started.status, started.attempts) == (JobStatus.RUNNING, 1)
    assert lifecycle.progress(job.id, 0.5) is True
    assert lifecycle.get(job.id).progress == 0.5

    done = lifecycle.succeed(job.id, transcript(41.2))
    assert done is not None
    assert (done.status, done.progress, done.credit_state) == (
        JobStatus.SUCCEEDED,
        1.0,
        CreditState.SETTLED,
    )
    assert done.charged_seconds == 42
    assert done.language == "en"
    [row] = stored_transcripts(db, job.id)
    assert (row.text, row.language, row.segment_count, row.model) == (
        "Hello and welcome to the show.",
        "en",
        3,
        "tiny.en",
    )
    assert row.uris == {"txt": "file:///blobs/jobs/x/transcript.txt"}
    assert counters(db, code_id) == {"budget": 100, "reserved": 0, "spent": 42, "uses": 1}

    assert lifecycle.succeed(job.id, transcript(10)) is None
    assert len(stored_transcripts(db, job.id)) == 1
    assert settlements(db, job.id) == 1
    assert lifecycle.get(job.id).charged_seconds == 42
    assert counters(db, code_id) == {"budget": 100, "reserved": 0, "spent": 42, "uses": 1}


def test_success_never_charges_more_than_the_audio(db: Database) -> None:
    """A transcript reporting more seconds than the upload is charged for the upload only."""
    lifecycle = Lifecycle(db)
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 42.3)
    lifecycle.start(job.id)
    done = lifecycle.succeed(job.id, transcript(500))
    assert done is not None
    assert done.charged_seconds == 43
    assert counters(db, code_id) == {"budget": 100, "reserved": 0, "spent": 43, "uses": 1}


def test_progress_is_refused_once_the_job_is_cancelled(db: Database) -> None:
    """A worker reporting progress on a cancelled job is told to stop and records nothing."""
    lifecycle = Lifecycle(db)
    job = submit_job(db, issue(db, 100).record.id, 30)
    lifecycle.start(job.id)
    assert lifecycle.progress(job.id, 0.25) is True
    cancelled = lifecycle.cancel(job.id)
    assert cancelled is not None
    assert cancelled.status == JobStatus.CANCELLED
    assert lifecycle.progress(job.id, 0.75) is False
    assert lifecycle.get(job.id).progress == 0.25


def test_cancelling_a_queued_job_refunds_it_and_returns_the_use(db: Database) -> None:
    """Cancelling before the job runs releases everything, so a single-use code works again."""
    lifecycle = Lifecycle(db)
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 30)
    cancelled = lifecycle.cancel(job.id)
    assert cancelled is not None
    assert (cancelled.status, cancelled.credit_state, cancelled.charged_seconds) == (
        JobStatus.CANCELLED,
        CreditState.RELEASED,
        0,
    )
    assert counters(db, code_id) == {"budget": 100, "reserved": 0, "spent": 0, "uses": 0}
    assert lifecycle.start(job.id) is None
    assert lifecycle.cancel(job.id) is None
    submit_job(db, code_id, 100)
    assert counters(db, code_id) == {"budget": 100, "reserved": 100, "spent": 0, "uses": 1}


def test_cancelling_after_success_changes_nothing(db: Database) -> None:
    """A finished job cannot be cancelled: its status, charge and transcript stay."""
    lifecycle = Lifecycle(db)
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 30)
    lifecycle.start(job.id)
    lifecycle.succeed(job.id, transcript(30))

    assert lifecycle.cancel(job.id) is None
    stored = lifecycle.get(job.id)
    assert (stored.status, stored.credit_state, stored.charged_seconds) == (
        JobStatus.SUCCEEDED,
        CreditState.SETTLED,
        30,
    )
    assert len(stored_transcripts(db, job.id)) == 1
    assert counters(db, code_id) == {"budget": 100, "reserved": 0, "spent": 30, "uses": 1}


def test_failure_releases_everything_and_keeps_the_error(db: Database) -> None:
    """A failed job charges nothing, gives the use back and says why it failed."""
    lifecycle = Lifecycle(db)
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 30)
    lifecycle.start(job.id)
    failed = lifecycle.fail(job.id, code="transcription_failed", message="The engine crashed.")
    assert failed is not None
    assert (failed.status, failed.credit_state, failed.charged_seconds) == (
        JobStatus.FAILED,
        CreditState.RELEASED,
        0,
    )
    assert (failed.error_code, failed.error_message) == (
        "transcription_failed",
        "The engine crashed.",
    )
    assert counters(db, code_id) == {"budget": 100, "reserved": 0, "spent": 0, "uses": 0}

    assert lifecycle.fail(job.id, code="other", message="Again.") is None
    assert lifecycle.succeed(job.id, transcript(30)) is None
    stored = lifecycle.get(job.id)
    assert (stored.status, stored.error_code) == (JobStatus.FAILED, "transcription_failed")
    assert counters(db, code_id) == {"budget": 100, "reserved": 0, "spent": 0, "uses": 0}


def test_requeue_puts_running_jobs_back_and_lists_the_queue_oldest_first(db: Database) -> None:
    """After a restart, interrupted jobs are queued again and the queue is in submission order."""
    lifecycle = Lifecycle(db)
    code_id = issue(db, 1000, max_uses=5).record.id
    newest, oldest, middle, done = (submit_job(db, code_id, 10).id for _ in range(4))
    base = utcnow() - timedelta(hours=1)
    with db.transaction() as session:
        for minutes, job_id in enumerate([oldest, middle, newest, done]):
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(created_at=base + timedelta(minutes=minutes))
            )
    for job_id in (oldest, middle, done):
        lifecycle.start(job_id)
    lifecycle.progress(middle, 0.6)
    lifecycle.succeed(done, transcript(10))

    assert lifecycle.requeue_interrupted() == [oldest, middle, newest]
    for job_id in (oldest, middle):
        stored = lifecycle.get(job_id)
        assert (stored.status, stored.progress, stored.credit_state) == (
            JobStatus.QUEUED,
            0.0,
            CreditState.HELD,
        )
    assert lifecycle.get(done).status == JobStatus.SUCCEEDED
    assert counters(db, code_id) == {"budget": 1000, "reserved": 30, "spent": 10, "uses": 4}
    assert lifecycle.start(oldest) is not None


def test_start_is_claimed_by_exactly_one_of_two_racing_callers(db: Database) -> None:
    """Two workers starting the same queued job at once: one gets it, the other gets None."""
    lifecycle = Lifecycle(db)
    code_id = issue(db, 1000, max_uses=5).record.id
    for _ in range(5):
        job_id = submit_job(db, code_id, 10).id
        claims = run_together(2, lambda _, job_id=job_id: lifecycle.start(job_id))
        winners = [claim for claim in claims if claim is not None]
        assert len(winners) == 1
        assert winners[0].status == JobStatus.RUNNING
        assert lifecycle.get(job_id).attempts == 1
