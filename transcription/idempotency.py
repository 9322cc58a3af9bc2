"""Idempotency-Key bookkeeping: claim a key, point it at the job it created, or replay it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from transcription.db.models import IdempotencyKey, utcnow
from transcription.db.session import Database
from transcription.errors import IdempotencyKeyInUse, IdempotencyKeyReused, InvalidRequest

MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class Claim:
    """This request owns the key and must ``complete`` or ``abandon`` it."""

    row_id: int


@dataclass(frozen=True)
class Replay:
    """The key already produced a job; the same request gets the same job back."""

    job_id: str
    request_hash: str


def claim(db: Database, code_id: str, key: str, ttl: timedelta) -> Claim | Replay:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters.",
            param="Idempotency-Key",
        )
    now = utcnow()
    with db.transaction() as session:
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.expires_at <= now))
        existing = session.scalar(
            select(IdempotencyKey).where(
                IdempotencyKey.code_id == code_id, IdempotencyKey.key == key
            )
        )
        if existing is not None:
            if existing.job_id is None or existing.request_hash is None:
                raise IdempotencyKeyInUse(
                    "A request with this Idempotency-Key is still being processed; retry later.",
                    param="Idempotency-Key",
                )
            return Replay(job_id=existing.job_id, request_hash=existing.request_hash)
    try:
        with db.transaction() as session:
            row = IdempotencyKey(code_id=code_id, key=key, expires_at=now + ttl)
            session.add(row)
            session.flush()
            return Claim(row_id=row.id)
    except IntegrityError as exc:
        raise IdempotencyKeyInUse(
            "A request with this Idempotency-Key is still being processed; retry later.",
            param="Idempotency-Key",
        ) from exc


def check_replay(replay: Replay, request_hash: str) -> str:
    """The job to replay, or an error when the key is reused for a different request."""
    if replay.request_hash != request_hash:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was already used with a different request.",
            param="Idempotency-Key",
        )
    return replay.job_id


def complete(session: Session, owned: Claim, job_id: str, request_hash: str) -> None:
    row = session.get(IdempotencyKey, owned.row_id)
    if row is not None:
        row.job_id = job_id
        row.request_hash = request_hash


def abandon(db: Database, owned: Claim) -> None:
    """Free a key whose request was rejected, so nothing about it is kept."""
    with db.transaction() as session:
        session.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.id == owned.row_id, IdempotencyKey.job_id.is_(None)
            )
        )


def forget(db: Database, job_id: str) -> None:
    """Free the key that made a job which was refunded before anyone was told of it, so a
    retry with the same key submits anew instead of replaying the cancelled job."""
    with db.transaction() as session:
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.job_id == job_id))
