"""The transcription pipeline: a job's audio from the blob store → engine → transcripts in the
blob store, and a ``RunResult`` saying what came of it.

The pipeline touches no database and finishes nothing: the caller (the embedded worker, or the
operator reading the result record the Job entrypoint writes) hands the result to
``Lifecycle.finish``. It only writes, under the job's own keys, so running it twice is harmless.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from transcriber.checkpoints import BlobCheckpoints
from transcriber.engines.base import Engine
from transcription import jobfiles
from transcription.blobstore import BlobNotFound, BlobStore
from transcription.errors import InvalidAudio
from transcription.jobfiles import RunError, RunRequest, RunResult
from transcription.transcript import FORMATS, MEDIA_TYPES, TranscriptResult, render

log = logging.getLogger(__name__)

#: Progress stays below 1 until the job is finished.
RUNNING_PROGRESS_CAP = 0.99

ProgressSink = Callable[[float, float], bool]
"""Told (fraction done, seconds of audio done); answers False when the run should stop."""


class JobCancelled(Exception):
    """The job stopped being this run's (cancelled, or taken over) while it ran."""


class AudioMissing(Exception):
    """The job's audio is gone: the job finished and was tidied before this run began, or
    before it stored its transcripts."""


class ProgressReporter:
    """Turns seconds of audio processed into throttled calls of a ``ProgressSink``."""

    def __init__(self, sink: ProgressSink, audio_seconds: float, interval: float) -> None:
        self.sink = sink
        self.total = max(audio_seconds, 1e-6)
        self.interval = interval
        self.last_write = -math.inf  # the first report always goes out

    def __call__(self, seconds_done: float) -> None:
        now = time.monotonic()
        if now - self.last_write < self.interval:
            return
        self.last_write = now
        fraction = min(seconds_done / self.total, RUNNING_PROGRESS_CAP)
        if not self.sink(fraction, min(seconds_done, self.total)):
            raise JobCancelled()


class Pipeline:
    """Runs one job through an engine; safe to run twice for the same job."""

    def __init__(self, blobs: BlobStore, engine: Engine, *, progress_interval: float = 1.0) -> None:
        self.blobs = blobs
        self.engine = engine
        self.progress_interval = progress_interval

    def run(self, request: RunRequest, progress: ProgressSink) -> RunResult:
        """Transcribe the job's audio and store its transcripts. Audio the engine cannot use
        (``InvalidAudio``, the user's fault) gives a ``rejected`` result; ``JobCancelled``,
        ``AudioMissing`` and the engine's own faults (``TranscriptionFailed``, crashes)
        propagate."""
        reporter = ProgressReporter(progress, request.audio_seconds, self.progress_interval)
        try:
            with self._audio_file(request.audio_key) as path:
                result = self._transcribe(request, path, reporter)
        except InvalidAudio as exc:
            return RunResult(
                job_id=request.job_id,
                outcome="rejected",
                error=RunError(code=exc.code, message=exc.message),
                engine=self.engine.name,
            )
        if not self.blobs.exists(request.audio_key):
            # The job finished while this run worked (another run of it won, or it was
            # cancelled): its transcripts, if any, are the winner's and must not be overwritten.
            raise AudioMissing(request.audio_key)
        return RunResult(
            job_id=request.job_id,
            outcome="transcribed",
            text=result.text,
            language=result.language,
            duration_seconds=result.duration,
            segment_count=len(result.segments),
            uris=self._store(request.job_id, result),
            model=result.model or self.engine.model,
            engine=self.engine.name,
        )

    def _transcribe(
        self, request: RunRequest, path: Path, reporter: ProgressReporter
    ) -> TranscriptResult:
        return self.engine.transcribe(
            path,
            language=request.language,
            prompt=request.prompt,
            mode=request.mode,
            on_progress=reporter,
            checkpoints=BlobCheckpoints(self.blobs, jobfiles.checkpoint_prefix(request.job_id)),
            temperature=request.temperature,
            word_timestamps=request.word_timestamps,
        )

    @contextmanager
    def _audio_file(self, key: str) -> Iterator[Path]:
        local = self.blobs.local_path(key)
        if local is not None:
            if not local.exists():
                raise AudioMissing(key)
            yield local
            return
        with tempfile.TemporaryDirectory(prefix="whisper-job-") as tmp:
            path = Path(tmp) / "audio.mp3"
            try:
                self.blobs.download(key, path)
            except BlobNotFound:
                raise AudioMissing(key) from None
            yield path

    def _store(self, job_id: str, result: TranscriptResult) -> dict[str, str]:
        """Write every rendering to the blob store; return where each one is."""
        return {
            fmt.value: self.blobs.put_bytes(
                jobfiles.transcript_key(job_id, fmt),
                render(result, fmt).encode(),
                content_type=MEDIA_TYPES[fmt],
            )
            for fmt in FORMATS
        }
