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

from whisperctl.options import (
    DataDir,
    JsonOutput,
    Verbose,
    build_settings,
    exact,
    open_data_dir,
    print_record,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from transcription.db.models import CreditCode
    from transcription.errors import DomainError

app = typer.Typer(help="Issue and manage credit codes.", no_args_is_help=True)

DURATION = re.compile(r"^(\d+)([smhdw])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
MAX_LABEL_CHARS = 200  # the credit_codes.label column, and the admin API's limit
#: The ledger's names for what it refuses, as this command line spells them.
OPTION_OF = {"seconds": "--seconds", "add_seconds": "--seconds", "max_uses": "--max-uses"}
CODE_ARGUMENT = Annotated[
    str, typer.Argument(help="The code's ID (cc_…) or the code itself (wt_…).", show_default=False)
]


def parse_expiry(value: str | None) -> datetime | None:
    """``30d``/``12h``-style durations from now, or an ISO 8601 date/time (UTC if no zone)."""
    if value is None:
        return None
    now = datetime.now(UTC)
    match = DURATION.match(value.strip())
    if match:
        try:
            parsed = now + timedelta(**{UNITS[match.group(2)]: int(match.group(1))})
        except OverflowError:
            raise typer.BadParameter(
                f"{value} is too far in the future: give a date before the year 10000",
                param_hint="--expires",
            ) from None
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
def _refusals() -> Iterator[None]:
    """The ledger's refusals as the command line reports them: a wrong value or an unknown
    code is a usage error (exit 2), anything else (a revoked code) a refusal (exit 1)."""
    from transcription.errors import DomainError, InvalidRequest, NotFound, Unauthenticated

    try:
        yield
    except (InvalidRequest, NotFound, Unauthenticated) as exc:
        hint = OPTION_OF.get(exc.param or "", "CODE")
        raise typer.BadParameter(exc.message, param_hint=hint) from None
    except DomainError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None


@contextmanager
def _session(data_dir: Any, verbose: bool) -> Iterator[tuple[Session, bytes]]:
    from transcription.db.migrate import upgrade
    from transcription.db.session import Database
    from transcription.settings import CoreSettings

    settings = build_settings(CoreSettings, data_dir)
    open_data_dir(settings, verbose=verbose)
    database = Database(settings.resolved_database_url())
    upgrade(database.engine)
    try:
        with _refusals(), database.transaction() as session:
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

    ref = exact(ref, "CODE")
    if ref.startswith(ledger.CODE_PREFIX):
        return ledger.authenticate(session, key, ref)
    return ledger.get_code(session, ref)


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
    verbose: Verbose = False,
) -> None:
    """Mint codes and print each secret once (only a keyed hash is stored)."""
    from transcription import ledger

    expires_at = parse_expiry(expires)
    if label is not None and len(label) > MAX_LABEL_CHARS:
        raise typer.BadParameter(f"at most {MAX_LABEL_CHARS} characters", param_hint="--label")
    # Checked before the data directory is opened, so a wrong value leaves nothing behind.
    with _refusals():
        ledger.check_budget(seconds)
        ledger.check_max_uses(max_uses)
    with _session(data_dir, verbose) as (session, key):
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
    verbose: Verbose = False,
) -> None:
    """List codes (never their secrets)."""
    from sqlalchemy import select

    from transcription.db.models import CreditCode

    with _session(data_dir, verbose) as (session, _key):
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
    code: CODE_ARGUMENT,
    data_dir: DataDir = None,
    as_json: JsonOutput = False,
    verbose: Verbose = False,
) -> None:
    """Show a code's balance, uses and state."""
    with _session(data_dir, verbose) as (session, key):
        record = _find(session, key, code)
    print_record(_describe(record), as_json)


@app.command()
def revoke(
    code: CODE_ARGUMENT,
    data_dir: DataDir = None,
    as_json: JsonOutput = False,
    verbose: Verbose = False,
) -> None:
    """Revoke a code: it can start no new job; jobs it already paid for finish."""
    from transcription import ledger

    with _session(data_dir, verbose) as (session, key):
        record = ledger.revoke(session, _find(session, key, code).id)
    print_record(_describe(record), as_json)


@app.command("top-up")
def top_up(
    code: CODE_ARGUMENT,
    seconds: Annotated[
        int | None, typer.Option(min=1, help="Seconds to add to the budget.", show_default=False)
    ] = None,
    max_uses: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="The jobs the code can pay for in all, used ones included.",
            show_default=False,
        ),
    ] = None,
    expires: Annotated[
        str | None,
        typer.Option(
            help="New expiry: a duration from now (30d, 12h), an ISO date/time, or never.",
            show_default=False,
        ),
    ] = None,
    data_dir: DataDir = None,
    as_json: JsonOutput = False,
    verbose: Verbose = False,
) -> None:
    """Add seconds, allow more jobs or move the expiry of a code that is not revoked.

    The command line's PATCH /v1/admin/codes/{id}; a revoked code is refused."""
    from transcription import ledger
    from transcription.errors import CreditError

    if seconds is None and max_uses is None and expires is None:
        raise typer.BadParameter("give --seconds, --max-uses or --expires (or several)")
    expires_at = None if expires is None or expires.strip() == "never" else parse_expiry(expires)
    with _session(data_dir, verbose) as (session, key):
        record = _find(session, key, code)
        ledger.ensure_changeable(record)
        if seconds is not None:
            record = ledger.top_up(session, record.id, seconds)
        if max_uses is not None:
            record = ledger.set_max_uses(session, record.id, max_uses)
        if expires is not None:
            record = ledger.set_expiry(session, record.id, expires_at)
        session.flush()
        session.refresh(record)
    print_record(_describe(record), as_json)
    try:
        ledger.ensure_usable(record)
    except CreditError as exc:
        # The change went through but did not make the code usable: say what still stops it.
        typer.echo(f"note: {exc.message} It still cannot start a job: {_remedy(exc)}", err=True)


def _remedy(exc: DomainError) -> str:
    from transcription.errors import CodeExpired, UsesExhausted

    if isinstance(exc, UsesExhausted):
        return "seconds do not help; allow more jobs with --max-uses."
    if isinstance(exc, CodeExpired):
        return "move the expiry with --expires (e.g. 30d, or never)."
    return "add seconds with --seconds."
