"""Options shared by several commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from transcription.settings import CoreSettings

S = TypeVar("S", bound=CoreSettings)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="WHISPER_DATA_DIR",
        help="Where the database, blobs and code secret live [default: ./whisper-data].",
        show_default=False,
    ),
]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


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
