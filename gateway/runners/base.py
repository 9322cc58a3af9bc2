"""The interface the gateway uses to hand jobs to whatever runs them."""

from __future__ import annotations

from typing import Protocol


class JobRunner(Protocol):
    """Runs submitted jobs; jobs are durable in the database, the runner only schedules them."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def submit(self, job_id: str) -> None:
        """Hand over a committed job; raises ``ClusterUnavailable`` if it cannot be taken now."""
        ...

    def cancel(self, job_id: str) -> None: ...

    def readiness(self) -> str:
        """``ok`` when jobs can run, ``starting``, or ``error: <why>`` when they never will."""
        ...
