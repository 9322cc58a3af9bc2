"""The transcript produced by an engine, and its renderings (.txt, .srt, .vtt, .json)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum


class OutputFormat(StrEnum):
    """The renderings every finished transcript is stored in."""

    TXT = "txt"
    SRT = "srt"
    VTT = "vtt"
    JSON = "json"


FORMATS: tuple[OutputFormat, ...] = tuple(OutputFormat)
MEDIA_TYPES: dict[str, str] = {
    "txt": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
    "json": "application/json",
}


@dataclass(frozen=True)
class Segment:
    """One timed piece of text; times are seconds from the start of the audio. The decoder's
    confidence figures are kept when the engine reports them (OpenAI's ``verbose_json`` has them)."""

    id: int
    start: float
    end: float
    text: str
    temperature: float | None = None
    avg_logprob: float | None = None
    compression_ratio: float | None = None
    no_speech_prob: float | None = None


@dataclass
class TranscriptResult:
    """What an engine returns for one audio file."""

    segments: list[Segment]
    language: str
    duration: float
    model: str = ""
    mode: str = "fast"
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return " ".join(s.text.strip() for s in self.segments if s.text.strip())


def _timestamp(seconds: float, sep: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{millis:03d}"


def to_txt(result: TranscriptResult) -> str:
    return result.text + "\n" if result.text else ""


def to_srt(result: TranscriptResult) -> str:
    blocks = [
        f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(result.segments, start=1)
    ]
    return "\n".join(blocks)


def to_vtt(result: TranscriptResult) -> str:
    blocks = [
        f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text.strip()}\n"
        for s in result.segments
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def to_json(result: TranscriptResult) -> str:
    """OpenAI ``verbose_json``-like shape, so existing tooling can read it."""
    payload = {
        "text": result.text,
        "language": result.language,
        "duration": round(result.duration, 3),
        "model": result.model,
        "mode": result.mode,
        "segments": [
            {
                **{k: v for k, v in asdict(s).items() if v is not None},
                "start": round(s.start, 3),
                "end": round(s.end, 3),
                "text": s.text.strip(),
            }
            for s in result.segments
        ],
    }
    return json.dumps(payload, ensure_ascii=False, indent=2) + "\n"


RENDERERS = {"txt": to_txt, "srt": to_srt, "vtt": to_vtt, "json": to_json}


def render(result: TranscriptResult, fmt: OutputFormat) -> str:
    return RENDERERS[fmt](result)
