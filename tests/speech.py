"""Long speech for tests, made from the committed espeak-ng fixture and its script.

The fixture is decoded and re-encoded once at the wanted bitrate; longer files repeat those
frames. LAME starts every encoding with an empty bit reservoir, so each repetition decodes
cleanly after the one before, and a 12-minute file takes a second to write instead of a minute.
"""

from __future__ import annotations

import functools
from pathlib import Path

import av
import numpy as np

DATA = Path(__file__).parent / "data"
SPEECH = DATA / "speech.mp3"
SCRIPT = (DATA / "speech.txt").read_text()


def script(repeats: int) -> str:
    """What ``repeated_speech(…, repeats)`` says."""
    return " ".join([SCRIPT] * repeats)


@functools.cache
def _encoded_speech(bitrate: int, sample_rate: int) -> tuple[tuple[bytes, ...], float]:
    """The fixture's frames re-encoded (mono) and how long they play, as a decoder counts."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
    with av.open(str(SPEECH)) as container:
        pieces = [
            out.to_ndarray().reshape(-1)
            for frame in container.decode(audio=0)
            for out in resampler.resample(frame)
        ]
    pieces += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    samples = np.concatenate(pieces)
    codec = av.CodecContext.create("libmp3lame", "w")
    assert isinstance(codec, av.AudioCodecContext)
    codec.sample_rate = sample_rate
    codec.layout = "mono"
    codec.format = "s16"
    codec.bit_rate = bitrate
    frame = av.AudioFrame.from_ndarray(samples[np.newaxis, :], format="s16", layout="mono")
    frame.sample_rate = sample_rate
    packets = [*codec.encode(frame), *codec.encode(None)]
    # Every frame plays in full (no gapless tag says otherwise): 1152 samples in MPEG-1, 576 below.
    samples_per_frame = 1152 if sample_rate >= 32_000 else 576
    return tuple(bytes(p) for p in packets), len(packets) * samples_per_frame / sample_rate


def repeated_speech(
    path: Path, repeats: int, *, bitrate: int = 32_000, sample_rate: int = 16_000
) -> float:
    """Write the fixture's speech ``repeats`` times over as one MP3; return its length in
    seconds. 320 kb/s needs an MPEG-1 rate (32 kHz or more)."""
    frames, seconds = _encoded_speech(bitrate, sample_rate)
    with path.open("wb") as out:
        for _ in range(repeats):
            out.write(b"".join(frames))
    return seconds * repeats
