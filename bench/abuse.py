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
import math
import secrets
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import load_average, machine, report, rss_bytes, table, verdict
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
    """A code with nothing left: worth 5 s, spent on a 5 s upload."""
    code = await mint(client, 5)
    headers = {"Authorization": f"Bearer {code}", **forwarded("drained", 0)}
    created = await client.post(
        "/v1/transcriptions", headers=headers, files={"file": ("t.mp3", tone)}
    )
    created.raise_for_status()
    job = await finished(client, created.json()["id"], headers)
    assert job["status"] == "succeeded", job
    return code


async def healthz(url: str, stop: asyncio.Event, tally: Tally) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                response = await client.get("/healthz")
                tally.saw("healthz", response.status_code)
            except httpx.HTTPError as exc:
                tally.saw("healthz", type(exc).__name__)
            tally.healthz_ms.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.1)


async def memory(pid: int, stop: asyncio.Event, tally: Tally) -> None:
    while not stop.is_set():
        tally.peak_rss = max(tally.peak_rss, rss_bytes(pid))
        await asyncio.sleep(0.2)


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
    url: str, code: str, speech: bytes, index: int, stop: asyncio.Event, tally: Tally
) -> None:
    """Real speech, one upload after another, each waited for and checked."""
    headers = {"Authorization": f"Bearer {code}", **forwarded("honest", index)}
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60, read=600)) as client:
        while not stop.is_set():
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


async def attack(server: Ours, seconds: float, tone: bytes) -> Tally:
    tally = Tally()
    host, port = "127.0.0.1", int(server.url.rsplit(":", 1)[1])
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as admin:
        drained = await drain(admin, tone)
        attacker = await mint(admin, 3600 * 1000)
        honest_codes = [await mint(admin, 3600 * 1000) for _ in range(HONEST)]
    speech = SPEECH.read_bytes()
    baseline = rss_bytes(server.pid)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(healthz(server.url, stop, tally)),
        asyncio.create_task(memory(server.pid, stop, tally)),
        *(
            asyncio.create_task(slow_headers(host, port, i, stop, tally))
            for i in range(SLOW_HEADERS)
        ),
        *(
            asyncio.create_task(slow_upload(host, port, attacker, i, stop, tally))
            for i in range(SLOW_UPLOADS)
        ),
        *(asyncio.create_task(big_json(server.url, i, stop, tally)) for i in range(BIG_JSON)),
        *(asyncio.create_task(wrong_codes(server.url, i, stop, tally)) for i in range(WRONG_CODES)),
        *(
            asyncio.create_task(drained_uploads(server.url, drained, i, stop, tally))
            for i in range(DRAINED)
        ),
    ]
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
    tally.peak_rss -= baseline
    return tally


def leftovers(data_dir: Path) -> int:
    uploads = data_dir / "uploads"
    return sum(1 for _ in uploads.iterdir()) if uploads.exists() else 0


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else float("nan")


def run(limits: bool, seconds: float, tone: Path) -> tuple[Tally, int]:
    env = {"WHISPER_ADMIN_TOKEN": ADMIN_TOKEN, "WHISPER_TRUSTED_PROXIES": "127.0.0.1"}
    if not limits:
        env.update(LIMITS_OFF)
    with ours(env) as server:
        tally = asyncio.run(attack(server, seconds, tone.read_bytes()))
        # Whatever a cut-off client left must be gone once the server has noticed.
        time.sleep(2)
        left = leftovers(server.data_dir)
    return tally, left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tone = Path(tmp) / "tone.mp3"
        make_mp3(tone, 5)
        results = {limits: run(limits, args.seconds, tone) for limits in (True, False)}

    rows = []
    for limits, (tally, left) in results.items():
        rows.append(
            [
                "defaults" if limits else "off",
                p99(tally.healthz_ms),
                max(tally.healthz_ms, default=float("nan")),
                tally.peak_rss / MiB,
                tally.server_errors,
                f"{tally.honest_jobs - len(tally.honest_wrong)}/{tally.honest_jobs}",
                max(tally.honest_wer, default=float("nan")),
                left,
                max(tally.slow_held_s, default=float("nan")),
            ]
        )
    body = table(
        ["limits", "/healthz p99 ms", "max ms", "RSS growth MiB", "5xx", "honest ok",
         "honest max WER", "temp files left", "longest slow hold s"],
        rows,
    )  # fmt: skip
    for limits, (tally, _) in results.items():
        name = "defaults" if limits else "off"
        answers = ", ".join(f"{k}: {n}" for k, n in sorted(tally.statuses.items()))
        body += f"\n\nAnswers with limits {name}: {answers}."
        if tally.honest_wrong:
            body += f"\n\nHonest jobs that went wrong ({name}): {'; '.join(tally.honest_wrong)}."
    tally, left = results[True]
    report(
        "abuse",
        "Abuse: 200 clients for a minute, limits at their defaults vs off",
        f"{machine()}; load average {load_average()}; {SLOW_HEADERS} slow-header, "
        f"{SLOW_UPLOADS} stalled-upload, {BIG_JSON} oversized-JSON, {WRONG_CODES} wrong-code, "
        f"{DRAINED} drained-code and {HONEST} honest clients for {args.seconds:.0f} s.",
        body,
        [
            verdict("/healthz p99 ms (defaults)", p99(tally.healthz_ms), 100),
            verdict("RSS growth MiB (defaults)", tally.peak_rss / MiB, 100),
            verdict("5xx (defaults)", tally.server_errors, 0),
            verdict("honest jobs wrong (defaults)", len(tally.honest_wrong), 0),
            verdict("honest jobs done (defaults)", tally.honest_jobs, 1, at_least=True),
            verdict("temp files left (defaults)", left, 0),
        ],
    )


if __name__ == "__main__":
    main()
