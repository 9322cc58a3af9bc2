"""Random sequences of ledger operations on PostgreSQL, checked against a pure-Python model."""

from __future__ import annotations

import random
import re
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
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
from transcription import ledger
from transcription.db.models import Base, CreditCode, Job, LedgerEntry, utcnow
from transcription.db.session import Database
from transcription.errors import (
    CodeExpired,
    CodeRevoked,
    CreditError,
    InsufficientCredit,
    InvalidRequest,
    UsesExhausted,
)
from transcription.lifecycle import Lifecycle, submit
from transcription.states import CreditState, JobStatus

UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)
#: Few codes per example, so operations meet on the same code and invariants stay cheap.
MAX_CODES = 4


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
    """What a job's status and reservation must be."""

    code_id: str
    reserved: int
    status: JobStatus = JobStatus.QUEUED
    credit: CreditState = CreditState.HELD
    charged: int | None = None


def has_jobs(machine: LedgerMachine) -> bool:
    return bool(machine.job_models)


def has_resolved_jobs(machine: LedgerMachine) -> bool:
    return any(job.credit is not CreditState.HELD for job in machine.job_models.values())


@settings(
    max_examples=20,
    stateful_step_count=30,
    deadline=None,
    database=None,
)
class LedgerMachine(RuleBasedStateMachine):
    """Runs on ``db``, a migrated PostgreSQL schema that is emptied after each example.

    Codes and jobs are drawn from the model in creation order, so an example replays exactly.
    """

    db: ClassVar[Database]

    def __init__(self) -> None:
        super().__init__()
        self.lifecycle = Lifecycle(self.db)
        self.code_models: dict[str, CodeModel] = {}
        self.job_models: dict[str, JobModel] = {}

    def teardown(self) -> None:
        with self.db.transaction() as session:
            for table in reversed(Base.metadata.sorted_tables):
                session.execute(table.delete())

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
        if job.status not in UNFINISHED:
            assert result is None
            return
        assert result is not None
        job.status = to
        if job.credit is CreditState.HELD:
            self._resolved(job, CreditState.RELEASED, 0)
        assert (result.status, result.credit_state) == (to, job.credit)

    @initialize(seconds=st.integers(60, 1200), max_uses=st.integers(1, 6))
    def first_code(self, seconds: int, max_uses: int) -> None:
        self.issue_code(seconds, max_uses)

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
        self.job_models[job_id] = JobModel(code_id=code_id, reserved=seconds)

    @precondition(has_jobs)
    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        job_id, job = self._pick_job(data)
        result = self.lifecycle.start(job_id)
        if job.status is not JobStatus.QUEUED:
            assert result is None
            return
        assert result is not None
        assert result.status == JobStatus.RUNNING
        job.status = JobStatus.RUNNING

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
    @rule(data=st.data(), how=st.sampled_from(["release", "fail", "cancel"]))
    def abandon(self, data: st.DataObject, how: str) -> None:
        """End a job without charging: release its credit directly, fail it or cancel it."""
        job_id, job = self._pick_job(data)
        if how == "release":
            with self.db.transaction() as session:
                released = ledger.release(session, job_id)
            assert released is (job.credit is CreditState.HELD)
            if released:
                self._resolved(job, CreditState.RELEASED, 0)
        elif how == "fail":
            result = self.lifecycle.fail(job_id, code="engine_error", message="The engine crashed.")
            self._finished(job, JobStatus.FAILED, result)
        else:
            self._finished(job, JobStatus.CANCELLED, self.lifecycle.cancel(job_id))

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
        with self.db.transaction() as session:
            assert ledger.top_up(session, code_id, seconds).budget_seconds == code.budget + seconds
        code.budget += seconds

    @rule(data=st.data(), max_uses=st.integers(1, 8))
    def set_max_uses(self, data: st.DataObject, max_uses: int) -> None:
        code_id, code = self._pick_code(data)
        try:
            with self.db.transaction() as session:
                ledger.set_max_uses(session, code_id, max_uses)
        except InvalidRequest:
            assert max_uses < code.uses
            return
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
        self._check_codes(records, totals)
        self._check_jobs(jobs, entries)

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

    def _check_jobs(self, jobs: dict[str, Job], entries: Sequence[Row[tuple[str, str]]]) -> None:
        """Per job: the model's status and credit state, and one ledger row per movement."""
        kinds: dict[str, list[str]] = defaultdict(list)
        for job_id, kind in entries:
            kinds[job_id].append(kind)
        assert jobs.keys() == self.job_models.keys()
        for job_id, job in jobs.items():
            model = self.job_models[job_id]
            assert (job.status, job.credit_state, job.charged_seconds) == (
                model.status,
                model.credit,
                model.charged,
            )
            expected = {
                CreditState.HELD: ["reserve"],
                CreditState.SETTLED: ["reserve", "settle"],
                CreditState.RELEASED: ["release", "reserve"],
            }[model.credit]
            assert sorted(kinds[job_id]) == expected


class TestLedgerStateMachine(LedgerMachine.TestCase):
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
