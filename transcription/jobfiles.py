"""A job's files in the blob store: the one key layout, the records a run leaves, and clean-up.

Everything a run needs or makes while the job is unfinished lives under ``jobs/<id>/work/`` (the
audio, checkpoints, progress and the result record), so one prefix delete removes it when the job
reaches a final state. Transcripts sit beside it and stay until the user deletes them. A run only
ever writes; deleting is the lifecycle's, so a losing second run never removes a winner's files.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from transcription.blobstore import BlobNotFound, BlobStore
from transcription.db.models import Job, utcnow
from transcription.states import Mode
from transcription.transcript import FORMATS, OutputFormat

log = logging.getLogger(__name__)

#: The transcriber's environment names each ``RunRequest`` field ``WHISPER_JOB_<FIELD>``.
ENV_PREFIX = "WHISPER_JOB_"


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}"


def work_prefix(job_id: str) -> str:
    """What exists only while the job is unfinished."""
    return f"{job_prefix(job_id)}/work"


def audio_key(job_id: str) -> str:
    return f"{work_prefix(job_id)}/audio.mp3"


def checkpoint_prefix(job_id: str) -> str:
    return f"{work_prefix(job_id)}/chunks"


def progress_key(job_id: str) -> str:
    return f"{work_prefix(job_id)}/progress.json"


def result_key(job_id: str) -> str:
    return f"{work_prefix(job_id)}/result.json"


def transcript_key(job_id: str, fmt: OutputFormat | str) -> str:
    return f"{job_prefix(job_id)}/transcript.{fmt}"


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


_R = TypeVar("_R", bound=_Record)


class RunRequest(_Record):
    """What one run is asked to do; the Job's environment carries it (``env``), so the
    transcriber pod reads no database."""

    job_id: str
    audio_key: str
    audio_seconds: float
    mode: Mode = Mode.FAST
    language: str | None = None
    prompt: str | None = None

    @classmethod
    def of(cls, job: Job) -> RunRequest:
        return cls(
            job_id=job.id,
            audio_key=job.audio_key,
            audio_seconds=job.audio_seconds,
            mode=Mode(job.mode),
            language=job.language,
            prompt=job.prompt,
        )

    def env(self) -> dict[str, str]:
        """The request as ``WHISPER_JOB_*`` variables; unset fields are left out."""
        values = self.model_dump(mode="json", exclude_none=True)
        return {_env_name(name): str(value) for name, value in values.items()}

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RunRequest:
        names = {name: _env_name(name) for name in cls.model_fields}
        return cls.model_validate({k: environ[v] for k, v in names.items() if v in environ})


def _env_name(field: str) -> str:
    return ENV_PREFIX + field.removeprefix("job_").upper()


class Progress(_Record):
    """How far a run has got, written as it goes."""

    fraction: float = Field(ge=0, le=1)
    seconds_done: float = Field(ge=0)
    updated_at: datetime


class RunError(_Record):
    code: str
    message: str


class RunResult(_Record):
    """What a finished run leaves for whoever finishes the job: the transcript's facts, or why
    the audio was refused. It never finishes the job itself."""

    version: Literal[1] = 1
    job_id: str
    outcome: Literal["transcribed", "rejected"]
    text: str = ""
    language: str | None = None
    duration_seconds: float = 0.0
    segment_count: int = 0
    uris: dict[str, str] = Field(default_factory=dict)
    model: str | None = None
    engine: str | None = None
    error: RunError | None = None


class JobFiles:
    """A job's blobs: reading and writing its records, and the clean-up of final states."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs

    def write_progress(self, job_id: str, fraction: float, seconds_done: float) -> None:
        record = Progress(
            fraction=min(max(fraction, 0.0), 1.0),
            seconds_done=max(seconds_done, 0.0),
            updated_at=utcnow(),
        )
        self.blobs.put_bytes(
            progress_key(job_id), record.model_dump_json().encode(), content_type="application/json"
        )

    def read_progress(self, job_id: str) -> Progress | None:
        return self._read(progress_key(job_id), Progress)

    def write_result(self, result: RunResult) -> None:
        self.blobs.put_bytes(
            result_key(result.job_id),
            result.model_dump_json().encode(),
            content_type="application/json",
        )

    def read_result(self, job_id: str) -> RunResult | None:
        return self._read(result_key(job_id), RunResult)

    def has_audio(self, job_id: str, key: str | None = None) -> bool:
        return self.blobs.exists(key or audio_key(job_id))

    def tidy(self, job_id: str, *, audio_key: str | None = None, transcripts: bool) -> None:
        """Remove what a finished job no longer needs; ``transcripts`` too when nobody will get
        them. Safe to repeat; a failure is logged and left for the next tidy."""
        try:
            self.blobs.delete_prefix(work_prefix(job_id))
            if audio_key is not None and not audio_key.startswith(work_prefix(job_id) + "/"):
                self.blobs.delete(audio_key)
            if transcripts:
                self.delete_transcripts(job_id)
        except Exception:
            log.warning("could not remove the files of job %s", job_id, exc_info=True)

    def delete_transcripts(self, job_id: str) -> None:
        for fmt in FORMATS:
            self.blobs.delete(transcript_key(job_id, fmt))

    def _read(self, key: str, model: type[_R]) -> _R | None:
        try:
            data = self.blobs.get_bytes(key)
        except BlobNotFound:
            return None
        try:
            return model.model_validate_json(data)
        except ValidationError:
            # A record cut short by a crash reads as absent: the writer will write it again.
            log.warning("ignoring an unreadable record at %s", key)
            return None
