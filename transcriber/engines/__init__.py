"""Transcription engines behind one protocol; ``build_engine`` picks one from settings."""

from __future__ import annotations

import os

from transcriber.engines.base import Checkpoints, Engine, Mode, ProgressCallback
from transcription.settings import WorkerSettings

__all__ = [
    "Checkpoints",
    "Engine",
    "Mode",
    "ProgressCallback",
    "build_engine",
    "default_concurrency",
    "default_threads",
]


#: CTranslate2 stops gaining from more threads for one small model around here, so larger
#: machines run several jobs at once instead.
THREADS_PER_JOB = 4


def _cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def default_concurrency() -> int:
    """Jobs to run at once on this machine: one per ``THREADS_PER_JOB`` cores, at least one."""
    return max(1, _cores() // THREADS_PER_JOB)


def default_threads(concurrency: int = 1) -> int:
    """Inference threads per job so that concurrent jobs share the cores without oversubscribing."""
    return max(1, _cores() // max(1, concurrency))


def build_engine(settings: WorkerSettings, *, concurrency: int = 1) -> Engine:
    """The engine ``settings`` choose; the OpenAI engine refuses to start without an API key."""
    if settings.engine == "openai":
        if settings.openai_api_key is None or not settings.openai_api_key.get_secret_value():
            raise ValueError(
                "WHISPER_ENGINE=openai needs OPENAI_API_KEY (any non-empty value for an "
                "OpenAI-compatible server that takes no key)."
            )
        try:
            from transcriber.engines.openai import OpenAIEngine
        except ImportError as exc:
            if exc.name not in ("openai", "numpy"):
                raise
            raise ImportError(
                "The OpenAI engine needs the openai package: "
                "pip install 'whisper-transcription-service[openai]'"
            ) from exc
        return OpenAIEngine(
            settings.model,
            api_key=settings.openai_api_key.get_secret_value(),
            base_url=settings.openai_base_url,
            max_chunk_bytes=settings.openai_max_chunk_bytes,
            max_chunk_seconds=settings.openai_max_chunk_seconds,
            parallelism=settings.openai_parallelism,
            max_retries=settings.openai_max_retries,
            timeout=settings.openai_timeout,
        )
    from transcriber.engines.local import LocalEngine

    return LocalEngine(
        settings.model,
        cpu_threads=settings.cpu_threads or default_threads(concurrency),
        # One CTranslate2 worker per concurrent job, or the jobs would queue for the model.
        num_workers=concurrency,
        batch_size=settings.batch_size,
        compute_type=settings.compute_type,
        accurate_compute_type=settings.accurate_compute_type,
    )
