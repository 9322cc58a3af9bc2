"""The domain's closed sets of values: job and credit states, modes, engines, ledger entry kinds.

Each concept has one enum; the database stores its values and checks them.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


class CreditState(StrEnum):
    """Where a job's reservation stands: held until it resolves exactly once."""

    HELD = "held"
    SETTLED = "settled"
    RELEASED = "released"


class Mode(StrEnum):
    FAST = "fast"
    ACCURATE = "accurate"


class EngineKind(StrEnum):
    LOCAL = "local"
    OPENAI = "openai"


class CodeState(StrEnum):
    """Whether a credit code can start new jobs, and if not, why."""

    ACTIVE = "active"
    EXHAUSTED = "exhausted"
    EXPIRED = "expired"
    REVOKED = "revoked"


class EntryKind(StrEnum):
    """What a ledger row records; settle and release resolve a reservation, at most one per job."""

    ISSUE = "issue"
    TOP_UP = "top_up"
    RESERVE = "reserve"
    SETTLE = "settle"
    RELEASE = "release"


FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
UNFINISHED = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})
RESOLUTIONS = frozenset({EntryKind.SETTLE, EntryKind.RELEASE})

#: For each target status, the statuses a job may move to it from. A job may finish from
#: ``queued`` too: in the cluster a Job can end before the operator ever saw it running.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING}),
    JobStatus.RUNNING: frozenset({JobStatus.QUEUED}),
    JobStatus.SUCCEEDED: UNFINISHED,
    JobStatus.FAILED: UNFINISHED,
    JobStatus.CANCELLED: UNFINISHED,
}
