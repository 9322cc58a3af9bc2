"""SQLAlchemy models: credit codes, their ledger, jobs, transcripts and idempotency keys."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
    true,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from transcription.states import (
    RESOLUTIONS,
    CodeState,
    CreditState,
    EngineKind,
    EntryKind,
    JobStatus,
    Mode,
)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC and returns aware datetimes, so SQLite and PostgreSQL behave alike."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass an aware datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def enum_column(enum: type[StrEnum], name: str) -> Enum:
    """A column holding one of ``enum``'s values, checked by the database (a named CHECK)."""
    return Enum(
        enum,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


RESOLVED_KINDS = "kind IN ({})".format(", ".join(f"'{k.value}'" for k in sorted(RESOLUTIONS)))


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class CreditCode(Base):
    """A prepaid code; only the keyed hash of its secret is stored."""

    __tablename__ = "credit_codes"
    __table_args__ = (
        CheckConstraint("budget_seconds >= 0", name="budget_nonnegative"),
        CheckConstraint("reserved_seconds >= 0", name="reserved_nonnegative"),
        CheckConstraint("spent_seconds >= 0", name="spent_nonnegative"),
        CheckConstraint("spent_seconds + reserved_seconds <= budget_seconds", name="within_budget"),
        CheckConstraint("max_uses >= 1", name="max_uses_positive"),
        CheckConstraint("uses >= 0 AND uses <= max_uses", name="uses_within_max"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hint: Mapped[str] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(String(200))
    budget_seconds: Mapped[int] = mapped_column(Integer)
    reserved_seconds: Mapped[int] = mapped_column(Integer, default=0)
    spent_seconds: Mapped[int] = mapped_column(Integer, default=0)
    max_uses: Mapped[int] = mapped_column(Integer, default=1)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    @property
    def remaining_seconds(self) -> int:
        return self.budget_seconds - self.spent_seconds - self.reserved_seconds

    def state(self, now: datetime | None = None) -> CodeState:
        now = now or utcnow()
        if self.revoked_at is not None:
            return CodeState.REVOKED
        if self.expires_at is not None and self.expires_at <= now:
            return CodeState.EXPIRED
        if self.uses >= self.max_uses or self.remaining_seconds <= 0:
            return CodeState.EXHAUSTED
        return CodeState.ACTIVE


class LedgerEntry(Base):
    """One credit movement; the deltas of a code's entries sum to its counters."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        UniqueConstraint("job_id", "kind", name="uq_ledger_entries_job_kind"),
        # A reservation resolves once: a settle and a release for one job cannot both exist.
        Index(
            "uq_ledger_entries_job_resolution",
            "job_id",
            unique=True,
            sqlite_where=text(RESOLVED_KINDS),
            postgresql_where=text(RESOLVED_KINDS),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    code_id: Mapped[str] = mapped_column(ForeignKey("credit_codes.id"), index=True)
    job_id: Mapped[str | None] = mapped_column(String(32))
    kind: Mapped[EntryKind] = mapped_column(enum_column(EntryKind, "entry_kind"))
    budget_delta: Mapped[int] = mapped_column(Integer, default=0)
    reserved_delta: Mapped[int] = mapped_column(Integer, default=0)
    spent_delta: Mapped[int] = mapped_column(Integer, default=0)
    uses_delta: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Job(Base):
    """A transcription request and everything known about its progress."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_code_created", "code_id", "created_at"),
        Index("ix_jobs_status_created", "status", "created_at"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress_fraction"),
        CheckConstraint(
            "charged_seconds IS NULL OR (charged_seconds >= 0 "
            "AND charged_seconds <= reserved_seconds)",
            name="charged_within_reserved",
        ),
        CheckConstraint("attempts >= 0", name="attempts_nonnegative"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    code_id: Mapped[str] = mapped_column(ForeignKey("credit_codes.id"))
    status: Mapped[JobStatus] = mapped_column(enum_column(JobStatus, "job_status"))
    credit_state: Mapped[CreditState] = mapped_column(enum_column(CreditState, "credit_state"))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    filename: Mapped[str | None] = mapped_column(String(255))
    audio_key: Mapped[str] = mapped_column(String(255))
    audio_bytes: Mapped[int] = mapped_column(Integer)
    audio_seconds: Mapped[float] = mapped_column(Float)
    reserved_seconds: Mapped[int] = mapped_column(Integer)
    charged_seconds: Mapped[int | None] = mapped_column(Integer)
    language: Mapped[str | None] = mapped_column(String(16))
    prompt: Mapped[str | None] = mapped_column(Text)
    temperature: Mapped[float | None] = mapped_column(Float)
    word_timestamps: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    mode: Mapped[Mode] = mapped_column(enum_column(Mode, "mode"))
    engine: Mapped[EngineKind] = mapped_column(enum_column(EngineKind, "engine"))
    model: Mapped[str | None] = mapped_column(String(200))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class Transcript(Base):
    """The finished transcript of a job: its text and where each rendering is stored."""

    __tablename__ = "transcripts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), unique=True)
    language: Mapped[str | None] = mapped_column(String(16))
    duration_seconds: Mapped[float] = mapped_column(Float)
    text: Mapped[str] = mapped_column(Text)
    segment_count: Mapped[int] = mapped_column(Integer)
    uris: Mapped[dict[str, str]] = mapped_column(JSON)
    model: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class IdempotencyKey(Base):
    """An ``Idempotency-Key`` seen for a code: in flight until it points at a job."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("code_id", "key", name="uq_idempotency_keys_code_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    code_id: Mapped[str] = mapped_column(ForeignKey("credit_codes.id"))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
