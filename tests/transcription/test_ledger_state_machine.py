"""Random sequences of ledger and lifecycle operations on PostgreSQL, checked against a
pure-Python model: submit, start (with or without a lease), progress (in the database and in
the blob store's record), finish, fail, cancel, expire leases, renew, delete, and the ledger's
own settle and release. After every step: no over-spend, each reservation resolved at most once,
the ledger summing to the counters, and text only for jobs that succeeded."""

from __future__ import annotations

import math
import random
import re
import tempfile
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from sqlalchemy import Row, select

from tests.transcription.test_ledger import KEY, counters, issue, new_job, submit_job
from tests.transcription.test_ledger_concurrency import run_together
from tests.transcription.test_lifecycle import run_result
from transcription import ledger
from transcription.blobstore import LocalBlobStore
from transcription.db.models import Base, CreditCode, Job, LedgerEntry, Transcript, utcnow
from transcription.db.session import Database
from transcription.errors import (
    CodeExpired,
    CodeRevoked,
    Conflict,
    CreditError,
    InsufficientCredit,
    InvalidRequest,
    UsesExhausted,
)
from transcription.jobfiles import JobFiles
from transcription.lifecycle import WORKER_LOST, Lifecycle, submit
from transcription.states import CreditState, EntryKind, JobStatus

UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)
#: Few codes per example, so operations meet on the same code and invariants stay cheap.
MAX_CODES = 4
#: Workers that may hold a job's lease; None starts or finishes a job without one (the operator).
OWNERS = st.sampled_from([None, "worker-a", "worker-b"])
LEASE_SECONDS = 600.0
MAX_ATTEMPTS = 2


def charge(seconds: float, audio_seconds: float, reserved: int) -> int:
    """Whole seconds charged for ``seconds`` of audio done: rounded up, at most the audio and
    the reservation."""
    return max(0, min(math.ceil(min(seconds, audio_seconds) - 1e-6), reserved))


@dataclass
class CodeModel:
    """What a code's counters must be, computed without the database."""

    budget: int
    max_uses: int
    reserved: int = 0
    spent: int = 0
    uses: int = 0
    revoked: bool = False
    expired: bool = False

    def refusal(self, seconds: int) -> type[CreditError] | None:
        """The error a submission needing ``seconds`` must get, or None if it must succeed."""
        if self.revoked:
            return CodeRevoked
        if self.expired:
            return CodeExpired
        if self.uses >= self.max_uses:
            return UsesExhausted
        if self.budget - self.spent - self.reserved < seconds:
            return InsufficientCredit
        return None


@dataclass
class JobModel:
    """What a job's status, reservation, progress and lease must be."""

    code_id: str
    audio_seconds: float
    reserved: int
    status: JobStatus = JobStatus.QUEUED
    credit: CreditState = CreditState.HELD
    charged: int | None = None
    progress: float = 0.0
    #: (fraction, seconds done) of the progress record in the blob store, if one exists.
    record: tuple[float, float] | None = None
    lease_owner: str | None = None
    attempts: int = 0
    transcript: bool = False
    error_code: str | None = None

    @property
    def finished(self) -> bool:
        return self.status not in UNFINISHED


def has_jobs(machine: LedgerMachine) -> bool:
    return bool(machine.job_models)


def has_resolved_jobs(machine: LedgerMachine) -> bool:
    return any(job.credit is not CreditState.HELD for job in machine.job_models.values())


def has_unfinished_jobs(machine: LedgerMachine) -> bool:
    return any(not job.finished for job in machine.job_models.values())


def has_finished_jobs(machine: LedgerMachine) -> bool:
    return any(job.finished for job in machine.job_models.values())


@settings(
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    database=None,
)
class LedgerMachine(RuleBasedStateMachine):
    """Runs on ``db``, a migrated PostgreSQL schema that is emptied after each example, and a
    blob store in a directory of its own per example.

    Codes and jobs are drawn from the model in creation order, so an example replays exactly.
    """

    db: ClassVar[Database]

    def __init__(self) -> None:
        super().__init__()
        self._blob_dir = tempfile.TemporaryDirectory(prefix="ledger-machine-")
        self.blobs = LocalBlobStore(Path(self._blob_dir.name))
        self.files = JobFiles(self.blobs)
        self.lifecycle = Lifecycle(self.db, self.blobs)
        self.code_models: dict[str, CodeModel] = {}
        self.job_models: dict[str, JobModel] = {}

    def teardown(self) -> None:
        with self.db.transaction() as session:
            for table in reversed(Base.metadata.sorted_tables):
                session.execute(table.delete())
        self._blob_dir.cleanup()

    def _pick_code(self, data: st.DataObject) -> tuple[str, CodeModel]:
        code_id = data.draw(st.sampled_from(list(self.code_models)), label="code")
        return code_id, self.code_models[code_id]

    def _pick_job(self, data: st.DataObject, *, resolved: bool = False) -> tuple[str, JobModel]:
        job_ids = [
            job_id
            for job_id, job in self.job_models.items()
            if not resolved or job.credit is not CreditState.HELD
        ]
        job_id = data.draw(st.sampled_from(job_ids), label="job")
        return job_id, self.job_models[job_id]

    def _resolved(self, job: JobModel, to: CreditState, charged: int) -> None:
        code = self.code_models[job.code_id]
        code.reserved -= job.reserved
        code.spent += charged
        if to is CreditState.RELEASED:
            code.uses -= 1
        job.credit = to
        job.charged = charged

    def _finished(self, job: JobModel, to: JobStatus, result: Job | None) -> None:
        """The model of a failure (or a cancellation of a queued job): full refund."""
        if job.finished:
            assert result is None
            return
        assert result is not None
        self._end(job, to)
        if job.credit is CreditState.HELD:
            self._resolved(job, CreditState.RELEASED, 0)
        assert (result.status, result.credit_state) == (to, job.credit)

    def _end(self, job: JobModel, to: JobStatus) -> None:
        """Any final transition: the lease goes, and so do the job's work files."""
        job.status = to
        job.lease_owner = None
        job.record = None

    @initialize(seconds=st.integers(60, 1200), max_uses=st.integers(1, 6), data=st.data())
    def first_code(self, seconds: int, max_uses: int, data: st.DataObject) -> None:
        """A code and a first job on it, so every rule has something to act on from the start."""
        self.issue_code(seconds, max_uses)
        self.submit(data)

    @precondition(lambda self: len(self.code_models) < MAX_CODES)
    @rule(seconds=st.integers(1, 600), max_uses=st.integers(1, 6))
    def issue_code(self, seconds: int, max_uses: int) -> None:
        with self.db.transaction() as session:
            code_id = ledger.issue_code(session, KEY, seconds=seconds, max_uses=max_uses).record.id
        self.code_models[code_id] = CodeModel(budget=seconds, max_uses=max_uses)

    @rule(data=st.data())
    def submit(self, data: st.DataObject) -> None:
        code_id, code = self._pick_code(data)
        centiseconds = data.draw(st.integers(1, 12_000), label="centiseconds")
        seconds = -(-centiseconds // 100)
        expected = code.refusal(seconds)
        try:
            with self.db.transaction() as session:
                job_id = submit(session, new_job(code_id, centiseconds / 100)).id
        except CreditError as exc:
            assert type(exc) is expected
            if expected is InsufficientCredit:
                assert re.search(rf"\b{code.budget - code.spent - code.reserved} s\b", str(exc))
            return
        assert expected is None, f"accepted, but the model expected {expected.__name__}"
        code.reserved += seconds
        code.uses += 1
        self.job_models[job_id] = JobModel(
            code_id=code_id, audio_seconds=centiseconds / 100, reserved=seconds
        )

    @precondition(has_jobs)
    @rule(data=st.data(), owner=OWNERS)
    def start(self, data: st.DataObject, owner: str | None) -> None:
        """A worker takes the job with a lease (counting an attempt), or the operator without."""
        job_id, job = self._pick_job(data)
        self._start(job_id, job, owner)

    def _start(self, job_id: str, job: JobModel, owner: str | None) -> None:
        if owner is None:
            result = self.lifecycle.start(job_id)
        else:
            result = self.lifecycle.start(job_id, lease_owner=owner, lease_seconds=LEASE_SECONDS)
        if job.status is not JobStatus.QUEUED:
            assert result is None
            return
        assert result is not None
        assert (result.status, result.lease_owner) == (JobStatus.RUNNING, owner)
        job.status = JobStatus.RUNNING
        job.lease_owner = owner
        job.attempts += owner is not None

    @precondition(has_unfinished_jobs)
    @rule(
        data=st.data(),
        owner=OWNERS,
        where=st.sampled_from(["db", "record", "both"]),
        then_cancel=st.booleans(),
    )
    def work(self, data: st.DataObject, owner: str | None, where: str, then_cancel: bool) -> None:
        """A run gets some way into an unfinished job: started if it was queued, then progress
        written to the database, to the record, or both (the record may be ahead); then the
        user may cancel it."""
        job_ids = [job_id for job_id, job in self.job_models.items() if not job.finished]
        job_id = data.draw(st.sampled_from(job_ids), label="unfinished job")
        job = self.job_models[job_id]
        if job.status is JobStatus.QUEUED:
            self._start(job_id, job, owner)
        fraction = data.draw(st.floats(0, 1), label="fraction")
        if where != "record":
            assert self.lifecycle.progress(job_id, fraction) is True
            job.progress = fraction
        if where != "db":
            ahead = data.draw(st.floats(fraction, 1), label="record fraction")
            seconds_done = ahead * job.audio_seconds
            self.files.write_progress(job_id, ahead, seconds_done)
            job.record = (ahead, seconds_done)
        if then_cancel:
            self._cancel(job_id, job)

    @precondition(has_jobs)
    @rule(data=st.data(), fraction=st.floats(0, 1), where=st.sampled_from(["db", "record"]))
    def progress(self, data: st.DataObject, fraction: float, where: str) -> None:
        """A worker reports progress to the database (only while the job is running and, with
        a lease, its own); a transcriber pod writes its record to the blob store (which only a
        running job's cancellation reads)."""
        job_id, job = self._pick_job(data)
        if where == "db":
            owner = data.draw(OWNERS, label="owner")
            taken = job.status is JobStatus.RUNNING and owner in (None, job.lease_owner)
            assert self.lifecycle.progress(job_id, fraction, lease_owner=owner) is taken
            if taken:
                job.progress = fraction
            return
        if job.finished:
            return  # a pod writing after the end is the files' tests' business
        seconds_done = data.draw(st.floats(0, 1.2 * job.audio_seconds), label="seconds_done")
        self.files.write_progress(job_id, fraction, seconds_done)
        job.record = (fraction, seconds_done)

    @precondition(has_jobs)
    @rule(data=st.data(), owner=OWNERS, duration_share=st.floats(0, 1.5))
    def finish(self, data: st.DataObject, owner: str | None, duration_share: float) -> None:
        """The one way to succeed: allowed from queued or running, and with ``owner`` only
        while that worker holds the lease."""
        job_id, job = self._pick_job(data)
        duration = duration_share * job.audio_seconds
        result = self.lifecycle.finish(job_id, run_result(job_id, duration), lease_owner=owner)
        if job.finished or (owner is not None and job.lease_owner != owner):
            assert result is None
            return
        assert result is not None
        self._end(job, JobStatus.SUCCEEDED)
        job.progress = 1.0
        job.transcript = True
        if job.credit is CreditState.HELD:
            # The measured length is charged, whatever the run reports (a pod is not trusted).
            self._resolved(
                job, CreditState.SETTLED, charge(job.audio_seconds, job.audio_seconds, job.reserved)
            )
        assert (result.status, result.credit_state, result.charged_seconds) == (
            JobStatus.SUCCEEDED,
            job.credit,
            job.charged,
        )

    @precondition(has_jobs)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        """Queued: full refund and the use back. Running: the seconds done are charged (the
        most of the database's progress and the record's), the rest released, the use stays
        spent. Finished: nothing moves."""
        job_id, job = self._pick_job(data)
        self._cancel(job_id, job)

    def _cancel(self, job_id: str, job: JobModel) -> None:
        result = self.lifecycle.cancel(job_id)
        began = job.record is not None and (job.record[0] > 0 or job.record[1] > 0)
        if job.finished or (job.status is JobStatus.QUEUED and not began):
            self._finished(job, JobStatus.CANCELLED, result)
            return
        assert result is not None
        fraction, seconds = job.record or (0.0, 0.0)
        done = max(job.progress, fraction) * job.audio_seconds
        done = max(done, seconds)
        self._end(job, JobStatus.CANCELLED)
        if job.credit is CreditState.HELD:
            charged = charge(done, job.audio_seconds, job.reserved)
            # The rule itself: at least progress * audio seconds (rounded up), within the hold.
            assert charged >= min(job.reserved, job.progress * job.audio_seconds - 1e-6)
            self._resolved(job, CreditState.SETTLED, charged)
        assert (result.status, result.credit_state, result.charged_seconds) == (
            JobStatus.CANCELLED,
            job.credit,
            job.charged,
        )

    @precondition(has_jobs)
    @rule(data=st.data(), owner=OWNERS)
    def fail(self, data: st.DataObject, owner: str | None) -> None:
        job_id, job = self._pick_job(data)
        result = self.lifecycle.fail(
            job_id, code="engine_error", message="The engine crashed.", lease_owner=owner
        )
        if owner is not None and job.lease_owner != owner and not job.finished:
            assert result is None
            return
        if not job.finished:
            job.error_code = "engine_error"
        self._finished(job, JobStatus.FAILED, result)

    @precondition(has_jobs)
    @rule(data=st.data(), owner=st.sampled_from(["worker-a", "worker-b"]))
    def renew(self, data: st.DataObject, owner: str) -> None:
        job_id, job = self._pick_job(data)
        held = job.status is JobStatus.RUNNING and job.lease_owner == owner
        assert self.lifecycle.renew(job_id, owner, LEASE_SECONDS) is held

    @rule(expired=st.booleans(), unleased=st.booleans())
    def expire_leases(self, expired: bool, unleased: bool) -> None:
        """Every worker stops renewing (``expired``), or the check runs while leases are live;
        a process owning the database also takes running jobs without a lease (``unleased``).
        A lost job goes back to the queue, or past the attempts fails and is refunded."""
        now = utcnow() + timedelta(seconds=LEASE_SECONDS * (2 if expired else -1))
        requeued = self.lifecycle.expire_leases(MAX_ATTEMPTS, now=now, unleased=unleased)
        expected = []
        for job_id, job in self.job_models.items():
            if job.status is not JobStatus.RUNNING:
                continue
            if not (unleased if job.lease_owner is None else expired):
                continue
            if job.attempts >= MAX_ATTEMPTS:
                job.error_code = WORKER_LOST
                self._end(job, JobStatus.FAILED)
                if job.credit is CreditState.HELD:
                    self._resolved(job, CreditState.RELEASED, 0)
            else:
                expected.append(job_id)
                job.status = JobStatus.QUEUED
                job.lease_owner = None
                job.progress = 0.0
        assert sorted(requeued) == sorted(expected)

    @precondition(has_jobs)
    @rule(data=st.data())
    def begin_attempt(self, data: st.DataObject) -> None:
        """The operator creates a Job for the job: one more attempt, unless it finished."""
        job_id, job = self._pick_job(data)
        count = self.lifecycle.begin_attempt(job_id)
        if job.finished:
            assert count is None
            return
        job.attempts += 1
        assert count == job.attempts

    @precondition(has_finished_jobs)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        """The user deletes a finished job: its transcript goes, its books stay."""
        job_ids = [job_id for job_id, job in self.job_models.items() if job.finished]
        job_id = data.draw(st.sampled_from(job_ids), label="finished job")
        assert self.lifecycle.mark_deleted(job_id).deleted_at is not None
        self.job_models[job_id].transcript = False

    @precondition(has_jobs)
    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        job_id, job = self._pick_job(data)
        charged = data.draw(st.integers(0, 2 * job.reserved), label="charged")
        with self.db.transaction() as session:
            result = ledger.settle(session, job_id, charged)
        if job.credit is not CreditState.HELD:
            assert result is None
            return
        assert result == min(charged, job.reserved)
        self._resolved(job, CreditState.SETTLED, result)

    @precondition(has_jobs)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        """Release a reservation directly through the ledger, whatever the job's status."""
        job_id, job = self._pick_job(data)
        with self.db.transaction() as session:
            released = ledger.release(session, job_id)
        assert released is (job.credit is CreditState.HELD)
        if released:
            self._resolved(job, CreditState.RELEASED, 0)

    @precondition(has_resolved_jobs)
    @rule(data=st.data(), how=st.sampled_from(["settle", "release"]))
    def replay(self, data: st.DataObject, how: str) -> None:
        """Settling or releasing an already resolved reservation is a no-op."""
        job_id, _ = self._pick_job(data, resolved=True)
        with self.db.transaction() as session:
            if how == "settle":
                assert ledger.settle(session, job_id, 10_000) is None
            else:
                assert ledger.release(session, job_id) is False

    @rule(data=st.data(), how=st.sampled_from(["revoke", "expire", "renew"]))
    def retire(self, data: st.DataObject, how: str) -> None:
        """Revoke the code, move its expiry a second into the past, or lift its expiry."""
        code_id, code = self._pick_code(data)
        with self.db.transaction() as session:
            if how == "revoke":
                assert ledger.revoke(session, code_id).revoked_at is not None
            else:
                past = utcnow() - timedelta(seconds=1)
                ledger.set_expiry(session, code_id, past if how == "expire" else None)
        code.revoked = code.revoked or how == "revoke"
        code.expired = how == "expire" or (code.expired and how == "revoke")

    @rule(data=st.data(), seconds=st.integers(1, 300))
    def top_up(self, data: st.DataObject, seconds: int) -> None:
        code_id, code = self._pick_code(data)
        if code.revoked:
            with pytest.raises(Conflict), self.db.transaction() as session:
                ledger.top_up(session, code_id, seconds)
            return
        with self.db.transaction() as session:
            assert ledger.top_up(session, code_id, seconds).budget_seconds == code.budget + seconds
        code.budget += seconds

    @rule(data=st.data(), max_uses=st.integers(1, 8))
    def set_max_uses(self, data: st.DataObject, max_uses: int) -> None:
        code_id, code = self._pick_code(data)
        try:
            with self.db.transaction() as session:
                ledger.set_max_uses(session, code_id, max_uses)
        except Conflict:
            assert code.revoked
            return
        except InvalidRequest:
            assert max_uses < code.uses
            return
        assert not code.revoked
        assert max_uses >= code.uses
        code.max_uses = max_uses

    @invariant()
    def ledger_matches_the_model(self) -> None:
        with self.db.transaction() as session:
            records = {r.id: r for r in session.scalars(select(CreditCode))}
            totals = {code_id: ledger.ledger_totals(session, code_id) for code_id in records}
            jobs = {j.id: j for j in session.scalars(select(Job))}
            entries = session.execute(
                select(LedgerEntry.job_id, LedgerEntry.kind).where(LedgerEntry.job_id.is_not(None))
            ).all()
            transcripts = list(session.scalars(select(Transcript.job_id)))
        self._check_codes(records, totals)
        self._check_jobs(jobs, entries)
        # Text exists only for a job that succeeded (and was not deleted), once.
        assert sorted(transcripts) == sorted(
            job_id for job_id, job in self.job_models.items() if job.transcript
        )
        assert all(self.job_models[job_id].status is JobStatus.SUCCEEDED for job_id in transcripts)

    def _check_codes(
        self, records: dict[str, CreditCode], totals: dict[str, dict[str, int]]
    ) -> None:
        """Per code: within budget and uses, equal to the model, and the ledger sums to it."""
        assert records.keys() == self.code_models.keys()
        for code_id, record in records.items():
            model = self.code_models[code_id]
            stored = {
                "budget": record.budget_seconds,
                "reserved": record.reserved_seconds,
                "spent": record.spent_seconds,
                "uses": record.uses,
            }
            assert record.spent_seconds + record.reserved_seconds <= record.budget_seconds
            assert record.reserved_seconds >= 0
            assert 0 <= record.uses <= record.max_uses == model.max_uses
            assert stored == {
                "budget": model.budget,
                "reserved": model.reserved,
                "spent": model.spent,
                "uses": model.uses,
            }
            assert totals[code_id] == stored

    def _check_jobs(
        self, jobs: dict[str, Job], entries: Sequence[Row[str | None, EntryKind]]
    ) -> None:
        """Per job: the model's status and credit state, and one ledger row per movement."""
        kinds: dict[str, list[str]] = defaultdict(list)
        for job_id, kind in entries:
            assert job_id is not None
            kinds[job_id].append(kind)
        assert jobs.keys() == self.job_models.keys()
        for job_id, job in jobs.items():
            model = self.job_models[job_id]
            assert (job.status, job.credit_state, job.charged_seconds) == (
                model.status,
                model.credit,
                model.charged,
            )
            assert (job.progress, job.lease_owner, job.attempts, job.error_code) == (
                model.progress,
                model.lease_owner,
                model.attempts,
                model.error_code,
            )
            assert (job.lease_expires_at is not None) is (model.lease_owner is not None)
            if job.charged_seconds is not None:
                assert 0 <= job.charged_seconds <= job.reserved_seconds
            if model.finished:
                assert self.blobs.list(f"jobs/{job_id}/work") == []
            expected = {
                CreditState.HELD: ["reserve"],
                CreditState.SETTLED: ["reserve", "settle"],
                CreditState.RELEASED: ["release", "reserve"],
            }[model.credit]
            assert sorted(kinds[job_id]) == expected


class TestLedgerStateMachine(LedgerMachine.TestCase):  # type: ignore[misc, valid-type]
    """Hypothesis runs the machine; every example shares the schema of one ``pg_db``."""

    @pytest.fixture(autouse=True)
    def _database(self, pg_db: Database) -> Iterator[None]:
        LedgerMachine.db = pg_db
        yield
        del LedgerMachine.db


def test_concurrent_random_operations_keep_the_ledger_consistent(pg_db: Database) -> None:
    """Eight threads reserve, settle and release at random on three codes; nothing leaks."""
    code_ids = [issue(pg_db, 300, max_uses=10).record.id for _ in range(3)]
    job_ids: list[str] = []
    moves: dict[str, list[int | None]] = defaultdict(list)
    refusals: list[CreditError] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(30):
            operation = rng.choice(["submit", "submit", "settle", "release"])
            if operation == "submit":
                try:
                    job_id = submit_job(pg_db, rng.choice(code_ids), rng.uniform(1, 60)).id
                except CreditError as exc:
                    with lock:
                        refusals.append(exc)
                    continue
                with lock:
                    job_ids.append(job_id)
                continue
            with lock:
                if not job_ids:
                    continue
                job_id = rng.choice(job_ids)
            with pg_db.transaction() as session:
                if operation == "settle":
                    charged = ledger.settle(session, job_id, rng.randint(0, 80))
                    moved = charged is not None
                else:
                    charged = None
                    moved = ledger.release(session, job_id)
            if moved:
                with lock:
                    moves[job_id].append(charged)

    run_together(8, worker)

    assert refusals
    assert moves
    with pg_db.transaction() as session:
        jobs = list(session.scalars(select(Job)))
    assert sorted(job.id for job in jobs) == sorted(job_ids)
    expected = {
        code_id: {"budget": 300, "reserved": 0, "spent": 0, "uses": 0} for code_id in code_ids
    }
    for job in jobs:
        code = expected[job.code_id]
        match moves.get(job.id, []):
            case []:
                assert job.credit_state == CreditState.HELD
                code["reserved"] += job.reserved_seconds
                code["uses"] += 1
            case [None]:
                assert (job.credit_state, job.charged_seconds) == (CreditState.RELEASED, 0)
            case [int(charged)]:
                assert (job.credit_state, job.charged_seconds) == (CreditState.SETTLED, charged)
                assert charged <= job.reserved_seconds
                code["spent"] += charged
                code["uses"] += 1
            case more:
                raise AssertionError(f"job {job.id} moved credit {len(more)} times: {more}")
    for code_id in code_ids:
        assert counters(pg_db, code_id) == expected[code_id]
