"""The embedded worker pool: threads take queued jobs through the pipeline and finish them.

Each running job holds a lease in the database that a heartbeat renews; a job whose lease
expires (its worker or the whole process died) is queued again, and past the attempt limit it
fails and is refunded. A supervisor restarts worker threads that died and expires leases.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import socket
import sys
import threading
from datetime import timedelta

from transcriber.pipeline import AudioMissing, JobCancelled, Pipeline
from transcription.db.models import utcnow
from transcription.errors import DomainError
from transcription.jobfiles import RunRequest
from transcription.lifecycle import Lifecycle
from transcription.logs import job_context

log = logging.getLogger(__name__)

#: Transcription yields to the HTTP event loop under contention and runs at full speed otherwise.
WORKER_NICENESS = 10


def yield_to_requests() -> None:
    """Lower this thread's CPU priority (Linux: per thread, inherited by the threads the model
    starts from it), so the event loop answers requests at once while transcription uses the
    cores it leaves idle."""
    if sys.platform == "linux":
        thread = threading.get_native_id()
        with contextlib.suppress(OSError):
            current = os.getpriority(os.PRIO_PROCESS, thread)
            os.setpriority(os.PRIO_PROCESS, thread, max(current, WORKER_NICENESS))


class Heartbeat:
    """Renews a job's lease every third of its length while the job runs; ``held`` turns False
    when the lease is lost (the job was cancelled or taken over)."""

    def __init__(self, lc: Lifecycle, job_id: str, owner: str, lease_seconds: float) -> None:
        self.lc, self.job_id, self.owner, self.lease_seconds = lc, job_id, owner, lease_seconds
        self.held = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        with job_context(self.job_id):
            while not self._stop.wait(self.lease_seconds / 3):
                try:
                    self.held = self.lc.renew(self.job_id, self.owner, self.lease_seconds)
                except Exception:
                    # A missed renewal is not a lost lease; the next beat tries again.
                    log.warning("could not renew the lease of %s", self.job_id, exc_info=True)
                if not self.held:
                    return


class LocalJobRunner:
    """Runs at most ``concurrency`` jobs at once; on start it resumes what a stopped process left.

    ``exclusive`` says no other process can hold leases on this database (one server per data
    directory, SQLite), so leases left by a previous process are expired at once on start."""

    def __init__(
        self,
        pipeline: Pipeline,
        lc: Lifecycle,
        *,
        concurrency: int = 1,
        lease_seconds: float = 30.0,
        max_attempts: int = 3,
        exclusive: bool = False,
    ) -> None:
        self.pipeline = pipeline
        self.lc = lc
        self.concurrency = max(1, concurrency)
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.exclusive = exclusive
        self.owner = f"{socket.gethostname()[:32]}:{os.getpid()}:{secrets.token_hex(4)}"
        self._queue: queue.Queue[str | None] = queue.Queue()
        # IDs handed to the queue and not yet taken by a worker, so the sweep adds none twice.
        self._pending: set[str] = set()
        self._pending_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._loaded = threading.Event()
        self._load_error: str | None = None

    def start(self) -> None:
        # Far enough ahead that every lease a previous process held counts as expired.
        now = utcnow() + timedelta(days=1) if self.exclusive else None
        self.lc.expire_leases(self.max_attempts, now=now, unleased=self.exclusive)
        self._enqueue(self.lc.queued_ids())
        self._threads = [self._spawn(index) for index in range(self.concurrency)]
        self._supervisor = threading.Thread(
            target=self._supervise, name="whisper-supervisor", daemon=True
        )
        self._supervisor.start()
        threading.Thread(target=self._preload, name="whisper-model-load", daemon=True).start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking jobs; a job still running keeps its lease until it expires, then resumes."""
        self._stopping.set()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout)
        if self._supervisor is not None:
            self._supervisor.join(timeout)
        self._threads.clear()

    def submit(self, job_id: str) -> None:
        self._enqueue([job_id])

    def _enqueue(self, job_ids: list[str]) -> None:
        with self._pending_lock:
            for job_id in job_ids:
                if job_id not in self._pending:
                    self._pending.add(job_id)
                    self._queue.put(job_id)

    def cancel(self, job_id: str) -> None:
        """Nothing to do here: the worker sees the cancelled status at its next progress write."""

    def readiness(self) -> str:
        if self._load_error is not None:
            return f"error: {self._load_error}"
        return "ok" if self._loaded.is_set() else "starting"

    def _spawn(self, index: int) -> threading.Thread:
        thread = threading.Thread(target=self._work, name=f"whisper-worker-{index}", daemon=True)
        thread.start()
        return thread

    def _supervise(self) -> None:
        while not self._stopping.wait(self.lease_seconds / 3):
            for index, thread in enumerate(self._threads):
                if not thread.is_alive() and not self._stopping.is_set():
                    log.error("transcription worker %s died; starting a new one", index)
                    self._threads[index] = self._spawn(index)
            try:
                self.lc.expire_leases(self.max_attempts)
                # Level-based: every queued job in the database gets a turn, including those
                # another server sharing the database accepted and then lost with its queue.
                self._enqueue(self.lc.queued_ids())
            except Exception:
                log.warning("could not expire leases or read the queue; retrying", exc_info=True)

    def _preload(self) -> None:
        yield_to_requests()
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
        yield_to_requests()
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            with self._pending_lock:
                self._pending.discard(job_id)
            with job_context(job_id):
                try:
                    self.run(job_id)
                except Exception:
                    # The job keeps its lease until it expires, then runs again or fails.
                    log.exception("worker crashed on job %s", job_id)

    def run(self, job_id: str) -> None:
        """Take a queued job through the pipeline and finish it: succeed, fail or let it go."""
        job = self.lc.start(job_id, lease_owner=self.owner, lease_seconds=self.lease_seconds)
        if job is None:
            return
        with Heartbeat(self.lc, job_id, self.owner, self.lease_seconds) as heartbeat:

            def progress(fraction: float, _seconds_done: float) -> bool:
                return heartbeat.held and self.lc.progress(job_id, fraction, lease_owner=self.owner)

            try:
                result = self.pipeline.run(RunRequest.of(job), progress)
            except JobCancelled:
                log.info("job %s stopped: it is no longer this worker's", job_id)
                self.lc.discard_leftovers(job_id)
                return
            except AudioMissing:
                self._fail(job_id, "audio_missing", "The uploaded audio is gone.")
                return
            except DomainError as exc:
                self._fail(job_id, exc.code, exc.message)
                return
            except Exception as exc:
                log.exception("job %s failed unexpectedly", job_id)
                self._fail(
                    job_id,
                    "internal_error",
                    f"Transcription failed unexpectedly ({type(exc).__name__}); "
                    "the credit was refunded.",
                )
                return
        if result.error is not None:
            self._fail(job_id, result.error.code, result.error.message)
        elif self.lc.finish(job_id, result, lease_owner=self.owner) is None:
            # Cancelled after the engine finished: what it wrote belongs to nobody.
            self.lc.discard_leftovers(job_id)

    def _fail(self, job_id: str, code: str, message: str) -> None:
        self.lc.fail(job_id, code=code, message=message, lease_owner=self.owner)
