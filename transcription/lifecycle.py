"""Every job state transition and credit movement, each in one durable transaction.

Both runners (the local pool and the Kubernetes operator) call these functions; a transition is
a conditional ``UPDATE`` on the job's status, so a replayed or racing call changes nothing.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from transcription import ledger
from transcription.db.models import Job, Transcript, utcnow
from transcription.db.session import Database
from transcription.errors import NotFound
from transcription.states import TRANSITIONS, CreditState, JobStatus

log = logging.getLogger(__name__)

JOB_ID_PREFIX = "tr_"
TRANSCRIPT_ID_PREFIX = "ts_"


@dataclass(frozen=True)
class NewJob:
    """What the gateway knows about a validated upload when it submits a job."""

    code_id: str
    audio_key: str
    audio_bytes: int
    audio_seconds: float
    filename: str | None
    language: str | None
    prompt: str | None
    mode: str
    engine: str
    model: str | None
    job_id: str | None = None


@dataclass(frozen=True)
class TranscriptRecord:
    """A finished transcript as the pipeline stored it."""

    text: str
    language: str | None
    duration_seconds: float
    segment_count: int
    uris: dict[str, str]
    model: str | None


def new_job_id() -> str:
    return ledger.new_id(JOB_ID_PREFIX)


def audio_key(job_id: str) -> str:
    return f"jobs/{job_id}/audio.mp3"


def transcript_key(job_id: str, fmt: str) -> str:
    return f"jobs/{job_id}/transcript.{fmt}"


def _transition(session: Session, job_id: str, to: JobStatus, **values: object) -> Job | None:
    """Move the job to ``to`` if its status allows it; None when it does not (a no-op)."""
    allowed = [s.value for s in TRANSITIONS[to]]
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(allowed))
        .values(status=to.value, updated_at=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    job = session.get(Job, job_id)
    assert job is not None
    session.refresh(job)
    return job


def _add_transcript(session: Session, job_id: str, transcript: TranscriptRecord) -> Transcript:
    row = Transcript(
        id=ledger.new_id(TRANSCRIPT_ID_PREFIX),
        job_id=job_id,
        text=transcript.text,
        language=transcript.language,
        duration_seconds=transcript.duration_seconds,
        segment_count=transcript.segment_count,
        uris=transcript.uris,
        model=transcript.model,
    )
    session.add(row)
    session.flush()
    return row


def _settle_success(session: Session, job: Job, transcript: Transcript) -> Job:
    """Charge the audio transcribed (never more than was measured) and release the rest."""
    charged = math.ceil(min(transcript.duration_seconds, job.audio_seconds) - 1e-6)
    ledger.settle(session, job.id, max(charged, 0))
    if transcript.language and not job.language:
        job.language = transcript.language
    session.flush()
    session.refresh(job)
    log.info("job %s succeeded, charged %s s", job.id, job.charged_seconds)
    return job


def submit(session: Session, new: NewJob) -> Job:
    """Create a queued job and reserve its credit in the caller's transaction."""
    job = queued_job(new)
    ledger.reserve(session, job)
    return job


def queued_job(new: NewJob) -> Job:
    """The row a submission inserts: queued, its credit held, not yet in any session."""
    return Job(
        id=new.job_id or new_job_id(),
        code_id=new.code_id,
        status=JobStatus.QUEUED.value,
        credit_state=CreditState.HELD.value,
        progress=0.0,
        filename=new.filename,
        audio_key=new.audio_key,
        audio_bytes=new.audio_bytes,
        audio_seconds=new.audio_seconds,
        reserved_seconds=ledger.seconds_to_reserve(new.audio_seconds),
        language=new.language,
        prompt=new.prompt,
        mode=new.mode,
        engine=new.engine,
        model=new.model,
        attempts=0,
    )


class Lifecycle:
    """The job state machine over one database; each method is its own transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self, job_id: str) -> Job:
        with self.db.transaction() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise NotFound(f"No transcription with ID {job_id!r}.", param="id")
            return job

    def start(self, job_id: str) -> Job | None:
        """Claim a queued job for running; None if it is not queued (taken or cancelled)."""
        with self.db.transaction() as session:
            return _transition(
                session, job_id, JobStatus.RUNNING, started_at=utcnow(), attempts=Job.attempts + 1
            )

    def progress(self, job_id: str, fraction: float) -> bool:
        """Record progress; False once the job is no longer running, so the worker can stop."""
        fraction = min(max(fraction, 0.0), 1.0)
        with self.db.transaction() as session:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value)
                .values(progress=fraction, updated_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            return result.rowcount == 1  # type: ignore[attr-defined]

    def claim(self, job_id: str) -> Job | None:
        """Start a queued job or take over a running one (a retried pod); None once finished."""
        with self.db.transaction() as session:
            result = session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]),
                )
                .values(
                    status=JobStatus.RUNNING.value,
                    started_at=func.coalesce(Job.started_at, utcnow()),
                    attempts=Job.attempts + 1,
                    updated_at=utcnow(),
                )
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return None
            job = session.get(Job, job_id)
            assert job is not None
            session.refresh(job)
            return job

    def record_transcript(self, job_id: str, transcript: TranscriptRecord) -> Transcript | None:
        """Store a running job's transcript row without finishing it; a second call keeps the first.

        The Kubernetes runner splits success in two: the transcriber records, the operator
        completes. None if the job is no longer running (cancelled meanwhile).
        """
        try:
            with self.db.transaction() as session:
                job = session.get(Job, job_id)
                if job is None or job.status != JobStatus.RUNNING.value:
                    return None
                existing = session.scalar(select(Transcript).where(Transcript.job_id == job_id))
                if existing is not None:
                    return existing
                return _add_transcript(session, job_id, transcript)
        except IntegrityError:
            # A second pod of the same Job recorded it first; its transcript stands.
            with self.db.transaction() as session:
                return session.scalar(select(Transcript).where(Transcript.job_id == job_id))

    def transcript(self, job_id: str) -> Transcript | None:
        with self.db.transaction() as session:
            return session.scalar(select(Transcript).where(Transcript.job_id == job_id))

    def complete(self, job_id: str) -> Job | None:
        """Finish a job whose transcript is recorded and settle its credit; None if it cannot."""
        with self.db.transaction() as session:
            transcript = session.scalar(select(Transcript).where(Transcript.job_id == job_id))
            if transcript is None:
                return None
            job = _transition(
                session, job_id, JobStatus.SUCCEEDED, progress=1.0, completed_at=utcnow()
            )
            if job is None:
                return None
            return _settle_success(session, job, transcript)

    def succeed(self, job_id: str, transcript: TranscriptRecord) -> Job | None:
        """Record the transcript, mark the job done and settle its credit, atomically."""
        with self.db.transaction() as session:
            job = _transition(
                session, job_id, JobStatus.SUCCEEDED, progress=1.0, completed_at=utcnow()
            )
            if job is None:
                return None
            return _settle_success(session, job, _add_transcript(session, job_id, transcript))

    def fail(self, job_id: str, *, code: str, message: str) -> Job | None:
        """Mark the job failed and release its whole reservation."""
        with self.db.transaction() as session:
            job = _transition(
                session,
                job_id,
                JobStatus.FAILED,
                completed_at=utcnow(),
                error_code=code,
                error_message=message[:2000],
            )
            if job is None:
                return None
            ledger.release(session, job_id)
            session.refresh(job)
            log.warning("job %s failed: %s", job_id, code)
            return job

    def cancel(self, job_id: str) -> Job | None:
        """Cancel an unfinished job and release its credit; None if it had already finished."""
        with self.db.transaction() as session:
            job = _transition(session, job_id, JobStatus.CANCELLED, completed_at=utcnow())
            if job is None:
                return None
            ledger.release(session, job_id)
            session.refresh(job)
            return job

    def requeue_interrupted(self) -> list[str]:
        """Put jobs left running by a stopped process back in the queue; return all queued IDs."""
        with self.db.transaction() as session:
            session.execute(
                update(Job)
                .where(Job.status == JobStatus.RUNNING.value)
                .values(status=JobStatus.QUEUED.value, progress=0.0, updated_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            return list(
                session.scalars(
                    select(Job.id)
                    .where(Job.status == JobStatus.QUEUED.value)
                    .order_by(Job.created_at, Job.id)
                )
            )

    def mark_deleted(self, job_id: str) -> Job:
        """Forget a finished job's transcript; the row stays for the ledger's history."""
        with self.db.transaction() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise NotFound(f"No transcription with ID {job_id!r}.", param="id")
            if job.deleted_at is None:
                job.deleted_at = utcnow()
                transcript = session.scalar(select(Transcript).where(Transcript.job_id == job_id))
                if transcript is not None:
                    session.delete(transcript)
            session.flush()
            return job
