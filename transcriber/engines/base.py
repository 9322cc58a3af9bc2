"""The interface every transcription engine implements, so the worker can swap them per job."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol, TypeGuard

from transcription.states import Mode
from transcription.transcript import TranscriptResult

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
        mode: Mode = Mode.FAST,
        on_progress: ProgressCallback | None = None,
    ) -> TranscriptResult: ...


class Checkpoints(Protocol):
    """Small named records that outlive a crashed worker: the finished parts of one job."""

    def load(self, name: str) -> bytes | None:
        """The record saved under ``name``, or None."""

    def save(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name``, replacing any earlier record."""


class ResumableEngine(Engine, Protocol):
    """An engine that saves each finished part of a job and, when the same job runs again,
    reuses the saved parts instead of redoing them."""

    resumable: Literal[True]

    def transcribe(
        self,
        audio: Path,
        *,
        language: str | None = None,
        prompt: str | None = None,
        mode: Mode = Mode.FAST,
        on_progress: ProgressCallback | None = None,
        checkpoints: Checkpoints | None = None,
    ) -> TranscriptResult: ...


def is_resumable(engine: Engine) -> TypeGuard[ResumableEngine]:
    """Whether ``engine`` takes ``checkpoints``; engines written before resuming existed do not."""
    return getattr(engine, "resumable", False) is True
