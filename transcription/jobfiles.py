"""A job's files in the blob store: the one key layout, the records a run leaves, and clean-up.

Everything a run needs or makes while the job is unfinished lives under ``jobs/<id>/work/`` (the
audio, checkpoints, progress, engine usage and the result record), so one prefix delete removes
it when the job reaches a final state. Transcripts sit beside it and stay until the user deletes
them. A run only ever writes; deleting is the lifecycle's, so a losing second run never removes a
winner's files.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

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


def engine_usage_key(job_id: str) -> str:
    """What the job's runs that left no result record asked of their engine."""
    return f"{work_prefix(job_id)}/engine-usage.json"


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
    temperature: float | None = None
    word_timestamps: bool = True

    @classmethod
    def of(cls, job: Job) -> RunRequest:
        return cls(
            job_id=job.id,
            audio_key=job.audio_key,
            audio_seconds=job.audio_seconds,
            mode=Mode(job.mode),
            language=job.language,
            prompt=job.prompt,
            temperature=job.temperature,
            word_timestamps=job.word_timestamps,
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


#: Caps on what a record may claim its engine did: far above any real job, and low enough that a
#: compromised transcriber pod (it decodes untrusted audio) cannot wreck the counters it feeds.
MAX_ENGINE_COUNT = 1_000_000
MAX_ENGINE_BYTES = 1 << 40
MAX_MODEL_LOADS = 16
MAX_MODEL_LOAD_SECONDS = 86_400.0

# "error" (no answer) or a three-digit HTTP status: a bounded set of metric labels.
_RequestStatus = Annotated[str, StringConstraints(pattern=r"^(error|[1-9][0-9]{2})$")]
_Count = Annotated[int, Field(ge=0, le=MAX_ENGINE_COUNT)]


class EngineUsage(_Record):
    """What a job's runs asked of their engine, for the operator's engine metrics: nobody
    scrapes the short-lived transcriber pods that run it."""

    openai_requests: dict[_RequestStatus, _Count] = Field(default_factory=dict)
    openai_retries: _Count = 0
    openai_bytes_sent: int = Field(0, ge=0, le=MAX_ENGINE_BYTES)
    model_loads: int = Field(0, ge=0, le=MAX_MODEL_LOADS)
    model_load_seconds: float = Field(0.0, ge=0, le=MAX_MODEL_LOAD_SECONDS)

    def plus(self, other: EngineUsage) -> EngineUsage:
        """Both together, each figure held to its cap."""
        requests = dict(self.openai_requests)
        for status, count in other.openai_requests.items():
            requests[status] = min(requests.get(status, 0) + count, MAX_ENGINE_COUNT)
        return EngineUsage(
            openai_requests=requests,
            openai_retries=min(self.openai_retries + other.openai_retries, MAX_ENGINE_COUNT),
            openai_bytes_sent=min(
                self.openai_bytes_sent + other.openai_bytes_sent, MAX_ENGINE_BYTES
            ),
            model_loads=min(self.model_loads + other.model_loads, MAX_MODEL_LOADS),
            model_load_seconds=min(
                self.model_load_seconds + other.model_load_seconds, MAX_MODEL_LOAD_SECONDS
            ),
        )


class RunResult(_Record):
    """What a finished run leaves for whoever finishes the job: the transcript's facts, or why
    the audio was refused, and what its engine did. It never finishes the job itself."""

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
    engine_usage: EngineUsage | None = None

    @field_validator("engine_usage", mode="wrap")
    @classmethod
    def _usage_or_none(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # Usage beyond its bounds is dropped, not the transcript and the settlement with it.
        try:
            return handler(value)
        except ValidationError:
            log.warning("ignoring the engine usage of a result record: out of bounds")
            return None


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

    def write_engine_usage(self, job_id: str, usage: EngineUsage) -> None:
        self.blobs.put_bytes(
            engine_usage_key(job_id),
            usage.model_dump_json().encode(),
            content_type="application/json",
        )

    def read_engine_usage(self, job_id: str) -> EngineUsage | None:
        return self._read(engine_usage_key(job_id), EngineUsage)

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
            log.warning(
                "could not remove the files of job %s",
                job_id,
                exc_info=True,
                extra={"job_id": job_id},
            )

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
