"""Level-based reconciliation: the database, the TranscriptionJobs and their Jobs compared and
brought in line, on a timer, at start and whenever a handler wakes it.

The database is the truth for jobs and money. Each pass: a database job with no
TranscriptionJob gets one; a Job that ended is settled (or refunded) from its result record; a
Job that vanished is finished from its result record, or created again while attempts remain,
else the job fails and is refunded; running jobs' progress is copied to the database and the
status; final states reach the status. Then at most ``max_running_jobs`` queued
TranscriptionJobs are admitted, in submission order. One loop makes every decision, so two never
race; a failed step is retried with backoff on later passes, never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from transcription import resources
from transcription.db.models import Job
from transcription.jobfiles import EngineUsage, RunRequest, RunResult
from transcription.logs import job_context
from transcription.metrics import engine_used
from transcription.resources import Phase, TranscriptionJobSpec, job_id_of
from transcription.states import JobStatus
from transcription_operator import builders, metrics
from transcription_operator.context import Context
from transcription_operator.status import (
    JobState,
    cr_status,
    explain,
    job_state,
    phase_of,
    snapshot,
    termination,
)

log = logging.getLogger(__name__)

#: The longest wait between retries of a job (or a whole pass) that keeps failing.
MAX_BACKOFF = 300.0
#: How long a TranscriptionJob the operator has not accepted yet (its create handler has not
#: run) holds back later submissions, so admission stays first come, first served; one that
#: stays unaccepted longer stops holding the queue up.
ACCEPT_GRACE_SECONDS = 10.0


@dataclass
class Backoff:
    """Exponential backoff per key: a failing step waits longer each time, and is never dropped."""

    base: float
    failures: dict[str, int] = field(default_factory=dict)
    not_before: dict[str, float] = field(default_factory=dict)

    def due(self, key: str) -> bool:
        return time.monotonic() >= self.not_before.get(key, 0.0)

    def failed(self, key: str) -> float:
        count = self.failures[key] = self.failures.get(key, 0) + 1
        delay = min(self.base * 2 ** (count - 1), MAX_BACKOFF)
        self.not_before[key] = time.monotonic() + delay
        return delay

    def succeeded(self, key: str) -> None:
        self.failures.pop(key, None)
        self.not_before.pop(key, None)


@dataclass(frozen=True)
class World:
    """What one pass sees: unfinished database jobs, TranscriptionJobs and child Jobs."""

    db_jobs: dict[str, Job]
    tjs: dict[str, dict[str, Any]]
    jobs: dict[str, dict[str, Any]]

    def job_of(self, tj: dict[str, Any]) -> dict[str, Any] | None:
        return self.jobs.get(tj["metadata"]["name"])


def observe(ctx: Context) -> World:
    ns = ctx.settings.namespace
    # Raw JSON, not the client's models: a pass reads every Job and TranscriptionJob.
    jobs: Any
    tjs: Any
    if ns:
        jobs = ctx.batch.list_namespaced_job(
            ns, label_selector=resources.JOB_LABEL, _preload_content=False
        )
        tjs = ctx.custom.list_namespaced_custom_object(
            resources.GROUP, resources.VERSION, ns, resources.TJ_PLURAL
        )
    else:
        jobs = ctx.batch.list_job_for_all_namespaces(
            label_selector=resources.JOB_LABEL, _preload_content=False
        )
        tjs = ctx.custom.list_cluster_custom_object(
            resources.GROUP, resources.VERSION, resources.TJ_PLURAL
        )
    by_job_id = {}
    for tj in tjs["items"]:
        job_id = job_id_of(tj["metadata"]["name"])
        if job_id is not None:
            by_job_id[job_id] = tj
    children = {}
    for job in json.loads(jobs.data)["items"]:
        owner = (job["metadata"].get("labels") or {}).get(resources.JOB_LABEL)
        if owner:
            children[owner] = job
    return World(
        db_jobs={job.id: job for job in ctx.lifecycle.unfinished()}, tjs=by_job_id, jobs=children
    )


def reconcile_pass(ctx: Context, backoff: Backoff) -> World:
    """One full comparison of the three views, each job repaired on its own."""
    world = observe(ctx)
    for job_id, db_job in world.db_jobs.items():
        _guarded(backoff, job_id, reconcile_job, ctx, world, db_job)
    for job_id, tj in world.tjs.items():
        phase = (tj.get("status") or {}).get("phase")
        if job_id not in world.db_jobs and phase and not Phase(phase).finished:
            # Finished in the database (cancelled, or settled before a crash cut the status).
            _guarded(backoff, job_id, conclude, ctx, tj, world.job_of(tj))
    admit, repair, waiting = select(
        list(world.tjs.values()), list(world.jobs.values()), ctx.settings
    )
    metrics.admission(
        waiting=len(waiting),
        running=sum(1 for j in world.jobs.values() if not job_state(j).phase.finished),
    )
    for tj in repair:
        _guarded(backoff, tj["metadata"]["name"], admit_one, ctx, tj, False)
    for tj in admit:
        _guarded(backoff, tj["metadata"]["name"], admit_one, ctx, tj, True)
    return world


def _guarded(backoff: Backoff, key: str, step: Any, *args: Any) -> None:
    if not backoff.due(key):
        return
    # The key is a job's ID or its TranscriptionJob's name: either way, the step's lines say
    # which job they are about.
    with job_context(job_id_of(key) or key):
        try:
            step(*args)
        except Exception:
            delay = backoff.failed(key)
            metrics.step_failed()
            log.warning("reconciling %s failed; retrying in %.0f s", key, delay, exc_info=True)
        else:
            backoff.succeeded(key)


def reconcile_job(ctx: Context, world: World, db_job: Job) -> None:
    """Bring one unfinished job's TranscriptionJob, Job and database row in line."""
    tj = world.tjs.get(db_job.id)
    if tj is None:
        create_tj(ctx, db_job)
        return
    if tj["metadata"].get("deletionTimestamp"):
        return  # the finalizer cancels it
    job = world.job_of(tj)
    changed = False
    if job is not None:
        state = job_state(job)
        if state.phase.finished:
            if settle(ctx, db_job, tj, job, state) is not None:
                metrics.settled(job)
            changed = True
        elif state.phase == Phase.RUNNING:
            changed = ctx.lifecycle.start(db_job.id) is not None
            changed = copy_progress(ctx, db_job) or changed
    elif (tj.get("status") or {}).get("jobName"):
        replace_vanished_job(ctx, db_job, tj)
        changed = True
    publish(ctx, tj, job, None if changed else db_job)


def create_tj(ctx: Context, db_job: Job) -> None:
    """The TranscriptionJob the gateway did not get to create (it failed or died after commit)."""
    body = resources.transcription_job(
        job_id=db_job.id,
        namespace=ctx.settings.jobs_namespace,
        spec=TranscriptionJobSpec.of(db_job),
        submitted_at=db_job.created_at,
    )
    try:
        ctx.custom.create_namespaced_custom_object(
            resources.GROUP,
            resources.VERSION,
            ctx.settings.jobs_namespace,
            resources.TJ_PLURAL,
            body,
        )
    except ApiException as exc:
        if exc.status != 409:
            raise
    else:
        log.info("created the missing TranscriptionJob of %s", db_job.id)


def settle(
    ctx: Context, db_job: Job, tj: dict[str, Any], job: dict[str, Any], state: JobState
) -> Job | None:
    """Finish the job of a Job that ended: the result record decides, else the Job's state.
    The finished job, or None when it had already finished."""
    result = ctx.files.read_result(db_job.id)
    if result is not None:
        return finish_with(ctx, db_job, result)
    # Read before failing the job: that tidies its working files away.
    usage = ctx.files.read_engine_usage(db_job.id)
    return _counted(fail_unrecorded(ctx, db_job, tj, job, state), usage)


def fail_unrecorded(
    ctx: Context, db_job: Job, tj: dict[str, Any], job: dict[str, Any], state: JobState
) -> Job | None:
    """Fail the job of a Job that ended without a result record, saying why as best the pods
    tell; None when it had already finished."""
    ended = termination(_pods(ctx, tj["metadata"]["namespace"], job))
    detail = f" Last error: {ended.error_message}" if ended and ended.error_message else ""
    if ended is not None and ended.outcome == "rejected" and ended.error_code:
        # The result record is lost, but the pod said why it refused the audio.
        return ctx.lifecycle.fail(
            db_job.id, code=ended.error_code, message=ended.error_message or "Audio rejected."
        )
    if state.phase == Phase.SUCCEEDED:
        return ctx.lifecycle.fail(
            db_job.id,
            code="transcript_missing",
            message=f"The transcriber finished without leaving a result.{detail} "
            "The credit was refunded.",
        )
    return ctx.lifecycle.fail(
        db_job.id,
        code="transcription_failed",
        message=f"The transcriber Job failed ({state.reason}: "
        f"{state.message or 'no message'}).{detail} The credit was refunded.",
    )


def finish_with(ctx: Context, db_job: Job, result: RunResult) -> Job | None:
    if result.outcome == "transcribed":
        return _counted(ctx.lifecycle.finish(db_job.id, result), result.engine_usage)
    error = result.error
    failed = ctx.lifecycle.fail(
        db_job.id,
        code=error.code if error else "audio_rejected",
        message=error.message if error else "The audio was rejected.",
    )
    return _counted(failed, result.engine_usage)


def _counted(finished: Job | None, usage: EngineUsage | None) -> Job | None:
    """Add what the job's pods said their engine did to the engine metrics, once: only when
    this call's final transition committed (``finished``), never when replayed."""
    if finished is not None and usage is not None:
        engine_used(usage)
    return finished


def replace_vanished_job(ctx: Context, db_job: Job, tj: dict[str, Any]) -> None:
    """A Job that was created is gone (its TTL passed while the operator was down, or someone
    deleted it): finish from its result record, or run it again while attempts remain."""
    result = ctx.files.read_result(db_job.id)
    if result is not None:
        finish_with(ctx, db_job, result)
        return
    if db_job.attempts >= ctx.settings.max_attempts:
        fail_lost(ctx, db_job)
        return
    queued = {
        "phase": Phase.QUEUED.value,
        "jobName": None,
        "message": "The Job disappeared; queued to run again.",
    }
    if ctx.patch_tj_status(tj, queued):
        ctx.post_event(tj, "JobLost", "The Job disappeared; queued to run again.", warning=True)
        tj["status"] = {**(tj.get("status") or {}), **queued}


def fail_lost(ctx: Context, db_job: Job) -> None:
    usage = ctx.files.read_engine_usage(db_job.id)
    failed = ctx.lifecycle.fail(
        db_job.id,
        code="job_lost",
        message=f"The transcriber Job disappeared {db_job.attempts} times before finishing; "
        "the credit was refunded.",
    )
    _counted(failed, usage)


def copy_progress(ctx: Context, db_job: Job) -> bool:
    progress = ctx.files.read_progress(db_job.id)
    if progress is not None and progress.fraction > db_job.progress:
        return ctx.lifecycle.progress(db_job.id, progress.fraction)
    return False


def conclude(ctx: Context, tj: dict[str, Any], job: dict[str, Any] | None) -> None:
    """A job finished in the database whose status does not say so yet: the pass that finished
    it may have died between its commit and the tidying, so tidy (again), then publish."""
    job_id = job_id_of(tj["metadata"]["name"])
    assert job_id is not None
    db_job = ctx.lifecycle.get(job_id)
    if JobStatus(db_job.status).finished:
        ctx.lifecycle.tidy(db_job)
    publish(ctx, tj, job)


def publish(
    ctx: Context, tj: dict[str, Any], job: dict[str, Any] | None, db_job: Job | None = None
) -> None:
    """Write the status the database and the Job imply, if it differs from the one there;
    ``db_job`` is the row when it is known to be current (an unfinished job has no transcript)."""
    meta = tj["metadata"]
    job_id = job_id_of(meta["name"])
    assert job_id is not None
    if db_job is not None:
        db = snapshot(db_job, None)
    else:
        db = snapshot(ctx.lifecycle.get(job_id), ctx.lifecycle.transcript(job_id))
    state = job_state(job) if job is not None else None
    old = tj.get("status") or {}
    phase = phase_of(db, state)
    if phase == Phase.QUEUED and old.get("phase") == Phase.PENDING and job is None:
        phase = Phase.PENDING  # admitted a moment ago; the Job list predates it
    reason, message = explain(phase, state, db)
    new = cr_status(
        old,
        phase=phase,
        reason=reason,
        message=message,
        db=db,
        job_name=job["metadata"]["name"] if job is not None else old.get("jobName"),
        generation=meta.get("generation"),
        now=datetime.now(UTC),
    )
    if new == old:
        return
    if ctx.patch_tj_status(tj, new):
        if old.get("phase") != phase:
            ctx.post_event(tj, reason, message, warning=phase == Phase.FAILED)
        if phase.finished and job is not None and not job_state(job).phase.finished:
            _delete_job(ctx, job)


def _delete_job(ctx: Context, job: dict[str, Any]) -> None:
    """Stop the compute of a job that ended without its Job (cancelled)."""
    try:
        ctx.batch.delete_namespaced_job(
            job["metadata"]["name"], job["metadata"]["namespace"], propagation_policy="Background"
        )
    except ApiException as exc:
        if exc.status != 404:
            raise


def _pods(ctx: Context, namespace: str, job: dict[str, Any]) -> list[dict[str, Any]]:
    selector = f"{resources.JOB_LABEL}={job['metadata']['labels'][resources.JOB_LABEL]}"
    pods = ctx.core.list_namespaced_pod(namespace, label_selector=selector)
    found: list[dict[str, Any]] = ctx.core.api_client.sanitize_for_serialization(pods.items)
    return found


# --- admission ---------------------------------------------------------------------------


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def queue_key(tj: dict[str, Any]) -> tuple[datetime, str]:
    """Submission order: the gateway's microsecond stamp, else the creation time; then name."""
    meta = tj["metadata"]
    stamp = (meta.get("annotations") or {}).get(resources.SUBMITTED_AT)
    when = stamp or meta.get("creationTimestamp") or "1970-01-01T00:00:00Z"
    moment = _time(when)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC), meta["name"])


def select(
    tjs: list[dict[str, Any]],
    jobs: list[dict[str, Any]],
    settings: Any,
    now: datetime | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Which queued TranscriptionJobs to admit now, in order; which already have a Job
    (created before a restart cut the status write short) and only need their status fixed;
    and every one waiting for a slot, those admitted now included.

    kopf accepts new TranscriptionJobs concurrently, so a later submission can be Queued before
    an earlier one: none is admitted past an earlier one still unaccepted (for a short grace)."""
    children = {(j["metadata"]["namespace"], j["metadata"]["name"]) for j in jobs}
    queued = [
        tj
        for tj in tjs
        if (tj.get("status") or {}).get("phase") == Phase.QUEUED
        and not tj["metadata"].get("deletionTimestamp")
    ]
    has_job = [
        tj
        for tj in queued
        if (tj["metadata"]["namespace"], builders.job_name(tj["metadata"]["name"])) in children
    ]
    waiting = sorted((tj for tj in queued if tj not in has_job), key=queue_key)
    busy = sum(1 for j in jobs if not job_state(j).phase.finished)
    cap = settings.max_running_jobs
    free = len(waiting) if cap == 0 else max(cap - busy, 0)
    grace_start = (now or datetime.now(UTC)).timestamp() - ACCEPT_GRACE_SECONDS
    unaccepted = [
        queue_key(tj)
        for tj in tjs
        if not (tj.get("status") or {}).get("phase")
        and not tj["metadata"].get("deletionTimestamp")
        and queue_key(tj)[0].timestamp() > grace_start
    ]
    if unaccepted:
        first = min(unaccepted)
        free = min(free, sum(1 for tj in waiting if queue_key(tj) < first))
    return waiting[:free], has_job, waiting


def admit_one(ctx: Context, tj: dict[str, Any], new: bool = True) -> None:
    """Create the TranscriptionJob's Job (an existing one counts as created) and report it;
    ``new`` when the pass saw no Job for it.

    No Job is created once the job's attempts are used up: a ``new`` one fails instead, since
    its earlier Jobs all vanished, some perhaps before the status named them (a status write
    lost to a conflict, a re-created TranscriptionJob) so ``replace_vanished_job`` never saw
    them go; for one whose Job was seen, only the status is written (if that Job vanished since,
    the next pass sees it gone)."""
    meta = tj["metadata"]
    job_id = job_id_of(meta["name"])
    assert job_id is not None  # only accepted TranscriptionJobs are ever Queued
    db_job = ctx.lifecycle.get(job_id)
    if JobStatus(db_job.status).finished:
        publish(ctx, tj, None, None)
        return
    exhausted = db_job.attempts >= ctx.settings.max_attempts
    if new and exhausted:
        fail_lost(ctx, db_job)
        return
    spec = TranscriptionJobSpec.model_validate(tj["spec"])
    manifest = builders.transcriber_job(tj, RunRequest.of(db_job), spec, ctx.settings)
    if not exhausted:
        try:
            ctx.batch.create_namespaced_job(meta["namespace"], manifest)  # type: ignore[arg-type]
        except ApiException as exc:
            if exc.status != 409:
                raise
        else:
            ctx.lifecycle.begin_attempt(job_id)
            # Told whatever becomes of the status write below: a lost write (kopf's own
            # annotations moved the object on) must not lose the news that the Job exists.
            ctx.post_event(tj, "Admitted", f"Created Job {manifest['metadata']['name']}.")
    status = cr_status(
        tj.get("status") or {},
        phase=Phase.PENDING,
        reason="JobCreated",
        message="Admitted; waiting for a transcriber pod to start.",
        db=snapshot(db_job, None),
        job_name=manifest["metadata"]["name"],
        generation=meta.get("generation"),
        now=datetime.now(UTC),
    )
    # Only over the Queued version listed: newer news about the Job must not be overwritten.
    ctx.patch_tj_status(tj, status)


class Reconciler:
    """The single reconciliation loop; ``wake`` is safe to call from handler threads."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.backoff = Backoff(base=min(ctx.settings.reconcile_interval, 5.0))
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        interval = self.ctx.settings.reconcile_interval
        failures = 0
        while True:
            self._wakeup.clear()
            try:
                await asyncio.to_thread(reconcile_pass, self.ctx, self.backoff)
                failures = 0
            except Exception:
                # The cluster or the database is unreachable: back off, never give up.
                failures += 1
                log.exception("reconciliation pass failed (%s in a row)", failures)
            metrics.reconciled(ok=not failures)
            wait = min(interval * 2 ** min(failures, 6), MAX_BACKOFF) if failures else interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), wait)
