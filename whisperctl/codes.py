"""``whisperctl codes``: issue and manage credit codes directly in the service's database."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer

from whisperctl.options import DataDir, JsonOutput, build_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from transcription.db.models import CreditCode

app = typer.Typer(help="Issue and manage credit codes.", no_args_is_help=True)

DURATION = re.compile(r"^(\d+)([smhdw])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
MAX_LABEL_CHARS = 200  # the credit_codes.label column, and the admin API's limit


def parse_expiry(value: str | None) -> datetime | None:
    """``30d``/``12h``-style durations from now, or an ISO 8601 date/time (UTC if no zone)."""
    if value is None:
        return None
    now = datetime.now(UTC)
    match = DURATION.match(value.strip())
    if match:
        parsed = now + timedelta(**{UNITS[match.group(2)]: int(match.group(1))})
    else:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError as exc:
            raise typer.BadParameter(
                "use a duration like 30d or 12h, or an ISO date like 2027-01-31T00:00:00Z",
                param_hint="--expires",
            ) from exc
        parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    if parsed <= now:
        raise typer.BadParameter(
            f"{value} is not in the future: a code must expire after it is created",
            param_hint="--expires",
        )
    return parsed


@contextmanager
def _session(data_dir: Any) -> Iterator[tuple[Session, bytes]]:
    from transcription.db.migrate import upgrade
    from transcription.db.session import Database
    from transcription.settings import CoreSettings

    settings = build_settings(CoreSettings, data_dir)
    settings.ensure_data_dir()
    database = Database(settings.resolved_database_url())
    upgrade(database.engine)
    try:
        with database.transaction() as session:
            yield session, settings.code_key()
    finally:
        database.dispose()


def _describe(record: CreditCode) -> dict[str, Any]:
    return {
        "id": record.id,
        "label": record.label,
        "hint": "…" + record.hint,
        "state": record.state(),
        "budget_seconds": record.budget_seconds,
        "reserved_seconds": record.reserved_seconds,
        "spent_seconds": record.spent_seconds,
        "remaining_seconds": record.remaining_seconds,
        "uses": record.uses,
        "max_uses": record.max_uses,
        "expires_at": record.expires_at.isoformat() if record.expires_at else None,
        "revoked_at": record.revoked_at.isoformat() if record.revoked_at else None,
        "created_at": record.created_at.isoformat(),
    }


def _find(session: Session, key: bytes, ref: str) -> CreditCode:
    from transcription import ledger
    from transcription.errors import DomainError

    try:
        if ref.startswith(ledger.CODE_PREFIX):
            return ledger.authenticate(session, key, ref)
        return ledger.get_code(session, ref)
    except DomainError as exc:
        raise typer.BadParameter(exc.message, param_hint="CODE") from exc


def _print(record: CreditCode, as_json: bool) -> None:
    info = _describe(record)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    for name, value in info.items():
        typer.echo(f"{name:>18}: {value if value is not None else '-'}")


@app.command()
def create(
    seconds: Annotated[int, typer.Option(min=1, help="Seconds of audio the code pays for.")] = 3600,
    max_uses: Annotated[int, typer.Option(min=1, help="Jobs the code can pay for.")] = 1,
    expires: Annotated[
        str | None, typer.Option(help="Expiry: a duration (30d, 12h) or an ISO date/time.")
    ] = None,
    label: Annotated[str | None, typer.Option(help="A note for admins, e.g. a customer.")] = None,
    count: Annotated[int, typer.Option(min=1, max=10000, help="How many codes to mint.")] = 1,
    data_dir: DataDir = None,
    as_json: JsonOutput = False,
) -> None:
    """Mint codes and print each secret once (only a keyed hash is stored)."""
    from transcription import ledger

    expires_at = parse_expiry(expires)
    if label is not None and len(label) > MAX_LABEL_CHARS:
        raise typer.BadParameter(f"at most {MAX_LABEL_CHARS} characters", param_hint="--label")
    with _session(data_dir) as (session, key):
        issued = [
            ledger.issue_code(
                session, key, seconds=seconds, max_uses=max_uses, expires_at=expires_at, label=label
            )
            for _ in range(count)
        ]
        session.flush()
        rows = [{"code": i.code, **_describe(i.record)} for i in issued]
    if as_json:
        typer.echo(json.dumps(rows[0] if count == 1 else rows, indent=2))
        return
    for row in rows:
        typer.echo(row["code"])
    typer.echo(
        f"{count} code(s) of {seconds} s, {max_uses} use(s), expires "
        f"{expires_at.isoformat() if expires_at else 'never'}. Store them now: "
        "they cannot be shown again.",
        err=True,
    )


@app.command("list")
def list_codes(
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many, newest first.")] = 50,
    data_dir: DataDir = None,
    as_json: JsonOutput = False,
) -> None:
    """List codes (never their secrets)."""
    from sqlalchemy import select

    from transcription.db.models import CreditCode

    with _session(data_dir) as (session, _key):
        rows = [
            _describe(r)
            for r in session.scalars(
                select(CreditCode).order_by(CreditCode.created_at.desc()).limit(limit)
            )
        ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Column, Table

    from transcription import ledger

    # IDs are what show/revoke/top-up take, so a narrow terminal must not cut them short.
    id_column = Column("ID", no_wrap=True, min_width=len(ledger.new_id(ledger.CODE_ID_PREFIX)))
    table = Table(id_column, "Label", "State", "Remaining s", "Spent s", "Uses", "Expires")
    for r in rows:
        table.add_row(
            r["id"],
            r["label"] or "",
            r["state"],
            str(r["remaining_seconds"]),
            str(r["spent_seconds"]),
            f"{r['uses']}/{r['max_uses']}",
            r["expires_at"] or "never",
        )
    Console(file=sys.stdout).print(table)


@app.command()
def show(
    code: Annotated[str, typer.Argument(help="The code's ID (cc_…) or the code itself (wt_…).")],
    data_dir: DataDir = None,
    as_json: JsonOutput = False,
) -> None:
    """Show a code's balance, uses and state."""
    with _session(data_dir) as (session, key):
        record = _find(session, key, code)
    _print(record, as_json)


@app.command()
def revoke(
    code: Annotated[str, typer.Argument(help="The code's ID (cc_…) or the code itself (wt_…).")],
    data_dir: DataDir = None,
    as_json: JsonOutput = False,
) -> None:
    """Revoke a code: it can start no new job; jobs it already paid for finish."""
    from transcription import ledger

    with _session(data_dir) as (session, key):
        record = ledger.revoke(session, _find(session, key, code).id)
    _print(record, as_json)


@app.command("top-up")
def top_up(
    code: Annotated[str, typer.Argument(help="The code's ID (cc_…) or the code itself (wt_…).")],
    seconds: Annotated[int, typer.Option(min=1, help="Seconds to add to the budget.")],
    data_dir: DataDir = None,
    as_json: JsonOutput = False,
) -> None:
    """Add seconds to a code's budget."""
    from transcription import ledger

    with _session(data_dir) as (session, key):
        record = ledger.top_up(session, _find(session, key, code).id, seconds)
    _print(record, as_json)
