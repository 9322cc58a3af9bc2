"""Settings the user got wrong are named in one line each, never shown as a traceback."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from whisperctl import app


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["serve"], {"WHISPER_RUNNER": "kubernetes"}, "DATABASE_URL, WHISPER_BLOB_URL"),
        (["operator", "--namespace", "whisper"], {}, "WHISPER_CODE_SECRET"),
        (["serve"], {"WHISPER_PORT": "eighty"}, "WHISPER_PORT: Input should be a valid integer"),
    ],
)
def test_a_wrong_setting_is_named_and_nothing_starts(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    named: str,
) -> None:
    for variable in ("DATABASE_URL", "WHISPER_BLOB_URL", "WHISPER_CODE_SECRET"):
        monkeypatch.delenv(variable, raising=False)
    result = CliRunner().invoke(app, args, env={"WHISPER_DATA_DIR": str(tmp_path / "data"), **env})
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "data" / "whisper.db").exists()


def command_paths() -> list[list[str]]:
    """Every command and group of the CLI, as the words that reach it."""
    paths: list[list[str]] = []

    def walk(command: Any, path: list[str]) -> None:
        paths.append(path)
        # Typer carries its own Click, so a group is known by its subcommands, not its class.
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths


@pytest.mark.parametrize("path", command_paths(), ids=lambda path: " ".join(path) or "whisperctl")
def test_help_keeps_its_defaults_and_puts_no_value_after_a_flag(path: list[str]) -> None:
    """Typer reads ``[...]`` in help text as markup and drops it, and Typer 0.29 prints
    ``<bool>`` after every flag: neither may reach a user."""
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.stdout
    assert not re.search(r"\w \.(?!\w)", result.stdout), result.stdout


def test_help_shows_the_defaults_the_settings_apply() -> None:
    shown = " ".join(
        CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).stdout.split()
    )
    assert "Address to listen on. [default: (127.0.0.1)]" in shown
    assert "Port to listen on. [default: (8000)]" in shown
    assert "Transcriptions at once. [default: (automatic)]" in shown
    assert "[default: (~/.local/share/whisperctl)]" in shown


@pytest.mark.parametrize(
    "args",
    [["codes", "list"], ["codes", "create"], ["db", "upgrade"], ["serve"]],
    ids=" ".join,
)
def test_a_data_dir_that_cannot_be_one_is_named_in_one_line(
    tmp_path: Path, args: list[str]
) -> None:
    """A file where the data directory should be: exit 2 naming it, not an OSError's traceback."""
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    result = CliRunner().invoke(app, [*args, "--data-dir", str(in_the_way)])
    assert result.exit_code == 2, result.output
    assert f"whisper: cannot use {in_the_way} as the data directory" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(
    "args",
    [["submit", "tests/data/speech.mp3", "--wait"], ["jobs", "transcript", "tr_1"]],
    ids=lambda args: args[0],
)
def test_an_output_file_in_a_missing_directory_is_refused_before_any_work(
    tmp_path: Path, args: list[str]
) -> None:
    missing = tmp_path / "missing" / "out.txt"
    env = {"WHISPER_CODE": "wt_x", "COLUMNS": "250"}
    result = CliRunner().invoke(app, [*args, "-o", str(missing)], env=env)
    assert result.exit_code == 2, result.output
    assert f"{missing.parent} is not a directory" in " ".join(
        re.sub(r"[│╭╮╰╯─]", " ", result.output).split()
    )
