"""the database enforces the job rules; leases for embedded workers

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Spelled out rather than imported: a migration keeps the rules of the day it was written.
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
CREDIT_STATES = ("held", "settled", "released")
MODES = ("fast", "accurate")
ENGINES = ("local", "openai")
ENTRY_KINDS = ("issue", "top_up", "reserve", "settle", "release")
RESOLVED = "kind IN ('release', 'settle')"


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lease_owner", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(), nullable=True))
        batch.create_check_constraint(op.f("ck_jobs_job_status"), _one_of("status", JOB_STATUSES))
        batch.create_check_constraint(
            op.f("ck_jobs_credit_state"), _one_of("credit_state", CREDIT_STATES)
        )
        batch.create_check_constraint(op.f("ck_jobs_mode"), _one_of("mode", MODES))
        batch.create_check_constraint(op.f("ck_jobs_engine"), _one_of("engine", ENGINES))
        batch.create_check_constraint(
            op.f("ck_jobs_charged_within_reserved"),
            "charged_seconds IS NULL OR (charged_seconds >= 0 "
            "AND charged_seconds <= reserved_seconds)",
        )
        batch.create_check_constraint(op.f("ck_jobs_attempts_nonnegative"), "attempts >= 0")
    with op.batch_alter_table("ledger_entries") as batch:
        batch.create_check_constraint(
            op.f("ck_ledger_entries_entry_kind"), _one_of("kind", ENTRY_KINDS)
        )
    op.create_index(
        "uq_ledger_entries_job_resolution",
        "ledger_entries",
        ["job_id"],
        unique=True,
        sqlite_where=sa.text(RESOLVED),
        postgresql_where=sa.text(RESOLVED),
    )


def downgrade() -> None:
    op.drop_index("uq_ledger_entries_job_resolution", table_name="ledger_entries")
    with op.batch_alter_table("ledger_entries") as batch:
        batch.drop_constraint("ck_ledger_entries_entry_kind", type_="check")
    with op.batch_alter_table("jobs") as batch:
        for name in (
            "attempts_nonnegative",
            "charged_within_reserved",
            "engine",
            "mode",
            "credit_state",
            "job_status",
        ):
            batch.drop_constraint(f"ck_jobs_{name}", type_="check")
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_owner")
