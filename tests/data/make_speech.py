"""Regenerate speech.mp3 from speech.txt with espeak-ng: `python tests/data/make_speech.py`.

Paragraphs are spoken separately and joined with silence so VAD sees real pauses; the result is
MP3, mono, 16 kHz, 32 kbps to keep the committed fixture small.
"""

from __future__ import annotations

import io
import subprocess
import wave
from pathlib import Path

import av
import numpy as np

HERE = Path(__file__).parent
VOICE, WORDS_PER_MINUTE, PAUSE_SECONDS = "en-us", 160, 1.2


def speak(text: str) -> tuple[np.ndarray, int]:
    """Return espeak-ng's 16-bit mono samples for one paragraph and their sample rate."""
    wav = subprocess.run(
        ["espeak-ng", "-v", VOICE, "-s", str(WORDS_PER_MINUTE), "--stdout", text],
        check=True,
        capture_output=True,
    ).stdout
    with wave.open(io.BytesIO(wav)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16), w.getframerate()


def main() -> None:
    paragraphs = HERE.joinpath("speech.txt").read_text().split("\n\n")
    spoken = [speak(" ".join(p.split())) for p in paragraphs]
    rate = spoken[0][1]
    pause = np.zeros(int(PAUSE_SECONDS * rate), dtype=np.int16)
    samples = np.concatenate([part for audio, _ in spoken for part in (pause, audio)] + [pause])

    with av.open(str(HERE / "speech.mp3"), "w") as out:
        stream = out.add_stream("libmp3lame", rate=16000, layout="mono")
        stream.bit_rate = 32000
        frame = av.AudioFrame.from_ndarray(samples[np.newaxis, :], format="s16", layout="mono")
        frame.sample_rate = rate
        resampler = av.AudioResampler(format="s16p", layout="mono", rate=16000)
        for resampled in [*resampler.resample(frame), *resampler.resample(None)]:
            out.mux(stream.encode(resampled))
        out.mux(stream.encode(None))


if __name__ == "__main__":
    main()
