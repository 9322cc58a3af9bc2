"""Audio intake: recognise an MP3 upload and measure how long it really plays.

The length that is charged and checked against the limit comes from demuxing every frame, never
from the header: a Xing header is a claim anyone can edit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import av
import av.error
from mutagen import MutagenError
from mutagen.mp3 import MPEGInfo

from transcription.errors import AudioTooLong, EmptyAudio, UndecodableAudio, UnsupportedMediaType

HEAD_BYTES = 64 * 1024
"""How much of the audio after its ID3v2 tags ``probe_mp3`` reads to recognise the format."""

_MAX_JUNK = 4096  # bytes of garbage tolerated before the first frame, after tags and zero padding
_MIN_SECONDS = 0.1  # less than this is a click, not something to transcribe
_CHAIN = 3  # consecutive consistent frame headers that make random bytes implausible
_DECODE_RUNS = 8  # places spread through the file where a few packets are really decoded
_RUN_PACKETS = 4
_MAX_STACKED_TAGS = 8  # real files stack two or three; a file of nothing but tags is not audio
_LIMIT_SLACK = 2.0  # seconds of gapless padding the raw packet clock may carry past the limit

# Layer III tables, indexed by the header's version bits (0: MPEG-2.5, 2: MPEG-2, 3: MPEG-1).
_SAMPLE_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_KBPS_MPEG1 = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
_KBPS_MPEG2 = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)

_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"fLaC", "a FLAC file"),
    (0, b"OggS", "an Ogg (Vorbis or Opus) file"),
    (4, b"ftyp", "an MP4/M4A file"),
    (0, b"\x1a\x45\xdf\xa3", "a Matroska/WebM file"),
    (0, b"0&\xb2u\x8ef\xcf\x11", "a WMA/ASF file"),
    (0, b"#!AMR", "an AMR file"),
    (0, b"\x00\x00\x01\xba", "an MPEG program stream"),
    (0, b"%PDF", "a PDF document"),
    (0, b"PK\x03\x04", "a ZIP archive or office document"),
    (0, b"\x89PNG", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"GIF8", "a GIF image"),
)


@dataclass(frozen=True)
class AudioInfo:
    """What probing an MP3 found; ``duration`` is measured, ``declared_duration`` only claimed."""

    duration: float  # seconds that demux and decode, gapless padding dropped
    declared_duration: float | None  # seconds the Xing header (or a bitrate guess) claims
    sample_rate: int
    channels: int
    bitrate: int | None  # average bits per second of the audio frames


def probe_mp3(path: Path, *, max_seconds: float) -> AudioInfo:
    """Check that ``path`` is MP3 audio no longer than ``max_seconds`` and measure it.

    Raises ``EmptyAudio``, ``UnsupportedMediaType``, ``UndecodableAudio`` or ``AudioTooLong``.
    """
    size = path.stat().st_size
    if size == 0:
        raise EmptyAudio("The file is empty.", param="file")
    with path.open("rb") as file:
        head, audio_start = _head_after_tags(file)
        if not head:
            raise EmptyAudio("The file holds only an ID3 tag and no audio.", param="file")
        if not _mp3_frames_at(head, 0):
            raise UnsupportedMediaType(
                f"The file {_describe(head)}; only MP3 audio is accepted.", param="file"
            )
        try:
            declared = MPEGInfo(file, audio_start).length
        except MutagenError as exc:
            raise UndecodableAudio(
                "The file starts like an MP3 but its header cannot be read.", param="file"
            ) from exc
    return _measure(path, size, audio_start, max_seconds=max_seconds, declared=declared)


def _measure(
    path: Path, size: int, audio_start: int, *, max_seconds: float, declared: float | None
) -> AudioInfo:
    """Demux every packet, summing durations, and decode a few runs spread through the file."""
    try:
        container = av.open(str(path), format="mp3", metadata_errors="ignore")
    except av.error.FFmpegError as exc:
        raise UndecodableAudio("The file cannot be read as MP3 audio.", param="file") from exc
    with container:
        stream = container.streams.audio[0] if container.streams.audio else None
        if stream is None or stream.time_base is None:
            raise UndecodableAudio("The file contains no MP3 audio stream.", param="file")
        codec = stream.codec_context
        tick = float(stream.time_base)
        limit_ticks = (max_seconds + _LIMIT_SLACK) / tick
        checkpoints = [size * k // _DECODE_RUNS for k in range(_DECODE_RUNS)]
        ticks = run_start = run_left = audio_bytes = 0
        run_decoded = stopped_early = False
        first: av.Packet | None = None
        last: av.Packet | None = None
        try:
            for packet in container.demux(stream):
                if not packet.size:  # PyAV's end-of-stream packet, which only flushes decoders
                    continue
                if first is None:
                    first = packet
                audio_bytes += packet.size
                if not run_left and checkpoints and audio_start + audio_bytes > checkpoints[0]:
                    checkpoints = [at for at in checkpoints if at >= audio_start + audio_bytes]
                    run_start, run_left, run_decoded = ticks, _RUN_PACKETS, False
                    codec.flush_buffers()
                if run_left:
                    run_left -= 1
                    run_decoded = _decodes(codec, packet) or run_decoded
                    if not run_left and not run_decoded:
                        raise _damaged(run_start * tick)
                last = packet
                ticks += packet.duration or 0
                if ticks > limit_ticks:
                    stopped_early = True
                    break
        except av.error.FFmpegError as exc:
            raise _damaged(ticks * tick) from exc
        if first is None or last is None:
            raise UndecodableAudio("The file contains no decodable MP3 audio.", param="file")
        if run_left and not run_decoded and not stopped_early:
            raise _damaged(run_start * tick)
        sample_rate = codec.sample_rate
        duration = ticks * tick - _gapless_padding(first, last, sample_rate)
        if duration > max_seconds:
            about = ""
            if stopped_early:
                duration *= max(1.0, (size - audio_start) / audio_bytes)
                about = "about "
            shown = max(duration, math.floor(max_seconds) + 1)  # never print "equal" to the limit
            raise AudioTooLong(
                f"The audio is {about}{_format_duration(shown)} long; "
                f"the limit is {_format_duration(max_seconds)}.",
                param="file",
            )
        if duration < _MIN_SECONDS:
            raise UndecodableAudio(
                f"Only {max(duration, 0):.2f} s of the file decodes as audio; that is too little to "
                "transcribe.",
                param="file",
            )
        return AudioInfo(
            duration=duration,
            declared_duration=declared,
            sample_rate=sample_rate,
            channels=codec.channels,
            bitrate=round(audio_bytes * 8 / duration),
        )


def _damaged(at_seconds: float) -> UndecodableAudio:
    where = f" from {_format_duration(at_seconds)} on" if at_seconds else ""
    return UndecodableAudio(
        f"The audio does not decode{where}; the file is damaged or is not really MP3.",
        param="file",
    )


def _decodes(codec: av.AudioCodecContext, packet: av.Packet) -> bool:
    try:
        return bool(codec.decode(packet))
    except av.error.FFmpegError:
        return False


def _gapless_padding(first: av.Packet, last: av.Packet, sample_rate: int) -> float:
    """Seconds of encoder delay and end padding a LAME tag asks players to drop."""
    samples = 0
    for packet, offset in ((first, 0), (last, 4)):
        if packet.has_sidedata("skip_samples"):
            data = bytes(packet.get_sidedata("skip_samples"))
            samples += int.from_bytes(data[offset : offset + 4], "little")
    return samples / sample_rate


def _head_after_tags(file: BinaryIO) -> tuple[bytes, int]:
    """The first ``HEAD_BYTES`` after any ID3v2 tags (some taggers stack several) and where
    they start; reading past tags this way copes with cover art larger than the head."""
    offset = 0
    for _ in range(_MAX_STACKED_TAGS):
        file.seek(offset)
        length = _id3v2_length(file.read(10))
        if length is None:
            break
        offset += length
    file.seek(offset)
    return file.read(HEAD_BYTES), offset


def _id3v2_length(data: bytes) -> int | None:
    """The length of the ID3v2 tag starting ``data``, header and footer included, if any."""
    if len(data) < 10 or data[:3] != b"ID3" or data[3] not in (2, 3, 4) or data[4] == 0xFF:
        return None
    if any(b & 0x80 for b in data[6:10]):
        return None
    size = data[6] << 21 | data[7] << 14 | data[8] << 7 | data[9]  # "syncsafe": 7 bits a byte
    return 10 + size + (10 if data[5] & 0x10 else 0)


def _mp3_frames_at(data: bytes, start: int) -> bool:
    """Whether MP3 frames follow ``start``, after optional zero padding and a little junk."""
    if any(data.startswith(magic, start + at) for at, magic, _ in _MAGIC) or _is_riff(data, start):
        return False
    start = len(data) - len(data[start:].lstrip(b"\x00"))
    position = data.find(b"\xff", start, start + _MAX_JUNK)
    while position != -1:
        if _frame_chain(data, position):
            return True
        position = data.find(b"\xff", position + 1, start + _MAX_JUNK)
    return False


def _frame_chain(data: bytes, position: int) -> bool:
    """Whether ``_CHAIN`` consistent layer III frames start at ``position``; two whole frames
    are enough when the data ends before a third header could be read."""
    kind: tuple[int, int] | None = None
    for count in range(_CHAIN):
        if position + 4 > len(data):
            return count >= 2 and position <= len(data)
        header = _frame_header(data[position : position + 4])
        if header is None:
            return False
        length, this_kind = header
        if kind is not None and this_kind != kind:
            return False
        kind = this_kind
        position += length
    return True


def _frame_header(header: bytes) -> tuple[int, tuple[int, int]] | None:
    """The frame length and (version, sample rate) of an MPEG layer III frame header."""
    if header[0] != 0xFF or header[1] & 0xE0 != 0xE0:
        return None
    version, layer = (header[1] >> 3) & 3, (header[1] >> 1) & 3
    bitrate_index, rate_index = header[2] >> 4, (header[2] >> 2) & 3
    if version == 1 or layer != 1 or bitrate_index in (0, 15) or rate_index == 3:
        return None
    if header[3] & 3 == 2:  # reserved emphasis
        return None
    sample_rate = _SAMPLE_RATES[version][rate_index]
    padding = (header[2] >> 1) & 1
    if version == 3:
        length = 144_000 * _KBPS_MPEG1[bitrate_index] // sample_rate + padding
    else:
        length = 72_000 * _KBPS_MPEG2[bitrate_index] // sample_rate + padding
    return length, (version, rate_index)


def _is_riff(data: bytes, start: int) -> bool:
    return data.startswith((b"RIFF", b"RIFX", b"RF64"), start)


def _describe(head: bytes) -> str:
    """Complete "The file …" with what ``head`` looks like, for the unsupported-type message."""
    if _is_riff(head, 0):
        kind = "a WAV (RIFF) file" if head[8:12] == b"WAVE" else "a RIFF (AVI or similar) file"
        return f"is {kind}"
    if head.startswith(b"FORM") and head[8:12] in (b"AIFF", b"AIFC"):
        return "is an AIFF file"
    for at, magic, kind in _MAGIC:
        if head.startswith(magic, at):
            return f"is {kind}"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0:
        return "is AAC audio (ADTS)"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06 in (4, 6):
        return "is MPEG layer I/II audio (MP1/MP2), not MP3"
    sample = head[:4096]
    text = sample.decode("utf-8", "ignore")
    if (
        text.strip()
        and len(text.encode()) >= len(sample) - 3  # the sample may end in a cut character
        and all(char.isprintable() or char in "\t\r\n" for char in text)
    ):
        return "is a text file"
    return "does not look like MP3 audio"


def _format_duration(seconds: float) -> str:
    """``3h 0m 4s``, ``10m 0s`` or ``45s``, to the nearest second."""
    hours, rest = divmod(round(seconds), 3600)
    minutes, seconds_left = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m {seconds_left}s"
    return f"{minutes}m {seconds_left}s" if minutes else f"{seconds_left}s"
