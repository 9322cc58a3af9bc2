"""The credit ledger on SQLite and PostgreSQL: codes, reservations, settlement and the backstops."""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import string
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import IntegrityError

from transcription import jobfiles, ledger
from transcription.db.models import CreditCode, Job, LedgerEntry, utcnow
from transcription.db.session import Database
from transcription.errors import (
    CodeExpired,
    CodeRevoked,
    Conflict,
    InsufficientCredit,
    InvalidRequest,
    Unauthenticated,
    UsesExhausted,
)
from transcription.lifecycle import NewJob, new_job_id, submit
from transcription.states import CreditState

KEY = b"test-code-key-0123456789abcdef"


def new_job(code_id: str, audio_seconds: float) -> NewJob:
    """A validated upload of ``audio_seconds`` paid by the code, as the gateway submits it."""
    job_id = new_job_id()
    return NewJob(
        job_id=job_id,
        code_id=code_id,
        audio_key=jobfiles.audio_key(job_id),
        audio_bytes=4096,
        audio_seconds=audio_seconds,
        filename="talk.mp3",
        language=None,
        prompt=None,
        mode="fast",
        engine="local",
        model=None,
    )


def issue(db: Database, seconds: int, max_uses: int = 1, **options: Any) -> ledger.IssuedCode:
    """Issue a code in its own transaction."""
    with db.transaction() as session:
        return ledger.issue_code(session, KEY, seconds=seconds, max_uses=max_uses, **options)


def submit_job(db: Database, code_id: str, audio_seconds: float) -> Job:
    """Submit a job (which reserves its credit) in its own transaction."""
    with db.transaction() as session:
        return submit(session, new_job(code_id, audio_seconds))


def counters(db: Database, code_id: str) -> dict[str, int]:
    """The code's counters, after checking that its ledger sums to them and the budget holds."""
    with db.transaction() as session:
        record = session.get(CreditCode, code_id)
        assert record is not None
        values = {
            "budget": record.budget_seconds,
            "reserved": record.reserved_seconds,
            "spent": record.spent_seconds,
            "uses": record.uses,
        }
        assert ledger.ledger_totals(session, code_id) == values
        assert 0 <= values["spent"] + values["reserved"] <= values["budget"]
        assert 0 <= values["uses"] <= record.max_uses
    return values


def ledger_rows(db: Database) -> int:
    with db.transaction() as session:
        return session.scalar(select(func.count()).select_from(LedgerEntry)) or 0


def job_count(db: Database) -> int:
    with db.transaction() as session:
        return session.scalar(select(func.count()).select_from(Job)) or 0


def test_code_is_shown_once_and_only_its_keyed_hash_is_stored(db: Database) -> None:
    """The plaintext is returned at issue only; storage holds an HMAC of it and no fragment."""
    issued = issue(db, 120, label="conference")
    job = submit_job(db, issued.record.id, 30)
    with db.transaction() as session:
        ledger.settle(session, job.id, 25)

    assert issued.code.startswith("wt_")
    expected = hmac.new(KEY, issued.code.encode(), hashlib.sha256).hexdigest()
    assert issued.record.code_hash == expected
    assert expected != hashlib.sha256(issued.code.encode()).hexdigest()

    windows = {issued.code[i : i + 8] for i in range(len(issued.code) - 7)}
    with db.engine.connect() as conn:
        cells = [
            str(value)
            for table in inspect(conn).get_table_names()
            for row in conn.execute(text(f'SELECT * FROM "{table}"'))
            for value in row
        ]
    assert expected in cells
    assert not [cell for cell in cells if any(window in cell for window in windows)]

    with db.transaction() as session:
        assert ledger.authenticate(session, KEY, issued.code).id == issued.record.id
        with pytest.raises(Unauthenticated):
            ledger.authenticate(session, b"another-deployment-key", issued.code)


def test_codes_carry_at_least_128_bits_of_randomness() -> None:
    """Every character after the prefix is drawn from the URL-safe alphabet, independently."""
    codes = [ledger.generate_code() for _ in range(2000)]
    assert all(code.startswith("wt_") for code in codes)
    assert len(set(codes)) == len(codes)
    bodies = [code.removeprefix("wt_") for code in codes]
    alphabet = set(string.ascii_letters + string.digits + "-_")
    assert all(set(body) <= alphabet for body in bodies)
    # Each position contributes at most log2(distinct symbols seen there) bits.
    width = min(len(body) for body in bodies)
    bits = sum(math.log2(len({body[i] for body in bodies})) for i in range(width))
    assert bits >= 128


def test_authenticate_rejects_unknown_and_garbled_codes(db: Database) -> None:
    """Anything but the exact issued code is Unauthenticated; the code itself still works."""
    code = issue(db, 60).code
    flipped = code[:-1] + ("A" if code[-1] != "A" else "B")
    attempts = [
        ledger.generate_code(),
        code[:-1],
        flipped,
        code + "x",
        code.removeprefix("wt_"),
        "WT_" + code.removeprefix("wt_"),
        " " + code,
        "",
        "wt_",
        "wt_" + "A" * 500,
    ]
    with db.transaction() as session:
        for attempt in attempts:
            with pytest.raises(Unauthenticated):
                ledger.authenticate(session, KEY, attempt)
        assert ledger.authenticate(session, KEY, code).code_hash


def test_issue_rejects_worthless_codes(db: Database) -> None:
    """A code must be worth at least a second and allow at least one use."""
    with pytest.raises(InvalidRequest):
        issue(db, 0)
    with pytest.raises(InvalidRequest):
        issue(db, 60, max_uses=0)
    assert ledger_rows(db) == 0


def test_reserve_holds_audio_seconds_rounded_up(db: Database) -> None:
    """Each submission holds ceil(audio seconds), never less than one second."""
    code_id = issue(db, 1000, max_uses=6).record.id
    reserved = 0
    cases = [(0.2, 1), (1.0, 1), (10.0, 10), (10.01, 11), (59.5, 60), (61.99, 62)]
    for uses, (audio, expected) in enumerate(cases, start=1):
        job = submit_job(db, code_id, audio)
        reserved += expected
        assert job.reserved_seconds == expected
        assert job.credit_state == CreditState.HELD
        assert counters(db, code_id) == {
            "budget": 1000,
            "reserved": reserved,
            "spent": 0,
            "uses": uses,
        }


def test_the_submitted_job_is_the_stored_row_and_stays_tracked(db: Database) -> None:
    """The job handed back by a submission is what was stored, and changing it in the same
    transaction updates that row rather than inserting it twice."""
    code_id = issue(db, 100).record.id
    with db.transaction() as session:
        job = submit(session, new_job(code_id, 12.5))
        job.language = "en"
    with db.transaction() as session:
        stored = session.get(Job, job.id)
        assert stored is not None
        columns = [c.key for c in Job.__table__.columns if c.key != "updated_at"]
        assert {c: getattr(stored, c) for c in columns} == {c: getattr(job, c) for c in columns}
        assert stored.language == "en"
        assert (stored.status, stored.progress, stored.attempts) == ("queued", 0.0, 0)
    assert job_count(db) == 1
    assert ledger_rows(db) == 2  # the code's issue and this reservation


def test_codes_are_single_use_by_default(db: Database) -> None:
    """A second submission on a default code is refused even though budget is left."""
    code_id = issue(db, 100).record.id
    submit_job(db, code_id, 10)
    with pytest.raises(UsesExhausted):
        submit_job(db, code_id, 10)
    assert job_count(db) == 1
    assert counters(db, code_id) == {"budget": 100, "reserved": 10, "spent": 0, "uses": 1}


def test_insufficient_budget_reports_the_seconds_left(db: Database) -> None:
    """A submission larger than what is left fails, names the remainder and holds nothing."""
    code_id = issue(db, 30, max_uses=3).record.id
    submit_job(db, code_id, 20)
    with pytest.raises(InsufficientCredit) as raised:
        submit_job(db, code_id, 14.5)
    assert re.search(r"\b10 s\b", str(raised.value))
    assert job_count(db) == 1
    assert counters(db, code_id) == {"budget": 30, "reserved": 20, "spent": 0, "uses": 1}
    submit_job(db, code_id, 10)
    assert counters(db, code_id) == {"budget": 30, "reserved": 30, "spent": 0, "uses": 2}


def test_expired_codes_cannot_reserve(db: Database) -> None:
    """A code past its expiry is refused, whether issued so or expired later; a future one works."""
    past = utcnow() - timedelta(seconds=1)
    born_expired = issue(db, 60, expires_at=past).record.id
    later_expired = issue(db, 60).record.id
    with db.transaction() as session:
        ledger.set_expiry(session, later_expired, past)
    still_valid = issue(db, 60, expires_at=utcnow() + timedelta(hours=1)).record.id

    for code_id in (born_expired, later_expired):
        with pytest.raises(CodeExpired):
            submit_job(db, code_id, 5)
        assert counters(db, code_id) == {"budget": 60, "reserved": 0, "spent": 0, "uses": 0}
    submit_job(db, still_valid, 5)
    assert counters(db, still_valid) == {"budget": 60, "reserved": 5, "spent": 0, "uses": 1}


def test_revoked_codes_cannot_reserve_but_held_jobs_still_settle(db: Database) -> None:
    """Revocation stops new jobs; a job already holding credit is still charged normally."""
    code_id = issue(db, 100, max_uses=3).record.id
    job = submit_job(db, code_id, 40)
    with db.transaction() as session:
        ledger.revoke(session, code_id)
    with pytest.raises(CodeRevoked):
        submit_job(db, code_id, 5)
    with db.transaction() as session:
        assert ledger.settle(session, job.id, 35) == 35
    assert counters(db, code_id) == {"budget": 100, "reserved": 0, "spent": 35, "uses": 1}


@pytest.mark.parametrize(("charged", "expected"), [(42, 42), (0, 0), (60, 60), (500, 60)])
def test_settle_charges_what_was_transcribed_up_to_the_reservation(
    db: Database, charged: int, expected: int
) -> None:
    """Settling charges the actual seconds, capped at the reservation, and frees the rest."""
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 59.2)
    with db.transaction() as session:
        assert ledger.settle(session, job.id, charged) == expected
        stored = session.get(Job, job.id)
        assert stored is not None
        assert stored.credit_state == CreditState.SETTLED
        assert stored.charged_seconds == expected
    assert counters(db, code_id) == {"budget": 100, "reserved": 0, "spent": expected, "uses": 1}


def _settle(db: Database, job_id: str) -> object:
    with db.transaction() as session:
        return ledger.settle(session, job_id, 20)


def _release(db: Database, job_id: str) -> object:
    with db.transaction() as session:
        return ledger.release(session, job_id)


@pytest.mark.parametrize(
    ("first", "replay", "no_op"),
    [
        (_settle, _settle, None),
        (_settle, _release, False),
        (_release, _settle, None),
        (_release, _release, False),
    ],
    ids=["settle-settle", "settle-release", "release-settle", "release-release"],
)
def test_a_resolved_reservation_never_moves_again(
    db: Database,
    first: Callable[[Database, str], object],
    replay: Callable[[Database, str], object],
    no_op: object,
) -> None:
    """Replaying a settlement or release after either one changes no counter and adds no row."""
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 30)
    assert first(db, job.id) not in (None, False)
    after_first = counters(db, code_id)
    rows = ledger_rows(db)

    assert replay(db, job.id) is no_op
    assert replay(db, job.id) is no_op
    assert counters(db, code_id) == after_first
    assert ledger_rows(db) == rows


def test_release_gives_the_use_back(db: Database) -> None:
    """Releasing frees the whole reservation and the use, so a single-use code works again."""
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 30)
    with db.transaction() as session:
        assert ledger.release(session, job.id) is True
        stored = session.get(Job, job.id)
        assert stored is not None
        assert stored.credit_state == CreditState.RELEASED
        assert stored.charged_seconds == 0
    assert counters(db, code_id) == {"budget": 100, "reserved": 0, "spent": 0, "uses": 0}
    submit_job(db, code_id, 90)
    assert counters(db, code_id) == {"budget": 100, "reserved": 90, "spent": 0, "uses": 1}


def test_top_up_adds_budget(db: Database) -> None:
    """A top-up lets a code pay for audio it could not before; adding nothing is refused."""
    code_id = issue(db, 10).record.id
    with pytest.raises(InsufficientCredit):
        submit_job(db, code_id, 25)
    with db.transaction() as session:
        assert ledger.top_up(session, code_id, 20).budget_seconds == 30
        with pytest.raises(InvalidRequest):
            ledger.top_up(session, code_id, 0)
    submit_job(db, code_id, 25)
    assert counters(db, code_id) == {"budget": 30, "reserved": 25, "spent": 0, "uses": 1}


def test_minting_and_topping_up_share_one_budget_rule(db: Database) -> None:
    """A budget minting refuses is one no top-up can reach, and the other way round: no code
    exists that a later top-up would refuse for its size alone."""
    largest = ledger.MAX_BUDGET_SECONDS
    for seconds in (0, largest + 1, 10**20):
        with pytest.raises(InvalidRequest, match="budget must be from 1 to"):
            issue(db, seconds)
    for max_uses in (0, ledger.MAX_USES + 1):
        with pytest.raises(InvalidRequest, match="max_uses must be from 1 to"):
            issue(db, 60, max_uses=max_uses)
    code_id = issue(db, largest - 10).record.id
    with (
        pytest.raises(InvalidRequest, match="at most 10 s can be added") as refused,
        db.transaction() as session,
    ):
        ledger.top_up(session, code_id, 11)
    assert refused.value.param == "add_seconds"
    with db.transaction() as session:
        assert ledger.top_up(session, code_id, 10).budget_seconds == largest


def test_a_revoked_code_gets_no_more_seconds_or_uses(db: Database) -> None:
    """Revocation is for good: a top-up or a higher max_uses is refused, not silently kept."""
    code_id = issue(db, 60).record.id
    with db.transaction() as session:
        ledger.revoke(session, code_id)
    for change in (
        lambda session: ledger.top_up(session, code_id, 60),
        lambda session: ledger.set_max_uses(session, code_id, 5),
    ):
        with pytest.raises(Conflict, match="revoked") as refused, db.transaction() as session:
            change(session)
        assert refused.value.code == "code_revoked"
    assert counters(db, code_id) == {"budget": 60, "reserved": 0, "spent": 0, "uses": 0}


def test_max_uses_cannot_drop_below_the_uses_made(db: Database) -> None:
    """Lowering max_uses below the uses made is refused; raising it allows more jobs."""
    code_id = issue(db, 100, max_uses=3).record.id
    submit_job(db, code_id, 10)
    submit_job(db, code_id, 10)
    with pytest.raises(InvalidRequest), db.transaction() as session:
        ledger.set_max_uses(session, code_id, 1)
    with db.transaction() as session:
        assert ledger.set_max_uses(session, code_id, 2).max_uses == 2
    with pytest.raises(UsesExhausted):
        submit_job(db, code_id, 10)
    with db.transaction() as session:
        ledger.set_max_uses(session, code_id, 4)
    submit_job(db, code_id, 10)
    assert counters(db, code_id) == {"budget": 100, "reserved": 30, "spent": 0, "uses": 3}


def test_max_uses_check_sees_uses_made_in_the_same_transaction(db: Database) -> None:
    """The max_uses check counts a reservation made earlier in the same session."""
    with db.transaction() as session:
        record = ledger.issue_code(session, KEY, seconds=100, max_uses=3).record
        submit(session, new_job(record.id, 10))
        submit(session, new_job(record.id, 10))
        with pytest.raises(InvalidRequest):
            ledger.set_max_uses(session, record.id, 1)


def test_check_constraints_reject_a_direct_overspend(db: Database) -> None:
    """Even an UPDATE that bypasses the ledger cannot break the budget or use limits."""
    code_id = issue(db, 100, max_uses=2).record.id
    submit_job(db, code_id, 40)
    before = counters(db, code_id)
    for assignment in [
        "spent_seconds = budget_seconds + 1",
        "reserved_seconds = budget_seconds - spent_seconds + 1",
        "reserved_seconds = -1",
        "budget_seconds = reserved_seconds + spent_seconds - 1",
        "uses = max_uses + 1",
        "uses = -1",
        "max_uses = 0",
    ]:
        try:
            with db.transaction() as session:
                session.execute(
                    text(f"UPDATE credit_codes SET {assignment} WHERE id = :id"), {"id": code_id}
                )
        except IntegrityError:
            continue
        pytest.fail(f"the database accepted SET {assignment}")
    assert counters(db, code_id) == before
