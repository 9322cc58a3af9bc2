"""The README's "Run it" block, typed into one interactive terminal as a new user would."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import time
from pathlib import Path

import pytest

from tests.fixtures.server import WHISPERCTL, clean_env, free_port
from tests.wer import wer
from transcription.datadir import DataDirInUse, DataDirLock

ROOT = Path(__file__).parents[2]
SCRIPT = (ROOT / "tests" / "data" / "speech.txt").read_text()
DONE = "run-it-finished-with-"


def run_it_block() -> list[str]:
    block = re.search(r"## Run it\n\n```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None, "README.md has no Run it block"
    return block.group(1).splitlines()


def read_until(fd: int, marker: str, timeout: float) -> str:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0, (
            f"waited for {marker!r}; the terminal shows {seen.decode(errors='replace')}"
        )
        if select.select([fd], [], [], left)[0]:
            seen += os.read(fd, 65536)
    return seen.decode(errors="replace")


def end(shell: int, data_dir: Path, timeout: float = 30.0) -> None:
    """Wait for the shell to exit, else kill it, then the server if it outlived the shell (it
    runs in a process group of its own), known by the data directory lock it still holds."""
    deadline = time.monotonic() + timeout
    while not os.waitpid(shell, os.WNOHANG)[0]:
        if time.monotonic() > deadline:
            os.kill(shell, signal.SIGKILL)
            os.waitpid(shell, 0)
            break
        time.sleep(0.1)
    try:
        DataDirLock(data_dir).acquire().release()
    except DataDirInUse as exc:
        os.kill(int(exc.holder.split()[-1]), signal.SIGKILL)


@pytest.mark.slow
def test_the_run_it_block_works_in_one_terminal(tmp_path: Path) -> None:
    """After the install line (done already), the block runs verbatim in one interactive shell
    (but on a free port, set through the environment): the transcript comes out whole, and the
    backgrounded server's log goes to its data directory, never between its lines."""
    install, *lines = run_it_block()
    assert install.startswith("python3 -m venv .venv")
    port = str(free_port())
    home = tmp_path / "home"
    home.mkdir()
    data_dir = home / ".local" / "share" / "whisperctl"
    url = f"http://127.0.0.1:{port}"
    env = clean_env(
        {"HOME": str(home), "PS1": "$ ", "TERM": "dumb", "WHISPER_PORT": port, "WHISPER_URL": url}
    )
    env.pop("XDG_DATA_HOME", None)
    env["PATH"] = f"{Path(WHISPERCTL).parent}:{env['PATH']}"
    pid, terminal = pty.fork()
    if pid == 0:  # the child: a user's interactive shell, with job control, in the checkout
        os.chdir(ROOT)
        os.execve("/bin/bash", ["bash", "--norc", "--noprofile", "-i"], env)
    try:
        for line in lines:
            os.write(terminal, line.replace("http://127.0.0.1:8000", url).encode() + b"\n")
        os.write(terminal, f"echo {DONE}$?\n".encode())
        shown = read_until(terminal, f"\n{DONE}", timeout=300)
    finally:
        os.write(terminal, b"kill %1; wait; exit\n")
        end(pid, data_dir)
        os.close(terminal)
    assert f"{DONE}0" in shown, shown
    assert (
        f"whisper: data in {data_dir}, API on http://127.0.0.1:{port} (docs at /docs), "
        f"log in {data_dir / 'serve.log'}"
    ) in shown
    assert f"Uvicorn running on http://127.0.0.1:{port}" in (data_dir / "serve.log").read_text()
    for log_line in ("INFO", "Uvicorn", "GET /", "POST /"):
        assert log_line not in shown, shown
    transcript = shown[shown.index("of credit reserved") : shown.rindex(f"echo {DONE}")]
    assert wer(SCRIPT, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", transcript)) <= 0.2, transcript
