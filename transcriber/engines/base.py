"""The interface every transcription engine implements, so the worker can swap them per job."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from transcription.states import Mode
from transcription.transcript import TranscriptResult

ProgressCallback = Callable[[float], None]
"""Called with the seconds of audio processed so far; values never decrease."""


class Checkpoints(Protocol):
    """Small named records that outlive a crashed worker: the finished parts of one job."""

    def load(self, name: str) -> bytes | None:
        """The record saved under ``name``, or None."""

    def save(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name``, replacing any earlier record."""


class Engine(Protocol):
    """Turns one audio file into a transcript; ``name`` and ``model`` are reported with the job.

    An engine that works in parts may save each finished part to ``checkpoints`` and, when the
    same job runs again, reuse the saved parts instead of redoing them. ``temperature`` is the
    first sampling temperature of Whisper's decoding (None: the engine's default);
    ``word_timestamps`` asks for each word's times."""

    name: str
    model: str

    def transcribe(
        self,
        audio: Path,
        *,
        language: str | None = None,
        prompt: str | None = None,
        mode: Mode = Mode.FAST,
        on_progress: ProgressCallback | None = None,
        checkpoints: Checkpoints | None = None,
        temperature: float | None = None,
        word_timestamps: bool = True,
    ) -> TranscriptResult: ...
