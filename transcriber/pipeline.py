"""The transcription pipeline: audio from the blob store → engine → transcripts in blob store + DB."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transcriber.checkpoints import BlobCheckpoints, checkpoint_prefix
from transcriber.engines.base import Engine, Mode, is_resumable
from transcription import lifecycle
from transcription.blobstore import BlobStore
from transcription.db.models import Job, Transcript
from transcription.errors import DomainError, EngineUnavailable
from transcription.lifecycle import Lifecycle, TranscriptRecord
from transcription.transcript import FORMATS, MEDIA_TYPES, TranscriptResult, render

log = logging.getLogger(__name__)

#: Progress stays below 1 until the transcript is stored and the job is marked done.
RUNNING_PROGRESS_CAP = 0.99


class JobCancelled(Exception):
    """The job was cancelled while it ran; the worker stops and stores nothing."""


class ProgressReporter:
    """Turns seconds of audio processed into throttled progress writes."""

    def __init__(self, lc: Lifecycle, job: Job, interval: float) -> None:
        self.lc = lc
        self.job_id = job.id
        self.total = max(job.audio_seconds, 1e-6)
        self.interval = interval
        self.last_write = 0.0

    def __call__(self, seconds_done: float) -> None:
        now = time.monotonic()
        if now - self.last_write < self.interval:
            return
        self.last_write = now
        fraction = min(seconds_done / self.total, RUNNING_PROGRESS_CAP)
        if not self.lc.progress(self.job_id, fraction):
            raise JobCancelled(self.job_id)


class Pipeline:
    """Runs one job at a time through an engine; safe to run twice for the same job."""

    def __init__(
        self, lc: Lifecycle, blobs: BlobStore, engine: Engine, *, progress_interval: float = 1.0
    ) -> None:
        self.lc = lc
        self.blobs = blobs
        self.engine = engine
        self.progress_interval = progress_interval

    def run(self, job_id: str) -> Job | None:
        """Claim and transcribe a queued job; returns the finished job, or None if not claimed."""
        job = self.lc.start(job_id)
        if job is None:
            return None
        try:
            result = self._transcribe(job)
            record = self._store(job.id, result)
        except JobCancelled:
            log.info("job %s cancelled while running", job_id)
            self._cleanup(job, transcripts=True)
            return None
        except DomainError as exc:
            finished = self.lc.fail(job_id, code=exc.code, message=exc.message)
            self._cleanup(job, transcripts=True)
            return finished
        except Exception as exc:
            log.exception("job %s failed unexpectedly", job_id)
            finished = self.lc.fail(
                job_id,
                code="internal_error",
                message=f"Transcription failed unexpectedly ({type(exc).__name__}); "
                "the credit was refunded.",
            )
            self._cleanup(job, transcripts=True)
            return finished
        finished = self.lc.succeed(
            job_id,
            record,
        )
        # A job cancelled after the engine finished keeps nothing it produced.
        self._cleanup(job, transcripts=finished is None)
        return finished

    def record(self, job_id: str) -> Transcript | None:
        """The Job entrypoint's half of ``run``: transcribe and record, leave finishing to the
        operator. Returns the transcript (an earlier pod's, if one recorded it), or None if the
        job is finished or was cancelled; a ``DomainError`` is the user's fault and propagates."""
        job = self.lc.claim(job_id)
        if job is None:
            return None
        recorded = self.lc.transcript(job_id)
        if recorded is not None:
            return recorded
        try:
            result = self._transcribe(job)
            record = self._store(job.id, result)
        except JobCancelled:
            log.info("job %s cancelled while running", job_id)
            self._cleanup(job, transcripts=True)
            return None
        except EngineUnavailable:
            raise
        except DomainError:
            self._cleanup(job, transcripts=True)
            raise
        transcript = self.lc.record_transcript(
            job_id,
            record,
        )
        self._cleanup(job, transcripts=transcript is None)
        return transcript

    def _transcribe(self, job: Job) -> TranscriptResult:
        reporter = ProgressReporter(self.lc, job, self.progress_interval)
        mode: Mode = "accurate" if job.mode == "accurate" else "fast"
        with self._audio_file(job.audio_key) as path:
            if is_resumable(self.engine):
                return self.engine.transcribe(
                    path,
                    language=job.language,
                    prompt=job.prompt,
                    mode=mode,
                    on_progress=reporter,
                    checkpoints=BlobCheckpoints(self.blobs, checkpoint_prefix(job.id)),
                )
            return self.engine.transcribe(
                path, language=job.language, prompt=job.prompt, mode=mode, on_progress=reporter
            )

    @contextmanager
    def _audio_file(self, key: str) -> Iterator[Path]:
        local = self.blobs.local_path(key)
        if local is not None:
            yield local
            return
        with tempfile.TemporaryDirectory(prefix="whisper-job-") as tmp:
            path = Path(tmp) / "audio.mp3"
            self.blobs.download(key, path)
            yield path

    def _store(self, job_id: str, result: TranscriptResult) -> TranscriptRecord:
        """Write every rendering to the blob store; the returned record points at them."""
        uris: dict[str, str] = {
            fmt: self.blobs.put_bytes(
                lifecycle.transcript_key(job_id, fmt),
                render(result, fmt).encode(),
                content_type=MEDIA_TYPES[fmt],
            )
            for fmt in FORMATS
        }
        return TranscriptRecord(
            text=result.text,
            language=result.language,
            duration_seconds=result.duration,
            segment_count=len(result.segments),
            uris=uris,
            model=result.model or self.engine.model,
        )

    def _cleanup(self, job: Job, *, transcripts: bool) -> None:
        """The audio and checkpoints are not kept once the job is finished; nor are transcripts
        nobody will get."""
        self.blobs.delete(job.audio_key)
        self.blobs.delete_prefix(checkpoint_prefix(job.id))
        if transcripts:
            for fmt in FORMATS:
                self.blobs.delete(lifecycle.transcript_key(job.id, fmt))
