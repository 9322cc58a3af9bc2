"""Options shared by several commands."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from transcription.settings import CoreSettings, default_data_dir

S = TypeVar("S", bound=CoreSettings)


def _home_relative(path: Path) -> str:
    """``path`` with the home directory as ``~``, short enough for a help column (run at import,
    so it must not fail where no home directory can be found, as ``Path.home()`` does)."""
    home = Path(os.path.expanduser("~"))
    return f"~/{path.relative_to(home)}" if path.is_relative_to(home) else str(path)


DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="WHISPER_DATA_DIR",
        help="Where the database, blobs and code secret live, wherever the command runs from.",
        show_default=_home_relative(default_data_dir()),
    ),
]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
Verbose = Annotated[
    bool, typer.Option("--verbose", "-v", help="Say which data directory and database are used.")
]


def build_settings(cls: type[S], data_dir: Path | None, **overrides: Any) -> S:
    """Settings from the environment, overridden by the options the user actually gave."""
    values: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    if data_dir is not None:
        values["data_dir"] = data_dir
    try:
        return cls(**values)
    except ValidationError as exc:
        # One line per problem, named as the user sets it, instead of pydantic's traceback.
        for error in exc.errors():
            name = "_".join(str(part) for part in error["loc"]).upper()
            message = str(error["msg"]).removeprefix("Value error, ")
            typer.echo(f"whisper: {f'WHISPER_{name}: ' if name else ''}{message}", err=True)
        raise typer.Exit(2) from None


def describe_storage(settings: CoreSettings) -> str:
    """Where a command's state lives, as ``--verbose`` and ``serve`` say it."""
    from sqlalchemy.engine import make_url

    where = f"data in {settings.data_dir.absolute()}"
    if settings.database_url:
        where += f", database {make_url(settings.database_url).render_as_string()}"
    return where


def open_data_dir(settings: CoreSettings, *, verbose: bool = False) -> None:
    """Create the data directory, saying which it is when asked; one line, not a traceback,
    when it cannot be (a file in the way, no permission)."""
    if verbose:
        typer.echo(f"whisper: {describe_storage(settings)}", err=True)
    try:
        settings.ensure_data_dir()
    except OSError as exc:
        typer.echo(
            f"whisper: cannot use {settings.data_dir.absolute()} as the data directory "
            f"(--data-dir or WHISPER_DATA_DIR): {exc.strerror}",
            err=True,
        )
        raise typer.Exit(2) from None


def in_a_directory(path: Path | None) -> Path | None:
    """An output file's check before any work is done: its directory must exist."""
    if path is not None and not path.parent.is_dir():
        raise typer.BadParameter(f"{path.parent} is not a directory")
    return path


def exact(value: str, what: str) -> str:
    """``value`` as given, refused when empty or padded with spaces: such a value can only be
    a slip of the shell or of a copy and paste, never an ID or a code."""
    if not value:
        raise typer.BadParameter("is empty", param_hint=what)
    if value != value.strip():
        raise typer.BadParameter(
            f"{value!r} has spaces or line breaks around it; give it without them",
            param_hint=what,
        )
    return value


def print_record(info: dict[str, Any], as_json: bool) -> None:
    """One object as JSON, or one ``name: value`` line per field for people."""
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    for name, value in info.items():
        typer.echo(f"{name:>18}: {value if value is not None else '-'}")
