"""A gateway under abuse: 200 clients for a minute against ``whisperctl serve``, with the limits at
their defaults and then with them off, to show what they buy.

The mix, all at once: slow clients (half-sent headers, uploads that stall after a few bytes),
oversized JSON bodies to the admin API without a token, wrong codes, uploads from a drained code,
and 4 honest clients uploading real speech one after another. Attackers and honest clients come
from different addresses through ``X-Forwarded-For``, as behind the GKE load balancer (the
server trusts 127.0.0.1 as its proxy). ``python -m bench.abuse [--seconds 60]`` writes the
"abuse" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import load_average, machine, report, table, verdict
from bench.services import Ours, ours
from tests.fixtures.audio import make_mp3
from tests.speech import SCRIPT, SPEECH
from tests.wer import wer

MiB = 1024 * 1024
ADMIN_TOKEN = secrets.token_urlsafe(16)
#: Every limit of issue 13 switched off (or beyond reach) for the comparison run.
LIMITS_OFF = {
    "WHISPER_MAX_BODY_BYTES": str(1 << 40),
    "WHISPER_HEADER_TIMEOUT": "100000",
    "WHISPER_BODY_TIMEOUT": "100000",
    "WHISPER_MAX_UPLOADS": "100000",
    "WHISPER_MAX_UPLOADS_PER_CODE": "100000",
    "WHISPER_MAX_CONNECTIONS": "100000",
    "WHISPER_AUTH_FAILURE_LIMIT": "0",
    "WHISPER_AUTH_FAILURE_DELAY": "0",
}
SLOW_HEADERS, SLOW_UPLOADS, BIG_JSON, WRONG_CODES, DRAINED, HONEST = 30, 30, 40, 50, 46, 4


@dataclass
class Tally:
    """What one run saw."""

    statuses: Counter[str] = field(default_factory=Counter)
    healthz_ms: list[float] = field(default_factory=list)
    peak_rss: int = 0
    honest_jobs: int = 0
    honest_wrong: list[str] = field(default_factory=list)
    honest_wer: list[float] = field(default_factory=list)
    slow_held_s: list[float] = field(default_factory=list)

    def saw(self, kind: str, status: int | str) -> None:
        self.statuses[f"{kind} {status}"] += 1

    @property
    def server_errors(self) -> int:
        return sum(n for key, n in self.statuses.items() if key.split()[-1].startswith("5"))


def forwarded(kind: str, index: int) -> dict[str, str]:
    """The client address the load balancer would put in front of the request."""
    group = {"honest": 1, "slow": 66, "json": 67, "guess": 68, "drained": 69}[kind]
    return {"X-Forwarded-For": f"10.{group}.{index // 250}.{index % 250 + 1}"}


async def mint(client: httpx.AsyncClient, seconds: int, uses: int = 1000) -> str:
    response = await client.post(
        "/v1/admin/codes",
        json={"seconds": seconds, "max_uses": uses},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    response.raise_for_status()
    code: str = response.json()["code"]
    return code


async def finished(
    client: httpx.AsyncClient, job_id: str, headers: dict[str, str]
) -> dict[str, Any]:
    while True:
        job = (await client.get(f"/v1/transcriptions/{job_id}", headers=headers)).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            found: dict[str, Any] = job
            return found
        await asyncio.sleep(0.5)


async def drain(client: httpx.AsyncClient, tone: bytes) -> str:
    """A code with nothing left: worth 5 s, spent on a 4.5 s upload (charged whole seconds)."""
    code = await mint(client, 5)
    headers = {"Authorization": f"Bearer {code}", **forwarded("drained", 0)}
    created = await client.post(
        "/v1/transcriptions", headers=headers, files={"file": ("t.mp3", tone)}
    )
    created.raise_for_status()
    job = await finished(client, created.json()["id"], headers)
    assert job["status"] == "succeeded", job
    return code


def probe(url: str, seconds: float) -> None:
    """Time ``GET /healthz`` every 100 ms from a process of its own, so the attackers' event
    loop never delays the measurement; prints one JSON list of (status, milliseconds)."""
    samples: list[tuple[int | str, float]] = []
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=30) as client:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            status: int | str
            try:
                status = client.get("/healthz").status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            samples.append((status, (time.perf_counter() - started) * 1000))
            time.sleep(0.1)
    print(json.dumps(samples))


async def healthz(url: str, seconds: float, tally: Tally) -> None:
    prober = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.abuse", "--probe", url, "--seconds", str(seconds),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await prober.communicate()
    for status, ms in json.loads(out):
        tally.saw("healthz", status)
        tally.healthz_ms.append(ms)


def reset_peak(pid: int) -> None:
    """Reset the kernel's peak RSS, which (unlike sampling) misses no spike."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


async def slow_headers(host: str, port: int, index: int, stop: asyncio.Event, tally: Tally) -> None:
    """Slowloris: open a connection and send a header line every few seconds, never finishing."""
    while not stop.is_set():
        started = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /v1/credits HTTP/1.1\r\nHost: x\r\n")
            while not stop.is_set() and not reader.at_eof():
                writer.write(f"X-Pad-{secrets.token_hex(2)}: {'a' * 20}\r\n".encode())
                await writer.drain()
                try:
                    line = await asyncio.wait_for(reader.readline(), 3)
                except TimeoutError:
                    continue
                if line:
                    tally.saw("slow-headers", line.split()[1].decode())
                break
            writer.close()
        except (ConnectionError, OSError):
            tally.saw("slow-headers", "closed")
        tally.slow_held_s.append(time.perf_counter() - started)


async def slow_upload(
    host: str, port: int, code: str, index: int, stop: asyncio.Event, tally: Tally
) -> None:
    """An upload that announces 50 MB, sends a few KB, then stalls."""
    boundary = "abuse" + secrets.token_hex(4)
    preamble = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.mp3"\r\n'
        "Content-Type: audio/mpeg\r\n\r\n"
    ).encode() + b"\xff\xfb\x90\x00" * 1024
    xff = forwarded("slow", index)["X-Forwarded-For"]
    while not stop.is_set():
        started = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                (
                    "POST /v1/transcriptions HTTP/1.1\r\nHost: x\r\n"
                    f"Authorization: Bearer {code}\r\nX-Forwarded-For: {xff}\r\n"
                    f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                    f"Content-Length: {50 * MiB}\r\n\r\n"
                ).encode()
                + preamble
            )
            await writer.drain()
            while not stop.is_set():
                try:
                    line = await asyncio.wait_for(reader.readline(), 1)
                except TimeoutError:
                    continue
                tally.saw("slow-upload", line.split()[1].decode() if line else "closed")
                break
            writer.close()
        except (ConnectionError, OSError):
            tally.saw("slow-upload", "closed")
        tally.slow_held_s.append(time.perf_counter() - started)


async def endless(size: int) -> AsyncIterator[bytes]:
    chunk = b"[" + b"0," * (MiB // 2 - 1) + b"0"
    sent = 0
    while sent < size:
        yield chunk
        sent += len(chunk)


async def big_json(url: str, index: int, stop: asyncio.Event, tally: Tally) -> None:
    """96 MiB of JSON to the admin API with no token, streamed without a Content-Length."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while not stop.is_set():
            try:
                response = await client.post(
                    "/v1/admin/codes",
                    content=endless(96 * MiB),
                    headers={"Content-Type": "application/json", **forwarded("json", index)},
                )
                tally.saw("big-json", response.status_code)
            except httpx.HTTPError as exc:
                tally.saw("big-json", type(exc).__name__)


async def wrong_codes(url: str, index: int, stop: asyncio.Event, tally: Tally) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while not stop.is_set():
            code = "wt_" + secrets.token_urlsafe(24)
            try:
                response = await client.get(
                    "/v1/credits",
                    headers={"Authorization": f"Bearer {code}", **forwarded("guess", index)},
                )
                tally.saw("wrong-code", response.status_code)
            except httpx.HTTPError as exc:
                tally.saw("wrong-code", type(exc).__name__)


async def drained_uploads(
    url: str, code: str, index: int, stop: asyncio.Event, tally: Tally
) -> None:
    """256 MiB uploads from a code with nothing left."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while not stop.is_set():
            try:
                response = await client.post(
                    "/v1/transcriptions",
                    content=endless(256 * MiB),
                    headers={
                        "Authorization": f"Bearer {code}",
                        "Content-Type": "multipart/form-data; boundary=x",
                        **forwarded("drained", index),
                    },
                )
                tally.saw("drained", response.status_code)
            except httpx.HTTPError as exc:
                tally.saw("drained", type(exc).__name__)


async def honest(
    url: str, code: str, speech: bytes, index: int, stop: asyncio.Event | None, tally: Tally
) -> None:
    """Real speech, one upload after another until ``stop`` (just one without it), each waited
    for and checked."""
    headers = {"Authorization": f"Bearer {code}", **forwarded("honest", index)}
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60, read=600)) as client:
        while stop is None or not stop.is_set():
            response = await client.post(
                "/v1/transcriptions",
                headers=headers,
                files={"file": ("speech.mp3", speech, "audio/mpeg")},
            )
            tally.saw("honest", response.status_code)
            if response.status_code == 429:
                await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
                continue
            if response.status_code != 202:
                tally.honest_wrong.append(f"upload {response.status_code}: {response.text[:200]}")
                continue
            job = await finished(client, response.json()["id"], headers)
            tally.honest_jobs += 1
            expected = math.ceil(job["audio_seconds"] - 1e-6)
            if job["status"] != "succeeded" or job["charged_seconds"] != expected:
                tally.honest_wrong.append(
                    f"{job['id']}: {job['status']}, charged {job['charged_seconds']} of {expected}"
                )
            else:
                tally.honest_wer.append(wer(SCRIPT, job["text"]))
            if stop is None:
                return


async def attack(server: Ours, seconds: float, tone: bytes, attackers: bool) -> Tally:
    tally = Tally()
    host, port = "127.0.0.1", int(server.url.rsplit(":", 1)[1])
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as admin:
        drained = await drain(admin, tone)
        attacker = await mint(admin, 3600 * 1000)
        honest_codes = [await mint(admin, 3600 * 1000) for _ in range(HONEST)]
    speech = SPEECH.read_bytes()
    # The baseline is the peak of honest work alone (one job per honest client, at once): what
    # the peak gains beyond it is what the attack costs.
    reset_peak(server.pid)
    await asyncio.gather(
        *(honest(server.url, c, speech, i, None, Tally()) for i, c in enumerate(honest_codes))
    )
    baseline = status_kib(server.pid, "VmHWM") * 1024
    stop = asyncio.Event()
    prober = asyncio.create_task(healthz(server.url, seconds, tally))
    tasks = (
        []
        if not attackers
        else [
            *(
                asyncio.create_task(slow_headers(host, port, i, stop, tally))
                for i in range(SLOW_HEADERS)
            ),
            *(
                asyncio.create_task(slow_upload(host, port, attacker, i, stop, tally))
                for i in range(SLOW_UPLOADS)
            ),
            *(asyncio.create_task(big_json(server.url, i, stop, tally)) for i in range(BIG_JSON)),
            *(
                asyncio.create_task(wrong_codes(server.url, i, stop, tally))
                for i in range(WRONG_CODES)
            ),
            *(
                asyncio.create_task(drained_uploads(server.url, drained, i, stop, tally))
                for i in range(DRAINED)
            ),
        ]
    )
    honest_tasks = [
        asyncio.create_task(honest(server.url, code, speech, i, stop, tally))
        for i, code in enumerate(honest_codes)
    ]
    await asyncio.sleep(seconds)
    stop.set()
    # Attackers are cut off where they stand; honest clients finish the job they have in flight.
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.wait_for(asyncio.gather(*honest_tasks), 600)
    await prober
    tally.peak_rss = status_kib(server.pid, "VmHWM") * 1024 - baseline
    return tally


def leftovers(data_dir: Path) -> int:
    uploads = data_dir / "uploads"
    return sum(1 for _ in uploads.iterdir()) if uploads.exists() else 0


def p99(values: list[float]) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[98]
        if len(values) >= 2
        else float("nan")
    )


#: The runs compared: (name, limits at their defaults, attackers present).
RUNS = (("no attack", True, False), ("attack, limits on", True, True),
        ("attack, limits off", False, True))  # fmt: skip


def run(limits: bool, attackers: bool, seconds: float, tone: Path) -> tuple[Tally, int]:
    env = {"WHISPER_ADMIN_TOKEN": ADMIN_TOKEN, "WHISPER_TRUSTED_PROXIES": "127.0.0.1"}
    if not limits:
        env.update(LIMITS_OFF)
    with ours(env) as server:
        tally = asyncio.run(attack(server, seconds, tone.read_bytes(), attackers))
        # Whatever a cut-off client left must be gone once the server has noticed.
        time.sleep(2)
        left = leftovers(server.data_dir)
    return tally, left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--probe", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args.probe, args.seconds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tone = Path(tmp) / "tone.mp3"
        make_mp3(tone, 4.5)
        results = {name: run(limits, attackers, args.seconds, tone)
                   for name, limits, attackers in RUNS}  # fmt: skip

    rows = [
        [
            name,
            p99(tally.healthz_ms),
            max(tally.healthz_ms, default=float("nan")),
            tally.peak_rss / MiB,
            tally.server_errors,
            f"{tally.honest_jobs - len(tally.honest_wrong)}/{tally.honest_jobs}",
            max(tally.honest_wer, default=float("nan")),
            left,
            max(tally.slow_held_s, default=float("nan")),
        ]
        for name, (tally, left) in results.items()
    ]
    body = table(
        ["run", "/healthz p99 ms", "max ms", "peak RSS growth MiB", "5xx", "honest ok",
         "honest max WER", "temp files left", "longest slow hold s"],
        rows,
    )  # fmt: skip
    for name, (tally, _) in results.items():
        answers = ", ".join(f"{k}: {n}" for k, n in sorted(tally.statuses.items()))
        body += f"\n\nAnswers ({name}): {answers}."
        if tally.honest_wrong:
            body += f"\n\nHonest jobs that went wrong ({name}): {'; '.join(tally.honest_wrong)}."
    tally, left = results["attack, limits on"]
    report(
        "abuse",
        "Abuse: 200 clients for a minute, limits at their defaults vs off",
        f"{machine()}; load average {load_average()}; {SLOW_HEADERS} slow-header, "
        f"{SLOW_UPLOADS} stalled-upload, {BIG_JSON} oversized-JSON, {WRONG_CODES} wrong-code, "
        f"{DRAINED} drained-code and {HONEST} honest clients for {args.seconds:.0f} s. Peak RSS "
        "growth is beyond the peak of the honest clients' first jobs, run at once before the "
        "attack.",
        body,
        [
            verdict("/healthz p99 ms (limits on)", p99(tally.healthz_ms), 100),
            verdict("peak RSS growth MiB (limits on)", tally.peak_rss / MiB, 100),
            verdict("5xx (limits on)", tally.server_errors, 0),
            verdict("honest jobs wrong (limits on)", len(tally.honest_wrong), 0),
            verdict("honest jobs done (limits on)", tally.honest_jobs, 1, at_least=True),
            verdict("temp files left (limits on)", left, 0),
        ],
    )


if __name__ == "__main__":
    main()
