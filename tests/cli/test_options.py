"""Settings the user got wrong are named in one line each, never shown as a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
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
