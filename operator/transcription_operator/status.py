"""Pure mappings: a Job's status and its pods' termination messages → TranscriptionJob status."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from transcription.db.models import Job, Transcript
from transcription.resources import Condition, Phase, TranscriptionJobStatus, TranscriptUris
from transcription.states import JobStatus
from transcription_operator.builders import CONTAINER


@dataclass(frozen=True)
class JobState:
    """What the child Job's own status says."""

    phase: Phase
    reason: str
    message: str = ""


def job_state(job: dict[str, Any]) -> JobState:
    """Map a batch/v1 Job's status to a phase, the way ``kubectl get job`` reads it."""
    status = job.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") in ("Complete", "SuccessCriteriaMet"):
            return JobState(Phase.SUCCEEDED, "JobComplete", condition.get("message", ""))
        if condition.get("type") in ("Failed", "FailureTarget"):
            return JobState(
                Phase.FAILED, condition.get("reason") or "JobFailed", condition.get("message", "")
            )
    if (job.get("spec") or {}).get("suspend"):
        return JobState(Phase.QUEUED, "Suspended", "Waiting for the cluster queue to admit it.")
    if (status.get("active") or 0) > 0:
        return JobState(Phase.RUNNING, "PodRunning")
    return JobState(Phase.PENDING, "JobCreated", "Waiting for a transcriber pod to start.")


@dataclass(frozen=True)
class Termination:
    """A transcriber's JSON termination message, or what a crash left in its place."""

    outcome: str
    error_code: str | None = None
    error_message: str | None = None


def termination(pods: list[dict[str, Any]]) -> Termination | None:
    """The termination message of the most recently finished transcriber container."""
    finished: list[tuple[str, str]] = []
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            state = (container.get("state") or {}).get("terminated")
            if container.get("name") == CONTAINER and state:
                finished.append((state.get("finishedAt") or "", state.get("message") or ""))
    if not finished:
        return None
    text = max(finished)[1]
    try:
        message = json.loads(text)
    except ValueError:
        # FallbackToLogsOnError put the log's tail here: a crash, not an outcome.
        return Termination("crashed", "internal_error", text.strip()[-500:] or None)
    error = message.get("error") or {}
    return Termination(str(message.get("outcome")), error.get("code"), error.get("message"))


@dataclass(frozen=True)
class Snapshot:
    """The database's view of a job, which is the truth for credit and final outcome."""

    status: JobStatus
    progress: float
    started_at: datetime | None
    completed_at: datetime | None
    audio_seconds: float
    reserved_seconds: int
    charged_seconds: int | None
    error_message: str | None
    transcript_id: str | None
    transcript_uris: dict[str, str]


def snapshot(job: Job, transcript: Transcript | None) -> Snapshot:
    return Snapshot(
        status=JobStatus(job.status),
        progress=job.progress,
        started_at=job.started_at,
        completed_at=job.completed_at,
        audio_seconds=job.audio_seconds,
        reserved_seconds=job.reserved_seconds,
        charged_seconds=job.charged_seconds,
        error_message=job.error_message,
        transcript_id=transcript.id if transcript else None,
        transcript_uris=dict(transcript.uris) if transcript else {},
    )


_FINAL = {
    JobStatus.SUCCEEDED: Phase.SUCCEEDED,
    JobStatus.FAILED: Phase.FAILED,
    JobStatus.CANCELLED: Phase.CANCELLED,
}


def phase_of(db: Snapshot, job: JobState | None) -> Phase:
    """The CR's phase: final states come from the database, the rest from the Job."""
    if db.status in _FINAL:
        return _FINAL[db.status]
    if job is None:
        return Phase.QUEUED
    if job.phase in (Phase.SUCCEEDED, Phase.FAILED):
        return Phase.RUNNING  # finished, but not yet settled
    if db.status == JobStatus.RUNNING and job.phase == Phase.PENDING:
        return Phase.RUNNING
    return job.phase


def explain(phase: Phase, state: JobState | None, db: Snapshot) -> tuple[str, str]:
    """The reason and sentence that go with ``phase`` in the status and its Event."""
    if phase == Phase.SUCCEEDED:
        return "Transcribed", (
            f"Transcribed {db.audio_seconds:.1f} s of audio; charged {db.charged_seconds} s."
        )
    if phase == Phase.FAILED:
        return "Failed", db.error_message or "The transcription failed; the credit was refunded."
    if phase == Phase.CANCELLED:
        return "Cancelled", (
            f"Cancelled; charged {db.charged_seconds or 0} s for the audio already transcribed."
            if db.charged_seconds
            else "Cancelled before any audio was transcribed; the credit was refunded."
        )
    if phase == Phase.RUNNING:
        return "Transcribing", "A transcriber pod is running."
    if state is None:
        return "Queued", "Waiting for a free transcriber slot."
    return state.reason, state.message


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    *,
    now: datetime,
    generation: int | None,
) -> list[dict[str, Any]]:
    """Conditions with ``type_`` set; its transition time moves only when its status changes."""
    value = "True" if status else "False"
    old = next((c for c in conditions if c.get("type") == type_), None)
    since = old["lastTransitionTime"] if old and old.get("status") == value else now
    new = Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    ).dump()
    return [c for c in conditions if c.get("type") != type_] + [new]


def cr_status(
    old: dict[str, Any],
    *,
    phase: Phase,
    reason: str,
    message: str,
    db: Snapshot | None,
    job_name: str | None,
    generation: int | None,
    now: datetime,
) -> dict[str, Any]:
    """The whole TranscriptionJob status for ``phase``, filled from the database snapshot."""
    conditions: list[dict[str, Any]] = list(old.get("conditions") or [])

    def cond(type_: str, status: bool, why: str, text: str = "") -> None:
        nonlocal conditions
        conditions = set_condition(
            conditions, type_, status, why, text, now=now, generation=generation
        )

    admitted = job_name is not None
    cond("Admitted", admitted, "JobCreated" if admitted else reason, "" if admitted else message)
    cond("Running", phase == Phase.RUNNING, reason if phase == Phase.RUNNING else phase.value)
    if phase.finished:
        cond("Succeeded", phase == Phase.SUCCEEDED, reason, message)
    status = TranscriptionJobStatus(
        phase=phase,
        conditions=[Condition.model_validate(c) for c in conditions],
        observed_generation=generation,
        job_name=job_name,
        message=message or None,
    )
    if db is not None:
        status.progress = round(db.progress, 4)
        status.started_at = db.started_at
        status.completed_at = db.completed_at
        status.audio_seconds = round(db.audio_seconds, 3)
        status.reserved_seconds = db.reserved_seconds
        status.charged_seconds = db.charged_seconds
        status.transcript_id = db.transcript_id
        if db.transcript_uris:
            status.transcript_uris = TranscriptUris.model_validate(db.transcript_uris)
    return status.dump()
