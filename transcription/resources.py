"""The Kubernetes contract: TranscriptionJob and CreditCode spec/status models, group and names.

The CustomResourceDefinitions in ``crds/`` are generated from these models, and the gateway, the
operator and the tests build and read the resources through them, so code and CRD never drift.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from transcription.db.models import Job
from transcription.states import CodeState, EngineKind, Mode

GROUP = "transcription.whisper.dev"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "whisper"

#: Label put on every object the operator makes, with the owning TranscriptionJob's name.
JOB_LABEL = f"{GROUP}/transcription-job"
#: Annotation with the submission time (microseconds) that orders the admission queue.
SUBMITTED_AT = f"{GROUP}/submitted-at"

#: The custom resources' plurals, as the API paths and RBAC rules name them.
TJ_PLURAL = "transcriptionjobs"
CC_PLURAL = "creditcodes"

#: The transcriber's exit code when the audio itself is at fault: the Job's pod failure policy
#: fails the Job at once on it instead of retrying.
USER_ERROR_EXIT = 3

_JOB_NAME = re.compile(r"^tr-[0-9a-f]{16}$")


class Phase(StrEnum):
    """Where a TranscriptionJob stands; the last three are final."""

    PENDING = "Pending"
    QUEUED = "Queued"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"

    @property
    def finished(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED)


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )

    def dump(self) -> dict[str, Any]:
        """The resource form: camelCase keys, unset fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Condition(_Model):
    """One aspect of the object's state, in the Kubernetes convention."""

    type: str = Field(description="The aspect, e.g. Admitted, Running, Succeeded, Failed.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="A CamelCase word saying why the status is what it is.")
    message: str = Field("", description="A sentence for humans.")
    last_transition_time: datetime = Field(description="When the status last changed.")
    observed_generation: int | None = Field(
        None, description="The metadata.generation this condition was set for."
    )


_CONDITIONS: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}


class TranscriptionJobSpec(_Model):
    """What the operator needs to build the Job; the database holds the rest (the audio, its
    length, the language, the prompt and the credit), and is the truth."""

    job_id: str = Field(
        pattern=r"^tr_[0-9a-f]{16}$", description="ID of the transcription in the database."
    )
    engine: EngineKind = Field(EngineKind.LOCAL, description="Whisper engine to use.")
    model: str | None = Field(
        None, max_length=200, description="Model name or path; the engine's default if unset."
    )
    mode: Mode = Field(
        Mode.FAST, description="fast: batched decoding; accurate: sequential with context."
    )

    @classmethod
    def of(cls, job: Job) -> TranscriptionJobSpec:
        return cls(
            job_id=job.id, engine=EngineKind(job.engine), model=job.model, mode=Mode(job.mode)
        )


class TranscriptUris(_Model):
    """Where each rendering of the transcript is stored."""

    txt: str | None = Field(None, description="Plain text.")
    srt: str | None = Field(None, description="SubRip subtitles.")
    vtt: str | None = Field(None, description="WebVTT subtitles.")
    json_: str | None = Field(None, alias="json", description="Segments with timestamps.")


class TranscriptionJobStatus(_Model):
    """What the operator knows about the job; only the operator writes it."""

    phase: Phase | None = Field(None, description="Pending, Queued, Running or a final phase.")
    conditions: list[Condition] | None = Field(
        None,
        description="Detailed state in the Kubernetes convention.",
        json_schema_extra=_CONDITIONS,
    )
    observed_generation: int | None = Field(
        None, description="The metadata.generation the operator last acted on."
    )
    job_name: str | None = Field(None, description="Name of the batch/v1 Job doing the work.")
    progress: float | None = Field(None, ge=0, le=1, description="Fraction done, 0 to 1.")
    started_at: datetime | None = Field(None, description="When transcription started.")
    completed_at: datetime | None = Field(None, description="When the job reached a final phase.")
    audio_seconds: float | None = Field(None, description="Seconds of audio transcribed.")
    reserved_seconds: int | None = Field(None, description="Seconds of credit held for the job.")
    charged_seconds: int | None = Field(
        None, description="Seconds of credit charged once settled; 0 when refunded."
    )
    transcript_id: str | None = Field(None, description="ID of the stored transcript.")
    transcript_uris: TranscriptUris | None = Field(
        None, description="Where the transcript's renderings are stored."
    )
    message: str | None = Field(None, description="A sentence on the latest transition.")


class CreditCodeSpec(_Model):
    """A prepaid code to mint; the code itself appears only in the Secret the operator writes."""

    seconds: int = Field(ge=1, description="Budget in seconds of audio; raising it tops up.")
    max_uses: int = Field(1, ge=1, description="How many jobs the code may pay for.")
    expires_at: datetime | None = Field(None, description="When the code stops working.")
    label: str | None = Field(None, max_length=200, description="A note for admins.")


class CreditCodeStatus(_Model):
    """The code's counters as the ledger has them; never the code."""

    code_id: str | None = Field(None, description="ID of the code in the ledger.")
    secret_name: str | None = Field(None, description="Secret holding the code under key 'code'.")
    hint: str | None = Field(None, description="Last four characters of the code.")
    budget_seconds: int | None = Field(None, description="Total seconds the code is worth.")
    remaining_seconds: int | None = Field(None, description="Seconds not spent nor reserved.")
    reserved_seconds: int | None = Field(None, description="Seconds held by unfinished jobs.")
    spent_seconds: int | None = Field(None, description="Seconds charged so far.")
    uses: int | None = Field(None, description="Jobs the code has paid for or holds.")
    max_uses: int | None = Field(None, description="Jobs the code may pay for.")
    state: CodeState | None = Field(None, description="active, exhausted, expired or revoked.")
    conditions: list[Condition] | None = Field(
        None,
        description="Detailed state in the Kubernetes convention.",
        json_schema_extra=_CONDITIONS,
    )
    observed_generation: int | None = Field(
        None, description="The metadata.generation the operator last acted on."
    )
    message: str | None = Field(None, description="A sentence on the latest change.")


def resource_name(job_id: str) -> str:
    """The TranscriptionJob's name for a job ID (``tr_…`` is not a valid Kubernetes name)."""
    return job_id.replace("_", "-")


def job_id_of(name: str) -> str | None:
    """The job ID a TranscriptionJob's name stands for, or None if it is not one of ours."""
    return name.replace("-", "_", 1) if _JOB_NAME.match(name) else None


def transcription_job(
    *,
    job_id: str,
    namespace: str,
    spec: TranscriptionJobSpec,
    submitted_at: datetime,
) -> dict[str, Any]:
    """The TranscriptionJob the gateway creates for a submitted job."""
    return {
        "apiVersion": API_VERSION,
        "kind": "TranscriptionJob",
        "metadata": {
            "name": resource_name(job_id),
            "namespace": namespace,
            "annotations": {SUBMITTED_AT: submitted_at.isoformat(timespec="microseconds")},
        },
        "spec": spec.dump(),
    }
