"""``whisperctl submit`` against a real server: transcripts, formats, job IDs and failures."""

from __future__ import annotations

import math
import os
import pty
import re
import select
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.fixtures.server import WHISPERCTL, Server, clean_env, free_port, running_server
from tests.wer import wer

DATA = Path(__file__).parents[1] / "data"
SPEECH = DATA / "speech.mp3"
SCRIPT = (DATA / "speech.txt").read_text()
SRT_BLOCK = re.compile(
    r"(\d+)\n(\d\d):(\d\d):(\d\d),(\d{3}) --> (\d\d):(\d\d):(\d\d),(\d{3})\n(.+)", re.DOTALL
)


def submit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``whisperctl submit ARGS`` as a user would, in a clean environment."""
    return subprocess.run(
        [WHISPERCTL, "submit", *args],
        env=clean_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("submit") / "data") as server:
        yield server


@dataclass(frozen=True)
class SpeechRun:
    """The speech fixture submitted once with ``--wait -o``, under an idempotency key."""

    result: subprocess.CompletedProcess[str]
    code: str
    key: str
    output: Path


@pytest.fixture(scope="module")
def speech_run(server: Server, tmp_path_factory: pytest.TempPathFactory) -> SpeechRun:
    code = server.create_code(seconds=60)
    output = tmp_path_factory.mktemp("speech") / "speech.txt"
    key = "speech-run-1"
    result = submit(
        str(SPEECH), "--code", code, "--url", server.base_url, "--wait", "-o", str(output),
        "--idempotency-key", key,
    )  # fmt: skip
    return SpeechRun(result=result, code=code, key=key, output=output)


def credits(server: Server, code: str) -> dict[str, int]:
    response = httpx.get(
        server.base_url + "/v1/credits", headers={"Authorization": f"Bearer {code}"}, timeout=30
    )
    assert response.status_code == 200, response.text
    body: dict[str, int] = response.json()
    return body


@pytest.mark.slow
def test_wait_writes_an_accurate_transcript(speech_run: SpeechRun, server: Server) -> None:
    """``--wait -o`` exits 0 and leaves a transcript within WER 0.15 of the script."""
    assert speech_run.result.returncode == 0, speech_run.result.stderr + server.log()[-3000:]
    assert speech_run.result.stdout == ""
    assert f"transcript saved to {speech_run.output}" in speech_run.result.stderr
    assert wer(SCRIPT, speech_run.output.read_text()) <= 0.15


@pytest.mark.slow
def test_same_idempotency_key_fetches_srt_without_a_second_charge(
    speech_run: SpeechRun, server: Server, tmp_path: Path
) -> None:
    """Resubmitting with the key returns the same job, now as well-formed SRT, charged once."""
    assert speech_run.result.returncode == 0, speech_run.result.stderr
    srt = tmp_path / "speech.srt"
    again = submit(
        str(SPEECH), "--code", speech_run.code, "--url", server.base_url, "--format", "srt",
        "-o", str(srt), "--idempotency-key", speech_run.key,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    first_job = re.search(r"job (tr_\w+)", speech_run.result.stderr)
    assert first_job is not None
    assert f"job {first_job.group(1)}:" in again.stderr
    job = httpx.get(
        f"{server.base_url}/v1/transcriptions/{first_job.group(1)}",
        headers={"Authorization": f"Bearer {speech_run.code}"},
        timeout=30,
    ).json()
    blocks = [SRT_BLOCK.fullmatch(b) for b in srt.read_text().strip().split("\n\n")]
    assert blocks, srt.read_text()
    assert all(blocks), srt.read_text()
    previous_end = 0.0
    for number, match in enumerate(blocks, start=1):
        assert match is not None
        h1, m1, s1, ms1, h2, m2, s2, ms2 = (int(g) for g in match.groups()[1:9])
        start = h1 * 3600 + m1 * 60 + s1 + ms1 / 1000
        end = h2 * 3600 + m2 * 60 + s2 + ms2 / 1000
        assert int(match.group(1)) == number
        assert previous_end <= start < end <= job["audio_seconds"]
        previous_end = end
    cue_text = " ".join(m.group(10) for m in blocks if m is not None)
    assert wer(SCRIPT, cue_text) <= 0.15
    balance = credits(server, speech_run.code)
    assert (balance["uses"], balance["reserved_seconds"]) == (1, 0)
    assert balance["spent_seconds"] == job["charged_seconds"] == math.ceil(job["audio_seconds"])


def test_without_wait_prints_just_the_job_id(server: Server, mp3_5s: Path) -> None:
    """Without ``--wait`` stdout is the job ID alone, so scripts can capture it."""
    code = server.create_code()
    result = submit(str(mp3_5s), "--code", code, "--url", server.base_url)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"tr_[0-9a-f]+\n", result.stdout), result.stdout
    job = httpx.get(
        f"{server.base_url}/v1/transcriptions/{result.stdout.strip()}",
        headers={"Authorization": f"Bearer {code}"},
        timeout=30,
    )
    assert job.status_code == 200, job.text
    assert job.json()["filename"] == mp3_5s.name


def test_code_and_url_come_from_the_environment(server: Server, mp3_5s: Path) -> None:
    """WHISPER_CODE and WHISPER_URL stand in for ``--code`` and ``--url``."""
    code = server.create_code()
    result = submit(str(mp3_5s), env={"WHISPER_CODE": code, "WHISPER_URL": server.base_url})
    assert result.returncode == 0, result.stderr
    assert credits(server, code)["uses"] == 1


def test_used_code_exits_1_with_the_api_message(server: Server, mp3_5s: Path) -> None:
    """A single-use code that already paid fails with status 1 (a refusal, not a usage error)
    and the server's reason."""
    code = server.create_code()
    assert submit(str(mp3_5s), "--code", code, "--url", server.base_url).returncode == 0
    result = submit(str(mp3_5s), "--code", code, "--url", server.base_url)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "HTTP 402: This credit code has been used 1 of 1 times. (code_used)" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_server_exits_2_with_a_clear_message(mp3_5s: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = submit(str(mp3_5s), "--code", "wt_" + "x" * 32, "--url", url)
    assert result.returncode == 2
    assert f"error: cannot reach {url}" in result.stderr
    assert "Traceback" not in result.stderr


def test_without_a_code_a_script_fails_at_once_and_says_how_to_give_one(mp3_5s: Path) -> None:
    """No --code, no WHISPER_CODE and no terminal to ask at: exit 2 at once, not a hang."""
    result = submit(str(mp3_5s), "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "error: no credit code: set WHISPER_CODE (or pass --code)" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_code_flag_warns_that_it_shows_in_ps() -> None:
    result = subprocess.run(
        [WHISPERCTL, "submit", "--help"],
        env=clean_env({"COLUMNS": "200"}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    help_text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.stdout).split())
    assert "shows in `ps` and shell history" in help_text
    assert "prefer WHISPER_CODE" in help_text


def test_at_a_terminal_the_code_is_asked_for_without_echo(server: Server, mp3_5s: Path) -> None:
    """Run at a terminal with neither --code nor WHISPER_CODE, submit asks for the code, the
    typed code is not echoed, and the upload goes through with it."""
    code = server.create_code()
    pid, terminal = pty.fork()
    if pid == 0:  # the child: whisperctl with the pseudo-terminal as its controlling terminal
        os.execve(
            WHISPERCTL,
            [WHISPERCTL, "submit", str(mp3_5s), "--url", server.base_url, "--quiet"],
            clean_env(),
        )
    # The prompt's last character is written by getpass once echo is off: typing earlier
    # would be echoed, then flushed.
    seen = read_until(terminal, b"Credit code: ")
    os.write(terminal, code.encode() + b"\n")
    seen += read_until(terminal, None)
    _, status = os.waitpid(pid, 0)
    os.close(terminal)
    shown = seen.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, shown
    assert code not in shown
    assert re.search(r"^tr_[0-9a-f]+\r?$", shown, re.MULTILINE), shown
    assert credits(server, code)["uses"] == 1


def read_until(fd: int, marker: bytes | None, timeout: float = 60.0) -> bytes:
    """What the terminal shows until ``marker`` (or until the program ends, for None)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while marker is None or marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"waited for {marker!r}; the terminal shows {seen!r}"
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the program ended and closed the terminal
            chunk = b""
        if not chunk:
            assert marker is None, f"the program ended before {marker!r}: {seen!r}"
            return seen
        seen += chunk
    return seen
