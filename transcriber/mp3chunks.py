"""Cutting an MP3 into pieces an API accepts: under a size and a duration limit, at quiet points,
as byte ranges of whole frames, so nothing is re-encoded.

A piece that starts mid-file may lose the first frame's bit-reservoir bytes, which costs a few
milliseconds of sound at the start of the piece; cutting where it is quiet makes that inaudible.
"""

from __future__ import annotations

import bisect
import io
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import av
import av.error
import numpy as np

from transcription.errors import TranscriptionFailed, UndecodableAudio

SEARCH_SECONDS = 15.0
"""How far from the ideal cut (either way) to look for a quiet point; at most a quarter of the
piece, so pieces stay of similar length."""

_QUIET_WINDOW_SECONDS = 0.4  # the stretch around a cut whose loudness is compared
_WARMUP_FRAMES = 16  # frames decoded before a search window so the bit reservoir is filled
_COPY_BUFFER = 1024 * 1024


@dataclass(frozen=True)
class Frame:
    """One MP3 frame: where its bytes are and when it plays."""

    pos: int
    size: int
    start: float
    duration: float


@dataclass(frozen=True)
class Chunk:
    """Frames ``[first, last)`` of the file: bytes ``[byte_start, byte_end)``, seconds
    ``[start, end)`` from the start of the audio."""

    index: int
    first: int
    last: int
    byte_start: int
    byte_end: int
    start: float
    end: float

    @property
    def size(self) -> int:
        return self.byte_end - self.byte_start

    @property
    def duration(self) -> float:
        return self.end - self.start


def read_frames(path: Path) -> list[Frame]:
    """Every audio frame of the MP3 at ``path``, in order, found by demuxing (no decoding)."""
    frames: list[Frame] = []
    try:
        with av.open(str(path), format="mp3", metadata_errors="ignore") as container:
            stream = container.streams.audio[0]
            tick = float(stream.time_base or 0)
            clock = 0.0
            for packet in container.demux(stream):
                if not packet.size:
                    continue
                if packet.pos is None or packet.pos < 0:
                    raise TranscriptionFailed(
                        f"Could not split {path.name}: its MP3 frames have no byte positions."
                    )
                duration = (packet.duration or 0) * tick
                frames.append(Frame(packet.pos, packet.size, clock, duration))
                clock += duration
    except (av.error.FFmpegError, IndexError) as exc:
        raise UndecodableAudio(
            f"Could not split {path.name}: the audio could not be read ({exc})."
        ) from exc
    if not frames:
        raise UndecodableAudio(f"Could not split {path.name}: it holds no MP3 audio frames.")
    return frames


def plan_chunks(
    path: Path, *, max_bytes: int, max_seconds: float, search_seconds: float = SEARCH_SECONDS
) -> list[Chunk]:
    """Split ``path`` into as few pieces of similar length as the limits allow, each cut moved
    to the quietest moment within ``search_seconds`` of where it would ideally fall."""
    frames = read_frames(path)
    starts = [f.start for f in frames]
    positions = [f.pos for f in frames]
    end_byte = frames[-1].pos + frames[-1].size
    end_time = frames[-1].start + frames[-1].duration
    cuts = [0]
    while True:
        first = cuts[-1]
        left_bytes = end_byte - positions[first]
        left_seconds = end_time - starts[first]
        if left_bytes <= max_bytes and left_seconds <= max_seconds:
            break
        parts = max(2, math.ceil(left_bytes / max_bytes), math.ceil(left_seconds / max_seconds))
        ideal = starts[first] + left_seconds / parts
        radius = min(search_seconds, left_seconds / parts / 4)
        # The last frame index a piece starting at ``first`` may end before.
        hard = min(
            bisect.bisect_right(positions, positions[first] + max_bytes) - 1,
            bisect.bisect_right(starts, starts[first] + max_seconds) - 1,
        )
        hard = max(hard, first + 1)
        lo = max(first + 1, bisect.bisect_left(starts, ideal - radius))
        hi = min(hard, bisect.bisect_right(starts, ideal + radius))
        cuts.append(_quietest(path, frames, min(lo, hi), hi, ideal))
    cuts.append(len(frames))
    return [
        Chunk(
            index=i,
            first=a,
            last=b,
            byte_start=positions[a],
            byte_end=positions[b] if b < len(frames) else end_byte,
            start=starts[a],
            end=starts[b] if b < len(frames) else end_time,
        )
        for i, (a, b) in enumerate(itertools.pairwise(cuts))
    ]


def write_chunk(path: Path, chunk: Chunk, dest: Path) -> None:
    """Copy the chunk's frames, byte for byte, into a file of their own at ``dest``."""
    with path.open("rb") as source, dest.open("wb") as out:
        source.seek(chunk.byte_start)
        left = chunk.size
        while left > 0:
            block = source.read(min(_COPY_BUFFER, left))
            if not block:
                break
            out.write(block)
            left -= len(block)


def _quietest(path: Path, frames: list[Frame], lo: int, hi: int, ideal: float) -> int:
    """The frame in ``[lo, hi]`` to cut before: the one with the least sound around it, the
    nearest to ``ideal`` among equally quiet ones."""
    around = max(1, round(_QUIET_WINDOW_SECONDS / 2 / max(frames[lo].duration, 1e-3)))
    first, last = max(0, lo - around), min(len(frames), hi + around)
    energy = _energies(path, frames, first, last)
    prefix = np.concatenate([[0.0], np.cumsum(energy)])

    def loudness(cut: int) -> float:
        a, b = max(first, cut - around) - first, min(last, cut + around) - first
        return float((prefix[b] - prefix[a]) / max(b - a, 1))

    return min(range(lo, hi + 1), key=lambda cut: (loudness(cut), abs(frames[cut].start - ideal)))


def _energies(path: Path, frames: list[Frame], first: int, last: int) -> np.ndarray:
    """Mean square amplitude of frames ``[first, last)``, decoding only that stretch (plus a
    few frames before it); a frame that fails to decode counts as the loudest, so no cut lands
    there."""
    warm = max(0, first - _WARMUP_FRAMES)
    base = frames[warm].pos
    with path.open("rb") as file:
        file.seek(base)
        data = file.read(frames[last - 1].pos + frames[last - 1].size - base)
    index = {frames[i].pos - base: i for i in range(warm, last)}
    energy = np.full(last - first, np.nan)
    with av.open(io.BytesIO(data), mode="r", format="mp3") as container:
        stream = container.streams.audio[0]
        for packet in container.demux(stream):
            at = index.get(packet.pos if packet.pos is not None else -1)
            try:
                decoded = stream.codec_context.decode(packet)
            except av.error.FFmpegError:
                continue
            if at is None or at < first or not decoded:
                continue
            samples = np.concatenate([f.to_ndarray().astype(np.float64).ravel() for f in decoded])
            energy[at - first] = float(np.mean(np.square(samples))) if samples.size else 0.0
    decoded_any = not np.all(np.isnan(energy))
    return np.nan_to_num(energy, nan=float(np.nanmax(energy)) if decoded_any else 0.0)
