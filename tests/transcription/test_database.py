"""Read-only transactions: status reads must not queue behind, or block, the writers."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from transcription import ledger
from transcription.db.models import CreditCode
from transcription.db.session import Database

KEY = b"test-code-key-0123456789abcdef"


def test_reads_go_ahead_while_a_writer_holds_its_transaction(db: Database) -> None:
    """A poll reading a code while a long write transaction is open answers at once, with the
    last committed state."""
    with db.transaction() as session:
        code_id = ledger.issue_code(session, KEY, seconds=60).record.id
    writing, release = threading.Event(), threading.Event()

    def writer() -> None:
        with db.transaction() as session:
            ledger.top_up(session, code_id, 60)
            writing.set()
            release.wait(10)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert writing.wait(10)
        started = time.monotonic()
        with db.read() as session:
            record = session.get(CreditCode, code_id)
            assert record is not None and record.budget_seconds == 60
        assert time.monotonic() - started < 1.0
    finally:
        release.set()
        thread.join()
    with db.read() as session:
        assert session.scalar(select(func.sum(CreditCode.budget_seconds))) == 120


def test_a_read_transaction_refuses_writes_on_postgresql(pg_db: Database) -> None:
    with pytest.raises(DBAPIError, match="read-only transaction"), pg_db.read() as session:
        ledger.issue_code(session, KEY, seconds=60)
