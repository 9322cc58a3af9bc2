"""Database models, engine/session helpers and Alembic migrations."""

from transcription.db.models import (
    Base,
    CreditCode,
    IdempotencyKey,
    Job,
    LedgerEntry,
    Transcript,
)
from transcription.db.session import Database

__all__ = [
    "Base",
    "CreditCode",
    "Database",
    "IdempotencyKey",
    "Job",
    "LedgerEntry",
    "Transcript",
]
