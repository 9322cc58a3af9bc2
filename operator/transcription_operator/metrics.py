"""The operator's Prometheus metrics: its reconciliation loop, admission and settlement.

They are served by prometheus_client on a port of their own (``WHISPER_METRICS_PORT``), next to
the domain's job and credit metrics, which move here too: the operator finishes cluster jobs.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

RECONCILE_PASSES = Counter(
    "whisper_operator_reconcile_passes", "Reconciliation passes run, failed ones included."
)
RECONCILE_ERRORS = Counter(
    "whisper_operator_reconcile_errors",
    "Failed reconciliation passes, and failed steps of one job within a pass; each is retried "
    "with backoff.",
)
LAST_RECONCILE = Gauge(
    "whisper_operator_last_reconcile_timestamp_seconds",
    "Unix time at which the last successful reconciliation pass ended.",
)
ADMISSION_QUEUE = Gauge(
    "whisper_operator_admission_queue",
    "Queued TranscriptionJobs waiting for a free transcriber slot, as the last pass saw them.",
)
ADMISSION_CAP = Gauge(
    "whisper_operator_admission_cap", "Transcriber Jobs allowed to run at once (0: no cap)."
)
JOBS_RUNNING = Gauge(
    "whisper_operator_jobs_running",
    "Transcriber Jobs created and not yet finished, as the last pass saw them.",
)
SETTLEMENT_LAG = Histogram(
    "whisper_operator_settlement_lag_seconds",
    "Seconds from a transcriber Job's end to the operator finishing its job and settling "
    "its credit.",
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600),
)

#: The Job conditions that end it; job_state() reads the same ones.
_ENDING = {"Complete", "SuccessCriteriaMet", "Failed", "FailureTarget"}


def serve(port: int, host: str, cap: int) -> WSGIServer | None:
    """Serve the default registry on ``host:port`` from a thread of its own; None when
    ``port`` is 0 (metrics off)."""
    ADMISSION_CAP.set(cap)
    if not port:
        return None
    server, _ = start_http_server(port, addr=host)
    log.info("serving metrics on http://%s:%s/metrics", host, port)
    return server


def reconciled(ok: bool) -> None:
    """One pass of the loop ended."""
    RECONCILE_PASSES.inc()
    if ok:
        LAST_RECONCILE.set_to_current_time()
    else:
        RECONCILE_ERRORS.inc()


def step_failed() -> None:
    RECONCILE_ERRORS.inc()


def admission(*, waiting: int, running: int) -> None:
    ADMISSION_QUEUE.set(waiting)
    JOBS_RUNNING.set(running)


def settled(job: dict[str, Any]) -> None:
    """The job of ``job``, a Job that ended, has just been finished and its credit settled."""
    ended = ended_at(job)
    if ended is not None:
        # The API server's clock and ours may differ by a little: never a negative lag.
        SETTLEMENT_LAG.observe(max(time.time() - ended.timestamp(), 0.0))


def ended_at(job: dict[str, Any]) -> datetime | None:
    """When the Job controller decided the Job had ended: its earliest ending condition."""
    status = job.get("status") or {}
    times = [
        condition["lastTransitionTime"]
        for condition in status.get("conditions") or []
        if condition.get("type") in _ENDING
        and condition.get("status") == "True"
        and condition.get("lastTransitionTime")
    ]
    stamp = min(times, key=_parse, default=None) or status.get("completionTime")
    return _parse(stamp) if stamp else None


def _parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
