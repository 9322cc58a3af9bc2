"""Prometheus metrics of every component, and the helpers the domain moves them with.

Job and credit counters move only once the transaction that made the change has committed (see
``after_commit``), so a rolled-back transaction or a replayed no-op moves nothing and the
counters agree with the ledger. Gauges of what is in the database are read at scrape time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import and_, case, event, func, or_, select
from sqlalchemy.orm import Session, SessionTransaction

from transcription.db.models import CreditCode, Job, utcnow
from transcription.db.session import Database
from transcription.errors import KNOWN_CODES
from transcription.jobfiles import EngineUsage
from transcription.states import UNFINISHED, CodeState, EngineKind, JobStatus

log = logging.getLogger(__name__)

_DISTRIBUTION = "whisper-transcription-service"

HTTP_REQUESTS = Counter(
    "whisper_http_requests_total",
    "HTTP requests answered, by method, route template (other: no route matched) and status.",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "whisper_http_request_duration_seconds",
    "Seconds from a request's arrival to the end of its answer, an upload's transfer included.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
UPLOAD_BYTES = Counter(
    "whisper_upload_bytes_total", "Bytes of upload bodies received (multipart framing included)."
)
UPLOADS_IN_FLIGHT = Gauge("whisper_uploads_in_flight", "Uploads being received right now.")

JOBS_CREATED = Counter(
    "whisper_jobs_created_total", "Jobs accepted (credit reserved).", ["mode", "engine"]
)
JOBS_FINISHED = Counter(
    "whisper_jobs_finished_total",
    "Jobs that ended, by outcome (succeeded, failed, cancelled) and error code (none if none).",
    ["outcome", "error"],
)
QUEUE_WAIT = Histogram(
    "whisper_job_queue_wait_seconds",
    "Seconds from a job's creation to its first start.",
    ["mode"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
)
RUN_SECONDS = Histogram(
    "whisper_job_run_seconds",
    "Seconds from a succeeded job's (last) start to its end.",
    ["mode", "engine"],
    buckets=(1, 2.5, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
)
REALTIME_FACTOR = Histogram(
    "whisper_job_realtime_factor",
    "A succeeded job's run seconds per second of audio (below 1: faster than real time).",
    ["mode", "engine"],
    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5),
)
ATTEMPTS = Counter("whisper_job_attempts_total", "Job runs started, retries included.")
RETRIES = Counter(
    "whisper_job_retries_total", "Job runs started after the first (a worker or Job was lost)."
)

CREDIT_RESERVED = Counter(
    "whisper_credit_reserved_seconds_total", "Seconds of credit held by accepted jobs."
)
CREDIT_CHARGED = Counter(
    "whisper_credit_charged_seconds_total", "Seconds of credit charged by settled jobs."
)
CREDIT_REFUNDED = Counter(
    "whisper_credit_refunded_seconds_total",
    "Seconds of held credit given back: all of a failed or queued-cancelled job's, and what a "
    "settled job did not use.",
)

OPENAI_REQUESTS = Counter(
    "whisper_openai_requests_total",
    "HTTP requests to the OpenAI engine's server, by status (error: no answer).",
    ["status"],
)
OPENAI_RETRIES = Counter(
    "whisper_openai_retries_total", "Requests to the OpenAI engine's server that were retries."
)
OPENAI_BYTES_SENT = Counter(
    "whisper_openai_bytes_sent_total", "Bytes of request bodies sent to the OpenAI engine's server."
)
MODEL_LOAD = Histogram(
    "whisper_model_load_seconds",
    "Seconds a local Whisper model took to load.",
    ["engine"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
BUILD_INFO = Gauge("whisper_build_info", "Always 1; the version is a label.", ["version"])

try:
    BUILD_INFO.labels(version(_DISTRIBUTION)).set(1)
except PackageNotFoundError:  # running from a source tree that was never installed
    BUILD_INFO.labels("unknown").set(1)


# --- moving counters only after a commit -----------------------------------------------------

_PENDING = "whisper_metrics_pending"
Action = Callable[[], None]


def after_commit(session: Session, action: Action) -> None:
    """Run ``action`` once ``session``'s transaction commits; never if it rolls back."""
    session.info.setdefault(_PENDING, []).append(action)


@event.listens_for(Session, "after_commit")
def _apply_pending(session: Session) -> None:
    for action in session.info.pop(_PENDING, ()):
        try:
            action()
        except Exception:
            # The transaction is committed: a metric must not make its caller think it failed.
            log.exception("could not update a metric")


@event.listens_for(Session, "after_transaction_end")
def _drop_pending(session: Session, transaction: SessionTransaction) -> None:
    # after_commit has emptied the list of a committed transaction; what is left was rolled back.
    if transaction.parent is None:
        session.info.pop(_PENDING, None)


def job_created(session: Session, job: Job) -> None:
    mode, engine = str(job.mode), str(job.engine)
    after_commit(session, lambda: JOBS_CREATED.labels(mode, engine).inc())


def job_started(session: Session, job: Job) -> None:
    """A queued job went running: its first start observes how long it waited."""
    if job.attempts <= 1 and job.started_at is not None:
        mode, wait = str(job.mode), max((job.started_at - job.created_at).total_seconds(), 0.0)
        after_commit(session, lambda: QUEUE_WAIT.labels(mode).observe(wait))


def attempt_started(session: Session, attempts: int) -> None:
    """One more run of a job began; ``attempts`` is its count including this one."""

    def count() -> None:
        ATTEMPTS.inc()
        if attempts > 1:
            RETRIES.inc()

    after_commit(session, count)


def error_label(code: str | None) -> str:
    """A job's error code as a label: ``other`` for a code the project does not give, since in
    the cluster it may come from a transcriber pod's record."""
    if code is None:
        return "none"
    return code if code in KNOWN_CODES else "other"


def job_finished(session: Session, job: Job) -> None:
    """A job reached a final status; a succeeded one observes its run time and speed."""
    outcome, error = str(job.status), error_label(job.error_code)
    mode, engine = str(job.mode), str(job.engine)
    run: float | None = None
    if job.status == JobStatus.SUCCEEDED and job.started_at and job.completed_at:
        run = max((job.completed_at - job.started_at).total_seconds(), 0.0)
    audio = job.audio_seconds

    def count() -> None:
        JOBS_FINISHED.labels(outcome, error).inc()
        if run is not None:
            RUN_SECONDS.labels(mode, engine).observe(run)
            if audio > 0:
                REALTIME_FACTOR.labels(mode, engine).observe(run / audio)

    after_commit(session, count)


def credit_reserved(session: Session, seconds: int) -> None:
    after_commit(session, lambda: CREDIT_RESERVED.inc(seconds))


def credit_resolved(session: Session, *, reserved: int, charged: int) -> None:
    """A reservation of ``reserved`` seconds was settled for ``charged`` (0: released)."""

    def count() -> None:
        CREDIT_CHARGED.inc(charged)
        CREDIT_REFUNDED.inc(reserved - charged)

    after_commit(session, count)


# --- engine metrics carried from the transcriber pods to the operator ----------------------

_ENGINE_FAMILIES = (OPENAI_REQUESTS, OPENAI_RETRIES, OPENAI_BYTES_SENT, MODEL_LOAD)


def _engine_totals() -> dict[tuple[str, str], float]:
    """This process's engine counters so far, by sample name and status."""
    totals: dict[tuple[str, str], float] = {}
    for metric in _ENGINE_FAMILIES:
        for family in metric.collect():
            for sample in family.samples:
                if sample.name.endswith(("_total", "_sum", "_count")):
                    key = (sample.name, sample.labels.get("status", ""))
                    totals[key] = totals.get(key, 0.0) + sample.value
    return totals


class EngineMeter:
    """What the engines of this process do from its creation on: a transcriber pod reports it
    in its records, since nobody scrapes the pod."""

    def __init__(self) -> None:
        self.start = _engine_totals()

    def usage(self) -> EngineUsage:
        done = {key: value - self.start.get(key, 0.0) for key, value in _engine_totals().items()}

        def total(name: str) -> float:
            return sum(value for (sample, _), value in done.items() if sample == name)

        # Through plus(), which holds each figure to the record's caps: a record over them
        # would be dropped.
        return EngineUsage().plus(
            EngineUsage.model_construct(
                openai_requests={
                    status: round(value)
                    for (sample, status), value in done.items()
                    if sample == "whisper_openai_requests_total" and value > 0
                },
                openai_retries=round(total("whisper_openai_retries_total")),
                openai_bytes_sent=round(total("whisper_openai_bytes_sent_total")),
                model_loads=round(total("whisper_model_load_seconds_count")),
                model_load_seconds=total("whisper_model_load_seconds_sum"),
            )
        )


def engine_used(usage: EngineUsage) -> None:
    """Add what a job's transcriber pods reported their engine did to this process's engine
    metrics; the caller counts each job once, when its final transition has committed."""
    for status, count in usage.openai_requests.items():
        OPENAI_REQUESTS.labels(status).inc(count)
    OPENAI_RETRIES.inc(usage.openai_retries)
    OPENAI_BYTES_SENT.inc(usage.openai_bytes_sent)
    # Only the local engine loads a model; a record's loads are its pod's, one per mode at most.
    for _ in range(usage.model_loads):
        MODEL_LOAD.labels(EngineKind.LOCAL.value).observe(
            usage.model_load_seconds / usage.model_loads
        )


# --- gauges read from the database at scrape time --------------------------------------------


class DatabaseCollector(Collector):
    """``whisper_jobs{status}`` and ``whisper_codes{state}``, counted in the database at each
    scrape (two small GROUP BY queries), so every replica reports the same numbers."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def describe(self) -> Iterable[Metric]:
        # Declared, so registering does not query the database.
        return [_jobs_family(), _codes_family()]

    def collect(self) -> Iterable[Metric]:
        try:
            jobs, codes = self._counts()
        except Exception:
            # A scrape must still deliver the other metrics while the database is unreachable.
            log.warning("could not count jobs and codes for the metrics", exc_info=True)
            return []
        jobs_family, codes_family = _jobs_family(), _codes_family()
        for status in sorted(UNFINISHED):
            jobs_family.add_metric([status.value], jobs.get(status.value, 0))
        for state in CodeState:
            codes_family.add_metric([state.value], codes.get(state.value, 0))
        return [jobs_family, codes_family]

    def _counts(self) -> tuple[dict[str, int], dict[str, int]]:
        now = utcnow()
        remaining = (
            CreditCode.budget_seconds - CreditCode.spent_seconds - CreditCode.reserved_seconds
        )
        # The same order of checks as CreditCode.state().
        state = case(
            (CreditCode.revoked_at.is_not(None), CodeState.REVOKED.value),
            (
                and_(CreditCode.expires_at.is_not(None), CreditCode.expires_at <= now),
                CodeState.EXPIRED.value,
            ),
            (
                or_(CreditCode.uses >= CreditCode.max_uses, remaining <= 0),
                CodeState.EXHAUSTED.value,
            ),
            else_=CodeState.ACTIVE.value,
        ).label("state")
        # Grouped in an outer query: PostgreSQL would not see the CASE in GROUP BY, with its
        # own bound parameters, as the one selected.
        states = select(state).subquery()
        with self.db.read() as session:
            jobs = session.execute(
                select(Job.status, func.count())
                .where(Job.status.in_(sorted(UNFINISHED)))
                .group_by(Job.status)
            ).all()
            codes = session.execute(
                select(states.c.state, func.count()).group_by(states.c.state)
            ).all()
        return (
            {str(status): count for status, count in jobs},
            {str(name): count for name, count in codes},
        )


def _jobs_family() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "whisper_jobs", "Jobs queued or running now, from the database.", labels=["status"]
    )


def _codes_family() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "whisper_codes",
        "Credit codes by state (active, exhausted, expired, revoked), from the database.",
        labels=["state"],
    )


_collectors: dict[CollectorRegistry, DatabaseCollector] = {}
_collectors_lock = threading.Lock()


def register_database_collector(
    db: Database, registry: CollectorRegistry = REGISTRY
) -> Callable[[], None]:
    """Report ``db``'s jobs and codes from ``registry``, replacing the database registered
    before (a process with several apps, as in tests, reports its latest); returns the function
    that unregisters it, a no-op once another has replaced it."""
    collector = DatabaseCollector(db)
    with _collectors_lock:
        previous = _collectors.pop(registry, None)
        if previous is not None:
            registry.unregister(previous)
        registry.register(collector)
        _collectors[registry] = collector

    def unregister() -> None:
        with _collectors_lock:
            if _collectors.get(registry) is collector:
                registry.unregister(collector)
                del _collectors[registry]

    return unregister
