"""The interface every transcription engine implements, so the worker can swap them per job."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol

from transcription.transcript import TranscriptResult

Mode = Literal["fast", "accurate"]

ProgressCallback = Callable[[float], None]
"""Called with the seconds of audio processed so far; values never decrease."""


class Engine(Protocol):
    """Turns one audio file into a transcript; ``name`` and ``model`` are reported with the job."""

    name: str
    model: str

    def transcribe(
        self,
        audio: Path,
        *,
        language: str | None = None,
        prompt: str | None = None,
        mode: Mode = "fast",
        on_progress: ProgressCallback | None = None,
    ) -> TranscriptResult: ...
