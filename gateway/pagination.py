"""Keyset pagination, newest first, shared by every list endpoint."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

from transcription.db.models import CreditCode, Job
from transcription.errors import InvalidRequest

Row = TypeVar("Row", Job, CreditCode)


def newest_first(
    session: Session, model: type[Row], stmt: Select[Any], *, after: str | None, limit: int
) -> tuple[list[Row], bool]:
    """One page of ``stmt`` ordered by (created_at, id) descending, and whether more follow."""
    if after is not None:
        cursor = session.get(model, after)
        if cursor is None:
            raise InvalidRequest(f"Unknown cursor {after!r}.", param="after")
        stmt = stmt.where(
            (model.created_at < cursor.created_at)
            | ((model.created_at == cursor.created_at) & (model.id < cursor.id))
        )
    rows = list(
        session.scalars(stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1))
    )
    return rows[:limit], len(rows) > limit
