"""Many jobs at once must never make the box slower than one after another.

Eight jobs of two minutes each are submitted to one ``whisperctl serve`` at the same moment, and
then the same eight one after another (each waiting for the one before); both use the server's
automatic concurrency. ``--concurrency 2`` adds a run with that many jobs at once (inference
threads split between them), to show what the automatic choice avoids.

``python -m bench.throughput [--jobs 8 --minutes 2 --concurrency 2 --poll 0.25]``; writes the
"throughput" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import services
from bench.common import cores, load_average, machine, report, table, verdict
from bench.services import Ours, ours
from bench.speech import speech
from transcriber.engines import default_concurrency, default_threads


def one(service: Ours, audio: Path, t0: float) -> float:
    """Submit and wait for one job; its latency from ``t0`` (the batch's start)."""
    with service.client() as client:
        job_id = service.submit(client, audio, "fast")
        service.wait(client, job_id, t0)
    return time.perf_counter() - t0


def serial(service: Ours, audio: Path, jobs: int) -> tuple[float, list[float]]:
    start = time.perf_counter()
    latencies = []
    for _ in range(jobs):
        began = time.perf_counter()
        one(service, audio, began)
        latencies.append(time.perf_counter() - began)
    return time.perf_counter() - start, latencies


def together(service: Ours, audio: Path, jobs: int) -> tuple[float, list[float]]:
    start = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        latencies = list(pool.map(lambda _: one(service, audio, start), range(jobs)))
    return time.perf_counter() - start, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=2)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[2])
    parser.add_argument(
        "--poll", type=float, default=services.POLL_SECONDS, help="Seconds between status polls."
    )
    args = parser.parse_args()
    services.POLL_SECONDS = args.poll
    load_before = load_average()
    audio, _ = speech(args.minutes)
    warmup, _ = speech(0.5)
    rows: list[list[object]] = []

    def row(name: str, total: float, latencies: list[float]) -> None:
        rows.append([name, total, statistics.mean(latencies), max(latencies)])

    auto = default_concurrency()
    with ours() as service:
        service.transcribe(warmup, "fast")
        serial_total, latencies = serial(service, audio, args.jobs)
        row(f"one after another (automatic: {auto} at once)", serial_total, latencies)
        together_total, latencies = together(service, audio, args.jobs)
        row(
            f"all at once (automatic: {auto} at once, {default_threads(auto)} threads each)",
            together_total,
            latencies,
        )
    for concurrency in args.concurrency:
        env = {"WHISPER_CONCURRENCY": str(concurrency)}
        with ours(env) as service:
            service.transcribe(warmup, "fast")
            total, latencies = together(service, audio, args.jobs)
            row(
                f"all at once (WHISPER_CONCURRENCY={concurrency}, {default_threads(concurrency)} threads each)",
                total,
                latencies,
            )
    body = table(["run", "total s", "mean latency s", "max latency s"], rows)
    context = (
        f"Machine: {machine()}; model: bundled tiny.en int8, mode fast; {args.jobs} jobs of "
        f"{args.minutes:g} min of speech; {cores()} cores; each client polls every "
        f"{args.poll:g} s; load average before: {load_before}, "
        f"after: {load_average()}. Latency: from the batch's start (all at once) or the job's "
        "own submission (one after another) to the job reported done."
    )
    verdicts = [verdict("all at once ÷ one after another", together_total / serial_total, 1.05)]
    report("throughput", "Throughput: jobs at once vs one after another", context, body, verdicts)


if __name__ == "__main__":
    main()
