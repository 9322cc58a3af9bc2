"""The data directory does not depend on where a command runs: one per-user default, named on
request, and named again when a local server does not know a code."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.server import WHISPERCTL, Server, clean_env, running_server
from transcription.settings import CoreSettings


def whisperctl(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [WHISPERCTL, *args],
        cwd=cwd,
        env=clean_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


def directories(root: Path, *names: str) -> list[Path]:
    made = [root / name for name in names]
    for path in made:
        path.mkdir(parents=True)
    return made


def test_the_default_is_the_users_data_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under HOME (or XDG_DATA_HOME when set), whatever the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.delenv("WHISPER_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert CoreSettings().data_dir == tmp_path / "home" / ".local" / "share" / "whisperctl"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert CoreSettings().data_dir == tmp_path / "xdg" / "whisperctl"
    monkeypatch.setenv("WHISPER_DATA_DIR", str(tmp_path / "chosen"))
    assert CoreSettings().data_dir == tmp_path / "chosen"


def test_a_code_minted_anywhere_pays_on_the_server_started_elsewhere(
    tmp_path: Path, mp3_5s: Path
) -> None:
    """``codes create`` in one directory, ``serve`` in another, ``submit`` in a third: all find
    the same per-user data directory, say which with ``--verbose`` (and ``serve`` at start),
    and none leaves a data directory where it ran."""
    minting, serving, submitting = directories(tmp_path, "minting", "serving", "submitting")
    env = {"HOME": str(tmp_path / "home"), "XDG_DATA_HOME": str(tmp_path / "xdg")}
    expected = tmp_path / "xdg" / "whisperctl"
    minted = whisperctl("codes", "create", "--verbose", cwd=minting, env=env)
    assert minted.returncode == 0, minted.stderr
    assert f"whisper: data in {expected}\n" in minted.stderr
    with running_server(expected, env=env, cwd=serving, default_data_dir=True) as server:
        assert f"whisper: data in {expected}, API on {server.base_url}" in server.log()
        submitted = whisperctl(
            "submit", str(mp3_5s), "--url", server.base_url, "--wait", "--quiet",
            cwd=submitting, env={**env, "WHISPER_CODE": minted.stdout.strip()},
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr + server.log()[-3000:]
    listed = whisperctl("codes", "list", "--json", "-v", cwd=submitting, env=env)
    assert f"whisper: data in {expected}\n" in listed.stderr
    assert '"uses": 1' in listed.stdout
    for place in (minting, serving, submitting):
        assert list(place.iterdir()) == [], place


def test_an_unknown_code_on_a_local_server_names_the_data_directory(
    start_server: Callable[..., Server], tmp_path: Path, mp3_5s: Path
) -> None:
    """A code minted in another data directory gets the server's 401 and a hint naming the
    directory this command would mint in: exit 1, no traceback."""
    server = start_server()
    elsewhere = tmp_path / "elsewhere"
    env = {"WHISPER_DATA_DIR": str(elsewhere)}
    minted = whisperctl("codes", "create", cwd=tmp_path, env=env)
    assert minted.returncode == 0, minted.stderr
    result = whisperctl(
        "submit", str(mp3_5s), "--url", server.base_url, "--code", minted.stdout.strip(),
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "error: HTTP 401: The credit code is not valid. (invalid_code)" in result.stderr
    assert (
        f"hint: this code is not known to the server at {server.base_url}; codes minted with "
        f"`whisperctl codes create` live in the data directory {elsewhere}"
    ) in result.stderr
    assert "make sure the server and the command use the same one" in result.stderr
    assert "Traceback" not in result.stderr
