"""In-process worker pool: a bounded number of threads take queued jobs through the pipeline."""

from __future__ import annotations

import logging
import queue
import threading

from transcriber.pipeline import Pipeline
from transcription.lifecycle import Lifecycle

log = logging.getLogger(__name__)


class LocalJobRunner:
    """Runs at most ``concurrency`` jobs at once; on start it resumes jobs a stopped process left."""

    def __init__(self, pipeline: Pipeline, lc: Lifecycle, *, concurrency: int = 1) -> None:
        self.pipeline = pipeline
        self.lc = lc
        self.concurrency = max(1, concurrency)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._loaded = threading.Event()
        self._load_error: str | None = None

    def start(self) -> None:
        for job_id in self.lc.requeue_interrupted():
            self._queue.put(job_id)
        for index in range(self.concurrency):
            thread = threading.Thread(
                target=self._work, name=f"whisper-worker-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        threading.Thread(target=self._preload, name="whisper-model-load", daemon=True).start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking jobs; a job still running stays ``running`` and is resumed on next start."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def submit(self, job_id: str) -> None:
        self._queue.put(job_id)

    def cancel(self, job_id: str) -> None:
        """Nothing to do here: the worker sees the cancelled status at its next progress write."""

    def readiness(self) -> str:
        if self._load_error is not None:
            return f"error: {self._load_error}"
        if not all(t.is_alive() for t in self._threads):
            return "error: a transcription worker stopped; see the server log"
        return "ok" if self._loaded.is_set() else "starting"

    def _preload(self) -> None:
        load = getattr(self.pipeline.engine, "load", None)
        try:
            if callable(load):
                load()
        except Exception as exc:
            log.exception("could not load the Whisper model")
            self._load_error = f"the Whisper model could not be loaded: {exc}"
            return
        self._loaded.set()

    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            try:
                self.pipeline.run(job_id)
            except Exception:
                # The pipeline records failures itself; this only keeps the worker alive.
                log.exception("worker crashed on job %s", job_id)
