"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from transcription.db.models import CreditCode, Job, Transcript
from transcription.states import CodeState, JobStatus
from transcription.transcript import FORMATS

T = TypeVar("T")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class JobError(BaseModel):
    code: str
    message: str


class TranscriptInfo(BaseModel):
    id: str
    language: str | None
    duration_seconds: float
    segment_count: int
    urls: dict[str, str] = Field(description="Where to download each format from this API.")


class TranscriptionOut(BaseModel):
    """A transcription job as the API shows it."""

    id: str
    object: Literal["transcription"] = "transcription"
    status: JobStatus
    progress: float = Field(ge=0, le=1)
    filename: str | None
    mode: str
    engine: str
    model: str | None
    language: str | None
    prompt: str | None
    temperature: float | None = Field(
        None, description="The first sampling temperature asked for (OpenAI endpoint)."
    )
    word_timestamps: bool = Field(True, description="Whether each word is timed.")
    audio_seconds: float
    reserved_seconds: int
    charged_seconds: int | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    error: JobError | None
    transcript: TranscriptInfo | None
    text: str | None = Field(None, description="The transcript text, once succeeded.")
    deleted: bool = False

    @classmethod
    def build(
        cls, job: Job, transcript: Transcript | None = None, *, with_text: bool = False
    ) -> TranscriptionOut:
        if job.status != JobStatus.SUCCEEDED:
            transcript = None  # no text or link exists for a job that has not succeeded
        info = None
        if transcript is not None:
            info = TranscriptInfo(
                id=transcript.id,
                language=transcript.language,
                duration_seconds=transcript.duration_seconds,
                segment_count=transcript.segment_count,
                urls={f: f"/v1/transcriptions/{job.id}/transcript.{f}" for f in FORMATS},
            )
        return cls(
            id=job.id,
            status=job.status,
            progress=round(job.progress, 4),
            filename=job.filename,
            mode=job.mode,
            engine=job.engine,
            model=job.model,
            language=job.language,
            prompt=job.prompt,
            temperature=job.temperature,
            word_timestamps=job.word_timestamps,
            audio_seconds=round(job.audio_seconds, 3),
            reserved_seconds=job.reserved_seconds,
            charged_seconds=job.charged_seconds,
            created_at=job.created_at,
            started_at=job.started_at,
            completed_at=job.completed_at,
            error=JobError(code=job.error_code, message=job.error_message or "")
            if job.error_code
            else None,
            transcript=info,
            text=transcript.text if (with_text and transcript is not None) else None,
            deleted=job.deleted_at is not None,
        )


class ListResponse(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool


class CreditsOut(BaseModel):
    """A credit code's balance; never contains the code itself."""

    id: str
    object: Literal["credit_code"] = "credit_code"
    label: str | None
    hint: str = Field(description="The code's last characters, to tell codes apart.")
    state: CodeState
    budget_seconds: int
    reserved_seconds: int
    spent_seconds: int
    remaining_seconds: int
    uses: int
    max_uses: int
    expires_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime

    @classmethod
    def build(cls, record: CreditCode) -> CreditsOut:
        return cls(
            id=record.id,
            label=record.label,
            hint="…" + record.hint,
            state=record.state(),
            budget_seconds=record.budget_seconds,
            reserved_seconds=record.reserved_seconds,
            spent_seconds=record.spent_seconds,
            remaining_seconds=record.remaining_seconds,
            uses=record.uses,
            max_uses=record.max_uses,
            expires_at=record.expires_at,
            revoked_at=record.revoked_at,
            created_at=record.created_at,
        )


class CodeCreated(CreditsOut):
    code: str = Field(description="The secret code. Shown only in this response.")


class CodeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: int = Field(3600, ge=1, le=10_000_000, description="Budget in seconds of audio.")
    max_uses: int = Field(1, ge=1, le=1_000_000, description="How many jobs the code can pay for.")
    expires_at: datetime | None = Field(None, description="When the code stops working (UTC).")
    label: str | None = Field(None, max_length=200)


class CodeUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    add_seconds: int | None = Field(None, ge=1, le=10_000_000, description="Top up the budget.")
    max_uses: int | None = Field(None, ge=1, le=1_000_000)
    expires_at: datetime | None = Field(None, description="New expiry; null removes it.")
    label: str | None = Field(None, max_length=200)
    revoked: Literal[True] | None = Field(None, description="true revokes the code for good.")
