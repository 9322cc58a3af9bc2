"""Concurrent submissions and resolutions never spend the same credit twice, on both databases."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest
from sqlalchemy import func, select

from tests.transcription.test_ledger import counters, issue, new_job, submit_job
from transcription import ledger
from transcription.db.models import Job, LedgerEntry
from transcription.db.session import Database
from transcription.errors import CreditError, InsufficientCredit, UsesExhausted
from transcription.lifecycle import submit

T = TypeVar("T")


def run_together(count: int, action: Callable[[int], T]) -> list[T]:
    """Run ``action(i)`` for each i on its own thread, all released at the same moment."""
    barrier = threading.Barrier(count, timeout=60)

    def run(index: int) -> T:
        barrier.wait()
        return action(index)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def race_submissions(db: Database, code_id: str, audio_seconds: float, count: int) -> list[object]:
    """Submit ``count`` jobs at once, each in its own session: job IDs and credit errors."""

    def attempt(_: int) -> object:
        try:
            with db.transaction() as session:
                return submit(session, new_job(code_id, audio_seconds)).id
        except CreditError as exc:
            return exc

    return run_together(count, attempt)


def stored_job_ids(db: Database) -> set[str]:
    with db.transaction() as session:
        return set(session.scalars(select(Job.id)))


def test_single_use_code_pays_for_exactly_one_of_fifty_racing_jobs(db: Database) -> None:
    """Fifty simultaneous submissions on a single-use code: one job, forty-nine refusals."""
    code_id = issue(db, 1000).record.id
    results = race_submissions(db, code_id, 12.5, 50)

    winners = [r for r in results if isinstance(r, str)]
    losers = [r for r in results if not isinstance(r, str)]
    assert len(winners) == 1
    assert len(losers) == 49
    assert all(isinstance(r, UsesExhausted) for r in losers)
    assert stored_job_ids(db) == set(winners)
    assert counters(db, code_id) == {"budget": 1000, "reserved": 13, "spent": 0, "uses": 1}


@pytest.mark.parametrize(
    ("budget", "max_uses", "wins", "refusal"),
    [(70, 30, 7, InsufficientCredit), (1000, 7, 7, UsesExhausted)],
    ids=["budget-bound", "uses-bound"],
)
def test_multi_use_code_pays_for_exactly_what_it_can_afford(
    db: Database, budget: int, max_uses: int, wins: int, refusal: type[CreditError]
) -> None:
    """Thirty racing 10 s jobs on a code that affords seven: seven run, none over-spends."""
    code_id = issue(db, budget, max_uses=max_uses).record.id
    results = race_submissions(db, code_id, 10, 30)

    winners = [r for r in results if isinstance(r, str)]
    losers = [r for r in results if not isinstance(r, str)]
    assert len(winners) == wins
    assert all(isinstance(r, refusal) for r in losers)
    assert stored_job_ids(db) == set(winners)
    assert counters(db, code_id) == {
        "budget": budget,
        "reserved": 10 * wins,
        "spent": 0,
        "uses": wins,
    }


def test_racing_settle_and_release_resolve_each_job_once(db: Database) -> None:
    """A settlement and a release racing on the same job: exactly one of them moves credit."""
    code_id = issue(db, 1000, max_uses=10).record.id
    job_ids = [submit_job(db, code_id, 20).id for _ in range(10)]

    def resolve(index: int) -> object:
        job_id = job_ids[index // 2]
        with db.transaction() as session:
            if index % 2:
                return ledger.release(session, job_id)
            return ledger.settle(session, job_id, 15)

    results = run_together(2 * len(job_ids), resolve)
    settled = [results[i] for i in range(0, len(results), 2)]
    released = [results[i] for i in range(1, len(results), 2)]
    for outcome in zip(settled, released, strict=True):
        assert outcome in {(15, False), (None, True)}

    settles = sum(1 for charged in settled if charged == 15)
    assert counters(db, code_id) == {
        "budget": 1000,
        "reserved": 0,
        "spent": 15 * settles,
        "uses": settles,
    }
    with db.transaction() as session:
        per_job = session.execute(
            select(LedgerEntry.job_id, func.count())
            .where(LedgerEntry.kind.in_(["settle", "release"]))
            .group_by(LedgerEntry.job_id)
        ).all()
    assert sorted(per_job) == sorted((job_id, 1) for job_id in job_ids)
