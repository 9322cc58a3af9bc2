"""Every job state transition and credit movement, each in one durable transaction.

Both shapes finish a job the same way, through ``Lifecycle.finish``: the transcript becomes
visible, the job succeeds and its credit settles in one transaction. A transition is a
conditional ``UPDATE`` on the job's status, so a replayed or racing call changes nothing; the
ledger's (job, kind) keys make a replayed settlement a no-op. After a final transition the job's
working files go (its transcripts too, unless it succeeded).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session

from transcription import ledger, metrics
from transcription.blobstore import BlobStore
from transcription.db.models import Job, Transcript, utcnow
from transcription.db.session import Database
from transcription.errors import NotFound
from transcription.jobfiles import JobFiles, RunResult
from transcription.states import FINISHED, TRANSITIONS, UNFINISHED, CreditState, JobStatus

log = logging.getLogger(__name__)

JOB_ID_PREFIX = "tr_"
TRANSCRIPT_ID_PREFIX = "ts_"
#: What a job that lost its worker too often fails with.
WORKER_LOST = "worker_lost"


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
    temperature: float | None = None
    word_timestamps: bool = True


def new_job_id() -> str:
    return ledger.new_id(JOB_ID_PREFIX)


def seconds_to_charge(seconds: float, job: Job) -> int:
    """Whole seconds of credit for ``seconds`` of audio, never more than was reserved."""
    charged = math.ceil(min(seconds, job.audio_seconds) - 1e-6)
    return max(0, min(charged, job.reserved_seconds))


def submit(session: Session, new: NewJob) -> Job:
    """Create a queued job and reserve its credit in the caller's transaction."""
    job = queued_job(new)
    ledger.reserve(session, job)
    metrics.job_created(session, job)
    return job


def queued_job(new: NewJob) -> Job:
    """The row a submission inserts: queued, its credit held, not yet in any session."""
    return Job(
        id=new.job_id or new_job_id(),
        code_id=new.code_id,
        status=JobStatus.QUEUED,
        credit_state=CreditState.HELD,
        progress=0.0,
        filename=new.filename,
        audio_key=new.audio_key,
        audio_bytes=new.audio_bytes,
        audio_seconds=new.audio_seconds,
        reserved_seconds=ledger.seconds_to_reserve(new.audio_seconds),
        language=new.language,
        prompt=new.prompt,
        temperature=new.temperature,
        word_timestamps=new.word_timestamps,
        mode=new.mode,
        engine=new.engine,
        model=new.model,
        attempts=0,
        lease_owner=None,
        lease_expires_at=None,
    )


def _transition(
    session: Session,
    job_id: str,
    to: JobStatus,
    *,
    allowed: frozenset[JobStatus] | None = None,
    held_by: str | None = None,
    unless_changed: Sequence[ColumnElement[bool]] = (),
    **values: Any,
) -> Job | None:
    """Move the job to ``to`` if its status allows it (and, with ``held_by``, only while that
    worker holds its lease); None when it does not (a no-op). ``values`` are columns to set."""
    sources = allowed if allowed is not None else TRANSITIONS[to]
    if to in FINISHED:
        values.update(completed_at=utcnow(), lease_owner=None, lease_expires_at=None)
    condition = [Job.id == job_id, Job.status.in_(sorted(sources)), *unless_changed]
    if held_by is not None:
        condition.append(Job.lease_owner == held_by)
    result = session.execute(
        update(Job)
        .where(*condition)
        .values(status=to, updated_at=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    if to in FINISHED:
        metrics.job_finished(session, job)
    return job


def _fail(
    session: Session,
    job_id: str,
    code: str,
    message: str,
    lease_owner: str | None = None,
    unless_changed: Sequence[ColumnElement[bool]] = (),
) -> Job | None:
    job = _transition(
        session,
        job_id,
        JobStatus.FAILED,
        held_by=lease_owner,
        unless_changed=unless_changed,
        error_code=code,
        error_message=message[:2000],
    )
    if job is None:
        return None
    ledger.release(session, job_id)
    session.refresh(job)
    log.warning("job %s failed: %s", job_id, code, extra={"job_id": job_id})
    return job


class Lifecycle:
    """The job state machine over one database and the job's files; each method is its own
    transaction, durable before it returns."""

    def __init__(
        self, db: Database, blobs: BlobStore, *, on_change: Callable[[str], None] | None = None
    ) -> None:
        self.db = db
        self.files = JobFiles(blobs)
        # Called with a job's ID once a change to what the API shows of it is committed, so
        # whoever waits on the job in this process hears of it before their next re-read.
        self.on_change = on_change or (lambda _job_id: None)

    def get(self, job_id: str) -> Job:
        with self.db.read() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise NotFound(f"No transcription with ID {job_id!r}.", param="id")
            return job

    def transcript(self, job_id: str) -> Transcript | None:
        """The transcript of a succeeded job; no other job has one."""
        with self.db.read() as session:
            return session.scalar(select(Transcript).where(Transcript.job_id == job_id))

    def unfinished(self) -> list[Job]:
        """Every queued or running job, oldest first."""
        with self.db.read() as session:
            return list(
                session.scalars(
                    select(Job)
                    .where(Job.status.in_(sorted(UNFINISHED)))
                    .order_by(Job.created_at, Job.id)
                )
            )

    def queued_ids(self) -> list[str]:
        with self.db.read() as session:
            return list(
                session.scalars(
                    select(Job.id)
                    .where(Job.status == JobStatus.QUEUED)
                    .order_by(Job.created_at, Job.id)
                )
            )

    def start(
        self, job_id: str, *, lease_owner: str | None = None, lease_seconds: float | None = None
    ) -> Job | None:
        """Mark a queued job running; None if it is not queued (taken, cancelled or finished).

        An embedded worker passes a lease, which it must renew, and counts an attempt; the
        operator counts attempts when it creates a Job (``begin_attempt``)."""
        values: dict[str, Any] = {"started_at": utcnow()}
        if lease_owner is not None:
            assert lease_seconds is not None
            values.update(
                lease_owner=lease_owner,
                lease_expires_at=utcnow() + timedelta(seconds=lease_seconds),
                attempts=Job.attempts + 1,
            )
        with self.db.transaction() as session:
            job = _transition(session, job_id, JobStatus.RUNNING, **values)
            if job is not None:
                metrics.job_started(session, job)
                if lease_owner is not None:
                    metrics.attempt_started(session, job.attempts)
        if job is not None:
            self.on_change(job_id)
        return job

    def begin_attempt(self, job_id: str) -> int | None:
        """Count one more attempt at an unfinished job; its new count, or None once finished."""
        with self.db.transaction() as session:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status.in_(sorted(UNFINISHED)))
                .values(attempts=Job.attempts + 1, updated_at=utcnow())
                .returning(Job.attempts)
            )
            attempts = result.scalar_one_or_none()
            if attempts is not None:
                metrics.attempt_started(session, attempts)
            return attempts

    def renew(self, job_id: str, lease_owner: str, lease_seconds: float) -> bool:
        """Extend the worker's lease; False once the job is no longer its to run."""
        with self.db.transaction() as session:
            result = session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.status == JobStatus.RUNNING,
                    Job.lease_owner == lease_owner,
                )
                .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
                .execution_options(synchronize_session=False)
            )
            return result.rowcount == 1  # type: ignore[attr-defined]

    def progress(self, job_id: str, fraction: float, *, lease_owner: str | None = None) -> bool:
        """Record progress; False once the job is no longer running (or no longer
        ``lease_owner``'s), so the worker can stop."""
        fraction = min(max(fraction, 0.0), 1.0)
        condition = [Job.id == job_id, Job.status == JobStatus.RUNNING]
        if lease_owner is not None:
            condition.append(Job.lease_owner == lease_owner)
        with self.db.transaction() as session:
            result = session.execute(
                update(Job)
                .where(*condition)
                .values(progress=fraction, updated_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            recorded: bool = result.rowcount == 1  # type: ignore[attr-defined]
        if recorded:
            self.on_change(job_id)
        return recorded

    def finish(
        self, job_id: str, result: RunResult, *, lease_owner: str | None = None
    ) -> Job | None:
        """The one way a job succeeds: its transcript becomes visible, the job succeeds and the
        audio transcribed is charged (the rest released), in one transaction. None if the job
        had already finished (a replay, or it was cancelled) or ``lease_owner`` lost it."""
        if result.outcome != "transcribed":
            raise ValueError(f"a {result.outcome} run cannot finish job {job_id}")
        with self.db.transaction() as session:
            job = _transition(
                session, job_id, JobStatus.SUCCEEDED, held_by=lease_owner, progress=1.0
            )
            if job is None:
                return None
            session.add(
                Transcript(
                    id=ledger.new_id(TRANSCRIPT_ID_PREFIX),
                    job_id=job_id,
                    text=result.text,
                    language=result.language,
                    duration_seconds=result.duration_seconds,
                    segment_count=result.segment_count,
                    uris=result.uris,
                    model=result.model,
                )
            )
            if result.language and not job.language:
                job.language = result.language
            # The audio transcribed is what the gateway measured by decoding the whole upload;
            # the run's own figure is not trusted for money (a pod decoding hostile audio could
            # under-report it).
            ledger.settle(session, job_id, seconds_to_charge(job.audio_seconds, job))
            session.flush()
            session.refresh(job)
        self.on_change(job_id)
        log.info(
            "job %s succeeded, charged %s s", job_id, job.charged_seconds, extra={"job_id": job_id}
        )
        self.tidy(job)
        return job

    def fail(
        self, job_id: str, *, code: str, message: str, lease_owner: str | None = None
    ) -> Job | None:
        """Mark the job failed and release its whole reservation and its use; None if it had
        already finished or ``lease_owner`` lost it."""
        with self.db.transaction() as session:
            job = _fail(session, job_id, code, message, lease_owner)
        if job is not None:
            self.on_change(job_id)
            self.tidy(job)
        return job

    def tidy(self, job: Job) -> None:
        """Remove what a finished job no longer needs: its working files, and its transcripts
        too unless it succeeded. Safe to repeat."""
        self.files.tidy(
            job.id, audio_key=job.audio_key, transcripts=job.status != JobStatus.SUCCEEDED
        )

    def discard_leftovers(self, job_id: str) -> None:
        """Remove files a late run wrote for a job that ended without succeeding; a job that
        succeeded or is still unfinished keeps everything."""
        job = self.get(job_id)
        if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
            self.tidy(job)

    def cancel(self, job_id: str) -> Job | None:
        """Cancel an unfinished job; None if it had already finished (no money moves then).

        A queued job is refunded in full and its use given back. A running job is charged the
        audio already transcribed (at least progress times audio seconds, rounded up), the rest is
        released, and the use stays spent. A job whose run has reported progress counts as
        running even if the database still says queued (in the cluster the operator may not
        have seen its pod start yet)."""
        reported = self.files.read_progress(job_id)
        began = reported is not None and (reported.seconds_done > 0 or reported.fraction > 0)
        with self.db.transaction() as session:
            job = None
            if not began:
                job = _transition(
                    session, job_id, JobStatus.CANCELLED, allowed=frozenset({JobStatus.QUEUED})
                )
            if job is not None:
                ledger.release(session, job_id)
            else:
                job = _transition(session, job_id, JobStatus.CANCELLED, allowed=UNFINISHED)
                if job is None:
                    return None
                done = max(
                    job.progress * job.audio_seconds,
                    reported.seconds_done if reported is not None else 0.0,
                    (reported.fraction * job.audio_seconds) if reported is not None else 0.0,
                )
                ledger.settle(session, job_id, seconds_to_charge(done, job))
            session.refresh(job)
        self.on_change(job_id)
        log.info(
            "job %s cancelled, charged %s s", job_id, job.charged_seconds, extra={"job_id": job_id}
        )
        self.tidy(job)
        return job

    def expire_leases(
        self, max_attempts: int, *, now: datetime | None = None, unleased: bool = False
    ) -> list[str]:
        """Re-queue running jobs whose worker stopped renewing its lease (before ``now``); a job
        out of attempts fails and is refunded instead. ``unleased`` takes running jobs with no
        lease too (left by a server older than leases; only for a process that owns the
        database). Each job is taken only if its lease is still the expired one seen, so a
        worker that renewed meanwhile keeps it. Returns the re-queued IDs."""
        now = now or utcnow()
        lost = Job.lease_expires_at < now
        if unleased:
            lost = or_(lost, Job.lease_expires_at.is_(None))
        requeued: list[str] = []
        failed: list[Job] = []
        with self.db.transaction() as session:
            expired = session.execute(
                select(Job.id, Job.attempts, Job.lease_owner).where(
                    Job.status == JobStatus.RUNNING, lost
                )
            ).all()
            for job_id, attempts, owner in expired:
                unchanged = [
                    lost,
                    Job.attempts == attempts,
                    Job.lease_owner.is_(None) if owner is None else Job.lease_owner == owner,
                ]
                if attempts >= max_attempts:
                    job = _fail(
                        session,
                        job_id,
                        WORKER_LOST,
                        f"The transcription stopped without finishing {attempts} times "
                        "(its worker crashed or was killed); the credit was refunded.",
                        unless_changed=unchanged,
                    )
                    if job is not None:
                        failed.append(job)
                    continue
                result = session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == JobStatus.RUNNING, and_(*unchanged))
                    .values(
                        status=JobStatus.QUEUED,
                        progress=0.0,
                        lease_owner=None,
                        lease_expires_at=None,
                        updated_at=utcnow(),
                    )
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    log.warning(
                        "job %s lost its worker; queued again", job_id, extra={"job_id": job_id}
                    )
                    requeued.append(job_id)
        for job_id in [*requeued, *(job.id for job in failed)]:
            self.on_change(job_id)
        for job in failed:
            self.tidy(job)
        return requeued

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
        self.files.tidy(job_id, audio_key=job.audio_key, transcripts=True)
        return job
