"""The transcript produced by an engine, and its renderings (.txt, .srt, .vtt, .json)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
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


#: A cue longer than two subtitle lines of 42 characters is cut at a word.
MAX_CUE_CHARS = 84
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


@dataclass(frozen=True)
class Word:
    """One word and when it is spoken; ``probability`` is the decoder's confidence, when known."""

    word: str
    start: float
    end: float
    probability: float | None = None


@dataclass(frozen=True)
class Segment:
    """One timed piece of text; times are seconds from the start of the audio. The decoder's
    confidence figures and its words are kept when the engine reports them."""

    id: int
    start: float
    end: float
    text: str
    temperature: float | None = None
    avg_logprob: float | None = None
    compression_ratio: float | None = None
    no_speech_prob: float | None = None
    words: tuple[Word, ...] | None = None


def cues(words: Sequence[Word]) -> list[list[Word]]:
    """``words`` in subtitle-sized runs: each sentence on its own, and a sentence longer than
    ``MAX_CUE_CHARS`` cut after its last comma that fits, or else its last word that fits."""
    runs: list[list[Word]] = []
    run: list[Word] = []
    for word in words:
        if run and len(text_of([*run, word])) > MAX_CUE_CHARS:
            commas = [i for i, w in enumerate(run[:-1], 1) if w.word.rstrip().endswith(",")]
            cut = commas[-1] if commas and commas[-1] * 2 >= len(run) else len(run)
            runs.append(run[:cut])
            run = run[cut:]
        run.append(word)
        if _SENTENCE_END.search(word.word.strip()):
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return runs


def text_of(words: Sequence[Word]) -> str:
    """The text ``words`` spell; each word carries the space before it, as Whisper decodes it."""
    return "".join(w.word for w in words).strip()


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
    """OpenAI ``verbose_json``-like shape, so existing tooling can read it; each segment carries
    its ``words`` when the engine timed them."""
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
                **({"words": [_word(w) for w in s.words]} if s.words is not None else {}),
            }
            for s in result.segments
        ],
    }
    return json.dumps(payload, ensure_ascii=False, indent=2) + "\n"


def _word(word: Word) -> dict[str, object]:
    timed: dict[str, object] = {
        "word": word.word.strip(),
        "start": round(word.start, 3),
        "end": round(word.end, 3),
    }
    if word.probability is not None:
        timed["probability"] = round(word.probability, 4)
    return timed


RENDERERS = {"txt": to_txt, "srt": to_srt, "vtt": to_vtt, "json": to_json}


def render(result: TranscriptResult, fmt: OutputFormat) -> str:
    return RENDERERS[fmt](result)
