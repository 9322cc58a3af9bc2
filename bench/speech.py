"""Make N minutes of English speech and its reference script, for measuring speed and WER.

The script is built from sentence templates with a seeded random generator, so every length is
held-out text the model never saw; espeak-ng speaks each paragraph with one of several voices
and speeds, with pauses between paragraphs so voice activity detection sees real silence.
``python -m bench.speech --minutes 10`` writes ``bench/.cache/speech-10m-s1.mp3`` and ``.txt``.
"""

from __future__ import annotations

import argparse
import io
import random
import subprocess
import wave
from pathlib import Path

import av
import numpy as np

from bench.common import CACHE

RATE = 16_000
BITRATE = 64_000  # a typical spoken-word podcast rate: one hour is about 29 MB
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb-scotland", "en-us+m4", "en-029", "en-gb-x-rp")
SPEEDS = (150, 160, 170)
PAUSES = (0.7, 1.0, 1.5)

NAMES = ("Anna", "Peter", "Maria", "David", "Laura", "Thomas", "Helen", "Martin", "Sarah", "James")
PEOPLE = (
    "the teacher",
    "the farmer",
    "my neighbour",
    "the doctor",
    "our guide",
    "the driver",
    "a young student",
    "the old captain",
    "the baker",
    "a tired traveller",
)
PLACES = (
    "the market",
    "the harbour",
    "the library",
    "the mountain village",
    "the train station",
    "the small garden",
    "the river bank",
    "the city museum",
    "the school",
    "the bridge",
)
THINGS = (
    "a heavy suitcase",
    "a basket of apples",
    "an old map",
    "a letter from home",
    "a loaf of bread",
    "a box of tools",
    "a warm blanket",
    "a bunch of flowers",
    "a broken clock",
    "a new bicycle",
)
TIMES = (
    "early in the morning",
    "after lunch",
    "late in the evening",
    "on Sunday",
    "before the storm",
    "during the winter",
    "at the end of the summer",
    "every Friday",
)
FEELINGS = ("happy", "worried", "surprised", "calm", "curious", "proud", "careful", "patient")
TEMPLATES = (
    "{name} walked to {place} {time} and came back with {thing}.",
    "{time_cap}, {person} found {thing} near {place}.",
    "Everyone at {place} was {feeling} when {name} arrived with {thing}.",
    "{person_cap} asked {name} to carry {thing} to {place}.",
    "{name} said that the weather at {place} would change {time}.",
    "Nobody expected {person} to be so {feeling} about {thing}.",
    "{time_cap}, the road to {place} was quiet and the air was cold.",
    "{name} and {person} talked for an hour about {thing} and the way home.",
    "When the bell rang at {place}, {person} was still looking for {thing}.",
    "It is easy to forget {thing} when you leave {place} in a hurry.",
    "{person_cap} remembered that {name} had left {thing} at {place}.",
    "The children at {place} were {feeling} because {name} had promised them {thing}.",
)


def sentence(rng: random.Random) -> str:
    words = {
        "name": rng.choice(NAMES),
        "person": rng.choice(PEOPLE),
        "place": rng.choice(PLACES),
        "thing": rng.choice(THINGS),
        "time": rng.choice(TIMES),
        "feeling": rng.choice(FEELINGS),
    }
    words["person_cap"] = words["person"][0].upper() + words["person"][1:]
    words["time_cap"] = words["time"][0].upper() + words["time"][1:]
    return rng.choice(TEMPLATES).format(**words)


def speak(text: str, voice: str, speed: int) -> np.ndarray:
    """espeak-ng's 16-bit mono samples for ``text``, resampled to 16 kHz."""
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
        check=True,
        capture_output=True,
    ).stdout
    with wave.open(io.BytesIO(wav)) as w:
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
        rate = w.getframerate()
    if rate == RATE:
        return samples
    positions = np.arange(0, len(samples), rate / RATE)
    return np.interp(positions, np.arange(len(samples)), samples).astype(np.int16)


def make(minutes: float, seed: int, mp3: Path) -> str:
    """Write at most ``minutes`` of speech to ``mp3``; return the reference script."""
    rng = random.Random(seed)
    target = int(minutes * 60 * RATE)
    pieces: list[np.ndarray] = []
    paragraphs: list[str] = []
    length = 0
    while True:
        paragraph = " ".join(sentence(rng) for _ in range(rng.randint(2, 5)))
        audio = speak(paragraph, rng.choice(VOICES), rng.choice(SPEEDS))
        pause = np.zeros(int(rng.choice(PAUSES) * RATE), dtype=np.int16)
        # Never longer than asked: an hour must stay within the service's one-hour limit.
        if pieces and length + len(audio) + len(pause) > target:
            break
        pieces += [audio, pause]
        paragraphs.append(paragraph)
        length += len(audio) + len(pause)
    samples = np.concatenate(pieces)
    with av.open(str(mp3), "w") as out:
        stream = out.add_stream("libmp3lame", rate=RATE, layout="mono")
        stream.bit_rate = BITRATE
        step = RATE * 60
        for start in range(0, len(samples), step):
            frame = av.AudioFrame.from_ndarray(
                samples[np.newaxis, start : start + step], format="s16", layout="mono"
            )
            frame.sample_rate = RATE
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return "\n\n".join(paragraphs) + "\n"


def speech(minutes: float, seed: int = 1) -> tuple[Path, str]:
    """The cached speech file of ``minutes`` and its reference text, made on first use."""
    CACHE.mkdir(parents=True, exist_ok=True)
    stem = f"speech-{minutes:g}m-s{seed}"
    mp3, txt = CACHE / f"{stem}.mp3", CACHE / f"{stem}.txt"
    if not (mp3.exists() and txt.exists()):
        partial = CACHE / f"{stem}.part.mp3"
        txt.write_text(make(minutes, seed, partial))
        partial.replace(mp3)
    return mp3, txt.read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    mp3, script = speech(args.minutes, args.seed)
    print(f"{mp3} ({mp3.stat().st_size / 1e6:.1f} MB), {len(script.split())} words")


if __name__ == "__main__":
    main()
