"""The credit ledger: issue codes, reserve, settle, release, top up and revoke, atomically.

Every movement changes a code's counters with one conditional ``UPDATE`` and records the same
deltas as a ledger row keyed by (job, kind), so a replayed settlement or release is a no-op and
the ledger always sums to the counters. Functions take a session inside the caller's transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Insert,
    Integer,
    Select,
    Update,
    bindparam,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.orm import Session, make_transient_to_detached

from transcription import metrics
from transcription.db.models import CreditCode, Job, LedgerEntry, UTCDateTime, utcnow
from transcription.errors import (
    CodeExpired,
    CodeRevoked,
    Conflict,
    InsufficientCredit,
    InvalidRequest,
    NotFound,
    Unauthenticated,
    UsesExhausted,
)
from transcription.states import CreditState, EntryKind

CODE_PREFIX = "wt_"
CODE_ID_PREFIX = "cc_"
#: Counters are 32-bit integers in the database.
MAX_BUDGET_SECONDS = 2_000_000_000
MAX_USES = 2_000_000_000
#: 22 URL-safe base64 characters carry 132 bits.
MIN_SECRET_CHARS = 22


@dataclass(frozen=True)
class IssuedCode:
    """A freshly minted code: the plaintext exists only here, never in storage."""

    code: str
    record: CreditCode


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(8)


def generate_code() -> str:
    """A code with 192 bits of randomness behind a readable prefix."""
    return CODE_PREFIX + secrets.token_urlsafe(24)


def hash_code(code: str, key: bytes) -> str:
    return hmac.new(key, code.encode(), hashlib.sha256).hexdigest()


def seconds_to_reserve(audio_seconds: float) -> int:
    return max(1, math.ceil(audio_seconds - 1e-6))


def check_budget(seconds: int, *, param: str = "seconds", held: int = 0) -> None:
    """Refuse a budget no code may have; minting and topping up share this rule, so a code
    can never be minted with a budget a top-up would then refuse to grow."""
    if not 1 <= held + seconds <= MAX_BUDGET_SECONDS:
        already = f" (it has {held} s, so at most {MAX_BUDGET_SECONDS - held} s can be added)"
        raise InvalidRequest(
            f"A code's budget must be from 1 to {MAX_BUDGET_SECONDS} seconds"
            + (already if held else "")
            + ".",
            param=param,
        )


def check_max_uses(max_uses: int, *, uses: int = 0) -> None:
    """Refuse a use limit no code may have, or one below the uses already made."""
    if not max(1, uses) <= max_uses <= MAX_USES:
        raise InvalidRequest(
            f"max_uses must be from {max(1, uses)} to {MAX_USES}"
            + (f": the code has already been used {uses} times." if uses else "."),
            param="max_uses",
        )


def issue_code(
    session: Session,
    key: bytes,
    *,
    seconds: int,
    max_uses: int = 1,
    expires_at: datetime | None = None,
    label: str | None = None,
    code: str | None = None,
    code_id: str | None = None,
) -> IssuedCode:
    """Mint a code; ``code`` and ``code_id`` let a replayed mint (the operator) reuse its own."""
    check_budget(seconds)
    check_max_uses(max_uses)
    if code is not None and (
        not code.startswith(CODE_PREFIX) or len(code) - len(CODE_PREFIX) < MIN_SECRET_CHARS
    ):
        raise InvalidRequest(
            f"A code must start with {CODE_PREFIX!r} and carry at least 128 bits.", param="code"
        )
    code = code or generate_code()
    record = CreditCode(
        id=code_id or new_id(CODE_ID_PREFIX),
        code_hash=hash_code(code, key),
        hint=code[-4:],
        label=label,
        budget_seconds=seconds,
        reserved_seconds=0,
        spent_seconds=0,
        max_uses=max_uses,
        uses=0,
        expires_at=expires_at,
    )
    session.add(record)
    session.flush()
    session.add(LedgerEntry(code_id=record.id, kind=EntryKind.ISSUE, budget_delta=seconds))
    return IssuedCode(code=code, record=record)


def authenticate(session: Session, key: bytes, code: str) -> CreditCode:
    """The code's record, or ``Unauthenticated``; says nothing about whether it can pay."""
    if not code.startswith(CODE_PREFIX) or len(code) > 200:
        raise Unauthenticated("The credit code is not valid.")
    digest = hash_code(code, key)
    record = session.scalar(select(CreditCode).where(CreditCode.code_hash == digest))
    # The lookup is by an index, so compare again in constant time to keep the check honest.
    if record is None or not hmac.compare_digest(record.code_hash, digest):
        raise Unauthenticated("The credit code is not valid.")
    return record


def get_code(session: Session, code_id: str, *, for_update: bool = False) -> CreditCode:
    stmt = select(CreditCode).where(CreditCode.id == code_id)
    if for_update:
        # The session may hold a stale copy that a conditional UPDATE changed underneath.
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    record = session.scalar(stmt)
    if record is None:
        raise NotFound(f"No credit code with ID {code_id!r}.", param="id")
    return record


def ensure_usable(record: CreditCode, now: datetime | None = None) -> None:
    """Raise the 402-class error that explains why the code cannot start a new job of any
    length; the gateway asks before it reads an upload."""
    now = now or utcnow()
    if record.revoked_at is not None:
        raise CodeRevoked("This credit code has been revoked.")
    if record.expires_at is not None and record.expires_at <= now:
        raise CodeExpired(f"This credit code expired at {record.expires_at.isoformat()}.")
    if record.uses >= record.max_uses:
        raise UsesExhausted(
            f"This credit code has been used {record.uses} of {record.max_uses} times."
        )
    if record.remaining_seconds < 1:
        held = record.reserved_seconds
        raise InsufficientCredit(
            "This credit code has no seconds left"
            + (f"; {held} s are held by its unfinished jobs." if held else ".")
        )


def reserve(session: Session, job: Job) -> None:
    """Hold the job's ``reserved_seconds`` and one use of its code, inserting the job and the
    ledger row with it, or raise why the code cannot pay; ``job`` must not be in the database yet.

    On PostgreSQL this is one prepared statement (a data-modifying CTE): a reservation is one
    round trip, and the code's row stays locked only until the commit.
    """
    seconds = job.reserved_seconds
    if seconds < 1:
        raise InvalidRequest("A reservation must be at least one second.", param="seconds")
    params = reservation_params(job)
    now = job.created_at
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        held = connection.execute(reservation_statement(), params).first() is not None
    else:
        held = connection.execute(_hold(), params).rowcount == 1
        if held:
            connection.execute(insert(Job).values(_job_values()), params)
            connection.execute(insert(LedgerEntry).values(_entry_values()), params)
    if not held:
        record = get_code(session, job.code_id)
        session.refresh(record)
        ensure_usable(record, now)
        raise InsufficientCredit(
            f"The audio needs {seconds} s of credit; this code has "
            f"{max(record.remaining_seconds, 0)} s left."
        )
    # The row exists now: let the session track the object without inserting it again.
    make_transient_to_detached(job)
    session.add(job)
    metrics.credit_reserved(session, seconds)


def reservation_params(job: Job) -> dict[str, object]:
    """Stamp the new job's times and return the bound parameters of the reservation statements."""
    now = utcnow()
    job.created_at = job.updated_at = now
    params: dict[str, object] = {
        "code_id": job.code_id,
        "seconds": job.reserved_seconds,
        "now": now,
    }
    for column in Job.__table__.columns:
        # Setting every column also keeps unset ones from reading as unloaded later.
        value = getattr(job, column.key)
        setattr(job, column.key, value)
        params[f"job_{column.key}"] = value
    return params


# The reservation's statements are built once, with bound parameters, so SQLAlchemy's compiled
# cache and psycopg's prepared statements make the hot path cheap.
@cache
def _hold() -> Update:
    """Take the seconds and a use from the code only if it is usable and can pay."""
    seconds, now = bindparam("seconds", type_=Integer), bindparam("now", type_=UTCDateTime())
    return (
        update(CreditCode)
        .where(
            CreditCode.id == bindparam("code_id"),
            CreditCode.revoked_at.is_(None),
            (CreditCode.expires_at.is_(None)) | (CreditCode.expires_at > now),
            CreditCode.uses < CreditCode.max_uses,
            CreditCode.budget_seconds - CreditCode.spent_seconds - CreditCode.reserved_seconds
            >= seconds,
        )
        .values(reserved_seconds=CreditCode.reserved_seconds + seconds, uses=CreditCode.uses + 1)
    )


@cache
def _job_values() -> dict[str, BindParameter[Any]]:
    return {c.key: bindparam(f"job_{c.key}", type_=c.type) for c in Job.__table__.columns}


@cache
def _entry_values() -> dict[str, ColumnElement[Any]]:
    return {
        "code_id": bindparam("code_id"),
        "job_id": _job_values()["id"],
        "kind": literal(EntryKind.RESERVE.value),
        "budget_delta": literal(0),
        "reserved_delta": bindparam("seconds", type_=Integer),
        "spent_delta": literal(0),
        "uses_delta": literal(1),
        "created_at": bindparam("now", type_=UTCDateTime()),
    }


@cache
def reservation_statement() -> Insert:
    """``WITH held AS (UPDATE code ... RETURNING id), entry AS (INSERT ledger row SELECT ...
    FROM held) INSERT INTO jobs SELECT ... FROM held``: nothing is written unless the code paid."""
    held = _hold().returning(CreditCode.id).cte("held")

    def from_held(values: dict[str, Any]) -> Select[Any]:
        return select(*values.values()).select_from(held)

    entry = _entry_values()
    ledger_row = (
        insert(LedgerEntry)
        .from_select(list(entry), from_held(entry))
        .returning(LedgerEntry.id)
        .cte("entry")
    )
    return (
        insert(Job)
        .from_select(list(_job_values()), from_held(_job_values()))
        .returning(Job.id)
        .add_cte(held, ledger_row)
    )


def _resolve(session: Session, job_id: str, to: CreditState) -> Job | None:
    """Move the job's reservation out of HELD exactly once; None if it already moved."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.credit_state == CreditState.HELD)
        .values(credit_state=to)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    job = session.get(Job, job_id)
    if job is not None:
        session.refresh(job)
    return job


def settle(session: Session, job_id: str, charged_seconds: int) -> int | None:
    """Charge what was transcribed (never more than reserved) and release the rest."""
    job = _resolve(session, job_id, CreditState.SETTLED)
    if job is None:
        return None
    charged = max(0, min(charged_seconds, job.reserved_seconds))
    session.execute(
        update(CreditCode)
        .where(CreditCode.id == job.code_id)
        .values(
            reserved_seconds=CreditCode.reserved_seconds - job.reserved_seconds,
            spent_seconds=CreditCode.spent_seconds + charged,
        )
        .execution_options(synchronize_session=False)
    )
    session.add(
        LedgerEntry(
            code_id=job.code_id,
            job_id=job_id,
            kind=EntryKind.SETTLE,
            reserved_delta=-job.reserved_seconds,
            spent_delta=charged,
        )
    )
    job.charged_seconds = charged
    session.flush()
    metrics.credit_resolved(session, reserved=job.reserved_seconds, charged=charged)
    return charged


def release(session: Session, job_id: str) -> bool:
    """Give back the whole reservation and its use; False if it was already resolved."""
    job = _resolve(session, job_id, CreditState.RELEASED)
    if job is None:
        return False
    session.execute(
        update(CreditCode)
        .where(CreditCode.id == job.code_id)
        .values(
            reserved_seconds=CreditCode.reserved_seconds - job.reserved_seconds,
            uses=CreditCode.uses - 1,
        )
        .execution_options(synchronize_session=False)
    )
    session.add(
        LedgerEntry(
            code_id=job.code_id,
            job_id=job_id,
            kind=EntryKind.RELEASE,
            reserved_delta=-job.reserved_seconds,
            uses_delta=-1,
        )
    )
    job.charged_seconds = 0
    session.flush()
    metrics.credit_resolved(session, reserved=job.reserved_seconds, charged=0)
    return True


def top_up(session: Session, code_id: str, seconds: int) -> CreditCode:
    """Add ``seconds`` to the code's budget (an admin action)."""
    if seconds < 1:
        raise InvalidRequest("A top-up must add at least one second.", param="add_seconds")
    record = get_code(session, code_id, for_update=True)
    ensure_changeable(record)
    check_budget(seconds, param="add_seconds", held=record.budget_seconds)
    session.execute(
        update(CreditCode)
        .where(CreditCode.id == code_id)
        .values(budget_seconds=CreditCode.budget_seconds + seconds)
        .execution_options(synchronize_session=False)
    )
    session.add(LedgerEntry(code_id=code_id, kind=EntryKind.TOP_UP, budget_delta=seconds))
    return _fresh(session, code_id)


def ensure_changeable(record: CreditCode) -> None:
    """Refuse to give a revoked code more to spend: revocation is for good, so the change
    would look applied and never let the code pay."""
    if record.revoked_at is not None:
        raise Conflict(
            "This credit code has been revoked, for good: no top-up can make it usable again; "
            "issue a new code instead.",
            param="id",
            code="code_revoked",
        )


def set_max_uses(session: Session, code_id: str, max_uses: int) -> CreditCode:
    record = get_code(session, code_id, for_update=True)
    ensure_changeable(record)
    check_max_uses(max_uses, uses=record.uses)
    record.max_uses = max_uses
    session.flush()
    return record


def set_expiry(session: Session, code_id: str, expires_at: datetime | None) -> CreditCode:
    record = get_code(session, code_id)
    record.expires_at = expires_at
    session.flush()
    return record


def revoke(session: Session, code_id: str) -> CreditCode:
    """Stop the code from starting new jobs; jobs already reserved still resolve normally."""
    record = get_code(session, code_id)
    if record.revoked_at is None:
        record.revoked_at = utcnow()
        session.flush()
    return record


def ledger_totals(session: Session, code_id: str) -> dict[str, int]:
    """The sums of the code's ledger deltas; they equal its counters, always."""
    row = session.execute(
        select(
            func.coalesce(func.sum(LedgerEntry.budget_delta), 0),
            func.coalesce(func.sum(LedgerEntry.reserved_delta), 0),
            func.coalesce(func.sum(LedgerEntry.spent_delta), 0),
            func.coalesce(func.sum(LedgerEntry.uses_delta), 0),
        ).where(LedgerEntry.code_id == code_id)
    ).one()
    return {"budget": row[0], "reserved": row[1], "spent": row[2], "uses": row[3]}


def _fresh(session: Session, code_id: str) -> CreditCode:
    record = get_code(session, code_id)
    session.refresh(record)
    return record
