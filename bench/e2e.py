"""End-to-end speed and accuracy: our service over HTTP against faster-whisper on its own and
against faster-whisper-server, on the same speech, side by side in one run.

``python -m bench.e2e --minutes 10 60`` (add ``--repeat 3`` on a busy machine: each system's
fastest run counts). Writes the "e2e" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import openai

from bench.common import cores, load_average, machine, report, table, verdict
from bench.services import JobRun, faster_whisper_server, ours
from bench.speech import speech
from tests.wer import wer

MiB = 1024 * 1024


def raw(audio: Path, mode: str) -> tuple[float, str]:
    """faster-whisper in a separate process, model already loaded when the clock starts."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.raw", str(audio), "--mode", mode],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return float(result["wall"]), str(result["text"])


def peer(client: openai.OpenAI, audio: Path) -> tuple[float, str]:
    """faster-whisper-server through the OpenAI SDK, the way its users call it."""
    started = time.perf_counter()
    with audio.open("rb") as f:
        result = client.audio.transcriptions.create(model="whisper-1", file=f)
    return time.perf_counter() - started, result.text


def best(runs: list[tuple[float, str]]) -> tuple[float, str]:
    return min(runs, key=lambda r: r[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[10, 60])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--upload-only-above",
        type=float,
        default=float("inf"),
        help="Above this many minutes only measure the upload's memory (no transcription).",
    )
    parser.add_argument(
        "--skip-accurate-above",
        type=float,
        default=float("inf"),
        help="Measure accurate mode and the peer server only up to this many minutes.",
    )
    args = parser.parse_args()
    load_before = load_average()
    warmup, _ = speech(0.5)
    rows: list[list[object]] = []
    verdicts: list[str] = []
    with ours() as service, faster_whisper_server() as base_url:
        peer_client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=7200)
        # Both servers load their model and ours learns its decoding speed on a short job, as
        # any server that has been up for a while has.
        for mode in ("fast", "accurate"):
            service.transcribe(warmup, mode)
        peer(peer_client, warmup)
        for minutes in args.minutes:
            audio, script = speech(minutes)
            seconds = minutes * 60
            if minutes > args.upload_only_above:
                growth = service.upload_growth(audio) / MiB
                rows.append(
                    [f"{minutes:g} min", "ours, upload only", "", "", "", f"{growth:.1f}", ""]
                )
                verdicts.append(verdict(f"{minutes:g} min: upload RSS growth, MiB", growth, 30))
                continue
            full = minutes <= args.skip_accurate_above
            measured: dict[str, tuple[float, str]] = {}
            job_runs: dict[str, JobRun] = {}
            raw_runs: list[tuple[float, str]] = []
            ours_runs: dict[str, list[JobRun]] = {"fast": [], "accurate": []}
            peer_runs: list[tuple[float, str]] = []
            for _ in range(args.repeat):
                raw_runs.append(raw(audio, "fast"))
                ours_runs["fast"].append(service.transcribe(audio, "fast"))
                if full:
                    peer_runs.append(peer(peer_client, audio))
                    ours_runs["accurate"].append(service.transcribe(audio, "accurate"))
            measured["raw"] = best(raw_runs)
            for mode, runs in ours_runs.items():
                if runs:
                    job_runs[mode] = min(runs, key=lambda r: r.wall)
                    measured[mode] = (job_runs[mode].wall, job_runs[mode].text)
            if peer_runs:
                measured["peer"] = best(peer_runs)
            labels = {
                "raw": "faster-whisper BatchedInferencePipeline, own process",
                "fast": "ours over HTTP, mode=fast",
                "peer": "faster-whisper-server defaults, openai SDK",
                "accurate": "ours over HTTP, mode=accurate",
            }
            for key, (wall, text) in measured.items():
                run = job_runs.get(key)
                rows.append(
                    [
                        f"{minutes:g} min",
                        labels[key],
                        wall,
                        wall / seconds,
                        wer(script, text),
                        f"{run.upload_growth / MiB:.1f}" if run else "",
                        f"{len(run.progress)} / {run.longest_stall():.0%}" if run else "",
                    ]
                )
            wall_of = {k: v[0] for k, v in measured.items()}
            wer_of = {k: wer(script, v[1]) for k, v in measured.items()}
            tag = f"{minutes:g} min"
            if minutes == 10 or len(args.minutes) == 1:
                verdicts.append(
                    verdict(f"{tag}: fast ÷ raw batched", wall_of["fast"] / wall_of["raw"], 1.10)
                )
                if "peer" in wall_of:
                    verdicts.append(
                        verdict(
                            f"{tag}: fast ÷ faster-whisper-server",
                            wall_of["fast"] / wall_of["peer"],
                            0.45,
                        )
                    )
            if minutes == 60:
                verdicts.append(
                    verdict(f"{tag}: fast wall ÷ audio duration", wall_of["fast"] / seconds, 0.03)
                )
                verdicts.append(
                    verdict(
                        f"{tag}: upload RSS growth, MiB", job_runs["fast"].upload_growth / MiB, 30
                    )
                )
            if "accurate" in wall_of and "peer" in wall_of:
                verdicts.append(
                    verdict(
                        f"{tag}: accurate WER minus faster-whisper-server WER",
                        wer_of["accurate"] - wer_of["peer"],
                        0.0,
                    )
                )
                verdicts.append(
                    verdict(
                        f"{tag}: accurate ÷ faster-whisper-server",
                        wall_of["accurate"] / wall_of["peer"],
                        1.05,
                    )
                )
    body = table(
        [
            "audio",
            "system",
            "wall s",
            "wall per audio s",
            "WER",
            "upload MiB",
            "progress steps / longest stall",
        ],
        rows,
    )
    context = (
        f"Machine: {machine()}; model: bundled tiny.en, int8; inference threads: {cores()}; "
        f"best of {args.repeat}; load average before: {load_before}, after: {load_average()}. "
        "Speech from `bench.speech` (espeak-ng, seven voices, pauses between paragraphs); "
        "WER against its script. Walls: ours from the first byte uploaded to the transcript "
        "downloaded (polling every 0.25 s); raw from audio decode to last segment with the model "
        "loaded; the peer server from request to response. `upload MiB`: how much the server's "
        "RSS grew while receiving and probing the upload. `longest stall`: the longest time the "
        "job's progress did not move, as a share of its wall time."
    )
    report(
        "e2e",
        "End to end: ours vs faster-whisper vs faster-whisper-server, "
        + ", ".join(f"{m:g}" for m in args.minutes)
        + " min",
        context,
        body,
        verdicts,
        # One section per set of lengths, so a short run does not erase a long one.
        section_name="e2e-" + "-".join(f"{m:g}" for m in args.minutes),
    )


if __name__ == "__main__":
    main()
