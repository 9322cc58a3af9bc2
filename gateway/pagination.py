"""Keyset pagination, newest first, shared by every list endpoint."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select, select, true
from sqlalchemy.orm import Session

from transcription.db.models import CreditCode, Job
from transcription.errors import InvalidRequest

Row = TypeVar("Row", Job, CreditCode)


def newest_first(
    session: Session,
    model: type[Row],
    stmt: Select[Any],
    *,
    after: str | None,
    limit: int,
    visible: ColumnElement[bool] = true(),
) -> tuple[list[Row], bool]:
    """One page of ``stmt`` ordered by (created_at, id) descending, and whether more follow;
    the ``after`` cursor must be a row the caller may see (``visible``), else it is unknown."""
    if after is not None:
        # A row the caller may not see answers as one that does not exist, so a cursor never
        # tells whether someone else's ID is real. Status filters do not apply: a job on the
        # previous page may have moved on since.
        cursor = session.scalar(select(model).where(model.id == after, visible))
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
