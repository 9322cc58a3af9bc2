"""Transcription engines behind one protocol; ``build_engine`` picks one from settings."""

from __future__ import annotations

import os

from transcriber.engines.base import Engine, Mode, ProgressCallback
from transcription.settings import WorkerSettings

__all__ = ["Engine", "Mode", "ProgressCallback", "build_engine", "default_threads"]


def default_threads(concurrency: int = 1) -> int:
    """Inference threads per job so that concurrent jobs share the cores without oversubscribing."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, concurrency))


def build_engine(settings: WorkerSettings, *, concurrency: int = 1) -> Engine:
    if settings.engine == "openai":
        raise NotImplementedError(
            "The OpenAI engine is not available yet; use WHISPER_ENGINE=local."
        )
    from transcriber.engines.local import LocalEngine

    return LocalEngine(
        settings.model,
        cpu_threads=settings.cpu_threads or default_threads(concurrency),
        batch_size=settings.batch_size,
    )
