"""The database enforces the job rules itself, and migration 0002 upgrades a database that
already holds data, on SQLite and on PostgreSQL."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from tests.transcription.test_ledger import KEY, counters, issue, submit_job
from tests.transcription.test_lifecycle import run_result
from transcription import ledger
from transcription.blobstore import LocalBlobStore
from transcription.db.migrate import current_revision, upgrade
from transcription.db.models import Base, Job, LedgerEntry, Transcript, utcnow
from transcription.db.session import Database
from transcription.lifecycle import Lifecycle
from transcription.states import CreditState, JobStatus


@pytest.fixture
def bare_db(db_url: str) -> Iterator[Database]:
    """A database with no schema yet: each test migrates it as far as it needs."""
    database = Database(db_url)
    yield database
    database.dispose()


def insert(db: Database, table: str, **row: Any) -> None:
    names = ", ".join(row)
    values = ", ".join(f":{name}" for name in row)
    with db.transaction() as session:
        session.execute(text(f"INSERT INTO {table} ({names}) VALUES ({values})"), row)


def execute(db: Database, sql: str, **params: Any) -> None:
    with db.transaction() as session:
        session.execute(text(sql), params)


def refused(db: Database, sql: str, **params: Any) -> bool:
    """Whether the database refuses the statement with an integrity error."""
    try:
        execute(db, sql, **params)
    except IntegrityError:
        return True
    return False


# --- the schema --------------------------------------------------------------------------------


def test_the_migrated_schema_matches_the_models(db: Database) -> None:
    """Autogenerate finds nothing to do: the migrations build exactly what the models declare."""
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    assert current_revision(db.engine) == "0003"


@pytest.mark.parametrize(
    "assignment",
    [
        "status = 'paused'",
        "status = 'QUEUED'",
        "credit_state = 'lost'",
        "mode = 'turbo'",
        "engine = 'azure'",
        "charged_seconds = reserved_seconds + 1",
        "charged_seconds = -1",
        "attempts = -1",
        "progress = 1.5",
    ],
)
def test_the_database_refuses_a_job_that_breaks_the_rules(db: Database, assignment: str) -> None:
    """Even an UPDATE that bypasses the domain cannot store an unknown state or overcharge."""
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 30)
    assert refused(db, f"UPDATE jobs SET {assignment} WHERE id = :id", id=job.id)
    with db.read() as session:
        stored = session.get(Job, job.id)
    assert stored is not None
    assert (stored.status, stored.credit_state, stored.charged_seconds) == (
        JobStatus.QUEUED,
        CreditState.HELD,
        None,
    )


def test_the_database_accepts_every_known_value(db: Database) -> None:
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 30)
    for assignment in (
        *(f"status = '{status.value}'" for status in JobStatus),
        *(f"credit_state = '{state.value}'" for state in CreditState),
        "mode = 'accurate'",
        "engine = 'openai'",
        "charged_seconds = reserved_seconds",
        "charged_seconds = NULL",
    ):
        execute(db, f"UPDATE jobs SET {assignment} WHERE id = :id", id=job.id)


def test_the_database_refuses_an_unknown_ledger_entry_kind(db: Database) -> None:
    code_id = issue(db, 100).record.id
    assert refused(
        db,
        "INSERT INTO ledger_entries (code_id, kind, budget_delta, reserved_delta, spent_delta, "
        "uses_delta, created_at) VALUES (:code_id, 'gift', 100, 0, 0, 0, :now)",
        code_id=code_id,
        now=utcnow().replace(tzinfo=None),
    )
    counters(db, code_id)


def resolution(job: Job, kind: str) -> LedgerEntry:
    return LedgerEntry(
        code_id=job.code_id,
        job_id=job.id,
        kind=kind,
        reserved_delta=-job.reserved_seconds,
        uses_delta=-1 if kind == "release" else 0,
    )


@pytest.mark.parametrize("first, second", [("settle", "release"), ("release", "settle")])
def test_a_reservation_resolves_at_most_once(db: Database, first: str, second: str) -> None:
    """The partial unique index: a settle and a release can never both exist for one job,
    whatever writes them; other jobs and other kinds are not affected."""
    code_id = issue(db, 100, max_uses=2).record.id
    job, other = submit_job(db, code_id, 30), submit_job(db, code_id, 30)
    with db.transaction() as session:
        session.add(resolution(job, first))
    with pytest.raises(IntegrityError), db.transaction() as session:
        session.add(resolution(job, second))
    with db.transaction() as session:
        session.add(resolution(other, second))
        for _ in range(2):  # entries with no job are not resolutions
            session.add(LedgerEntry(code_id=code_id, kind="top_up", budget_delta=10))
    with db.read() as session:
        kinds = session.scalars(
            select(LedgerEntry.kind).where(LedgerEntry.job_id == job.id).order_by(LedgerEntry.id)
        ).all()
    assert kinds == ["reserve", first]


# --- upgrading a database that holds data ------------------------------------------------------


def naive(moment: datetime) -> datetime:
    """How the 0001 schema stores a time: naive UTC."""
    return moment.astimezone(UTC).replace(tzinfo=None)


def seed_0001(db: Database) -> dict[str, str]:
    """A code with four jobs as version 0001 left them: queued, running at 40 %, succeeded (with
    its transcript) and failed, with their ledger rows; returns the jobs' IDs by status."""
    now = naive(utcnow()) - timedelta(minutes=10)
    code = {
        "id": "cc_old",
        "code_hash": ledger.hash_code("wt_" + "o" * 32, KEY),
        "hint": "oooo",
        "label": "before 0002",
        "budget_seconds": 1000,
        "reserved_seconds": 0,
        "spent_seconds": 0,
        "max_uses": 10,
        "uses": 0,
        "created_at": now,
    }
    entry = {"budget_delta": 0, "reserved_delta": 0, "spent_delta": 0, "uses_delta": 0}
    rows: list[tuple[str, dict[str, Any]]] = [
        ("ledger_entries", {**entry, "code_id": "cc_old", "kind": "issue", "budget_delta": 1000})
    ]
    jobs: dict[str, str] = {}
    for index, (status, credit, charged, progress) in enumerate(
        [
            ("queued", "held", None, 0.0),
            ("running", "held", None, 0.4),
            ("succeeded", "settled", 100, 1.0),
            ("failed", "released", 0, 0.0),
        ]
    ):
        job_id = f"tr_old{index}"
        jobs[status] = job_id
        rows.append(
            (
                "jobs",
                {
                    "id": job_id,
                    "code_id": "cc_old",
                    "status": status,
                    "credit_state": credit,
                    "progress": progress,
                    "filename": "talk.mp3",
                    "audio_key": f"jobs/{job_id}/audio.mp3",
                    "audio_bytes": 4096,
                    "audio_seconds": 99.5,
                    "reserved_seconds": 100,
                    "charged_seconds": charged,
                    "mode": "fast",
                    "engine": "local",
                    "attempts": 0 if status == "queued" else 1,
                    "created_at": now + timedelta(seconds=index),
                    "updated_at": now + timedelta(seconds=index),
                },
            )
        )
        rows.append(
            (
                "ledger_entries",
                {
                    **entry,
                    "code_id": "cc_old",
                    "job_id": job_id,
                    "kind": "reserve",
                    "reserved_delta": 100,
                    "uses_delta": 1,
                },
            )
        )
        if credit == "settled":
            rows.append(
                (
                    "ledger_entries",
                    {
                        **entry,
                        "code_id": "cc_old",
                        "job_id": job_id,
                        "kind": "settle",
                        "reserved_delta": -100,
                        "spent_delta": charged,
                    },
                )
            )
            rows.append(
                (
                    "transcripts",
                    {
                        "id": "ts_old",
                        "job_id": job_id,
                        "language": "en",
                        "duration_seconds": 99.5,
                        "text": "Words from before the upgrade.",
                        "segment_count": 4,
                        "uris": '{"txt": "file:///old/transcript.txt"}',
                        "model": "tiny.en",
                        "created_at": now,
                    },
                )
            )
        elif credit == "released":
            rows.append(
                (
                    "ledger_entries",
                    {
                        **entry,
                        "code_id": "cc_old",
                        "job_id": job_id,
                        "kind": "release",
                        "reserved_delta": -100,
                        "uses_delta": -1,
                    },
                )
            )
    insert(db, "credit_codes", **code)
    for table, row in rows:
        insert(db, table, **{"created_at": now, **row})
    # The counters as the old version kept them: two jobs held, one charged 100 s.
    execute(
        db,
        "UPDATE credit_codes SET reserved_seconds = 200, spent_seconds = 100, uses = 3 "
        "WHERE id = 'cc_old'",
    )
    insert(
        db,
        "idempotency_keys",
        code_id="cc_old",
        key="retry-1",
        request_hash="0" * 64,
        job_id=jobs["queued"],
        created_at=now,
        expires_at=now + timedelta(days=1),
    )
    return jobs


def test_migration_0002_upgrades_a_database_holding_data(bare_db: Database, tmp_path: Any) -> None:
    db = bare_db
    upgrade(db.engine, "0001")
    assert current_revision(db.engine) == "0001"
    jobs = seed_0001(db)
    upgrade(db.engine)
    assert current_revision(db.engine) == "0003"

    # Everything is still there, read through the new typed models.
    expected = {"budget": 1000, "reserved": 200, "spent": 100, "uses": 3}
    assert counters(db, "cc_old") == expected
    blobs = LocalBlobStore(tmp_path / "blobs")
    lifecycle = Lifecycle(db, blobs)
    for status, job_id in jobs.items():
        job = lifecycle.get(job_id)
        assert job.status == JobStatus(status)
        assert (job.lease_owner, job.lease_expires_at) == (None, None)
        assert job.created_at.tzinfo is UTC
    transcript = lifecycle.transcript(jobs["succeeded"])
    assert transcript is not None and transcript.text == "Words from before the upgrade."
    assert transcript.uris == {"txt": "file:///old/transcript.txt"}
    with db.read() as session:
        assert session.scalar(select(Transcript.job_id)) == jobs["succeeded"]

    # The rules of 0001 survived the table rebuild; those of 0002 hold for the old rows.
    for assignment in ("progress = 2", "status = 'paused'", "charged_seconds = 101"):
        assert refused(db, f"UPDATE jobs SET {assignment} WHERE id = :id", id=jobs["queued"])
    with pytest.raises(IntegrityError), db.transaction() as session:
        session.add(resolution(lifecycle.get(jobs["succeeded"]), "release"))
    # SQLite rebuilt the tables with foreign keys off; they are enforced again afterwards.
    assert refused(db, "UPDATE transcripts SET job_id = 'tr_nowhere'")

    # The old jobs go on under the new rules.
    assert lifecycle.queued_ids() == [jobs["queued"]]
    old_audio = f"jobs/{jobs['queued']}/audio.mp3"
    blobs.put_bytes(old_audio, b"ID3 audio")
    done = lifecycle.finish(jobs["queued"], run_result(jobs["queued"], 99.5))
    assert done is not None and done.charged_seconds == 100
    assert not blobs.exists(old_audio)
    cancelled = lifecycle.cancel(jobs["running"])
    assert cancelled is not None
    assert cancelled.charged_seconds == math.ceil(0.4 * 99.5)
    assert lifecycle.cancel(jobs["succeeded"]) is None
    assert lifecycle.cancel(jobs["failed"]) is None
    assert counters(db, "cc_old") == {
        "budget": 1000,
        "reserved": 0,
        "spent": 100 + 100 + 40,
        "uses": 3,
    }
    issue(db, 10)  # the new code path writes beside the old rows


def test_a_job_left_running_before_the_upgrade_runs_again(bare_db: Database, tmp_path: Any) -> None:
    """0001 had no leases: a job it left running is taken back by the process that owns the
    database (the embedded runner at start, ``unleased``), and by nothing else (in the cluster
    the operator runs leaseless jobs)."""
    db = bare_db
    upgrade(db.engine, "0001")
    jobs = seed_0001(db)
    upgrade(db.engine)
    lifecycle = Lifecycle(db, LocalBlobStore(tmp_path / "blobs"))
    later = utcnow() + timedelta(days=1)
    assert lifecycle.expire_leases(3, now=later) == []
    assert lifecycle.get(jobs["running"]).status == JobStatus.RUNNING
    assert lifecycle.expire_leases(3, now=later, unleased=True) == [jobs["running"]]
    requeued = lifecycle.get(jobs["running"])
    assert (requeued.status, requeued.progress, requeued.credit_state) == (
        JobStatus.QUEUED,
        0.0,
        CreditState.HELD,
    )
    assert lifecycle.queued_ids() == [jobs["queued"], jobs["running"]]
    assert counters(db, "cc_old") == {"budget": 1000, "reserved": 200, "spent": 100, "uses": 3}
