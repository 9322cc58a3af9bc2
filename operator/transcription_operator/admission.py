"""Admission: at most ``max_running_jobs`` transcriber Jobs at once, the rest Queued in order.

One loop makes every admission decision, so two decisions never race for the last slot. It
runs when a handler wakes it (a job was queued or finished) and every ``admission_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from transcription import resources
from transcription.resources import Phase, TranscriptionJobSpec
from transcription_operator import builders
from transcription_operator.context import TJ_PLURAL, Context
from transcription_operator.status import cr_status, job_state, snapshot

log = logging.getLogger(__name__)


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def queue_key(tj: dict[str, Any]) -> tuple[datetime, str]:
    """Submission order: the gateway's microsecond stamp, else the creation time; then name."""
    meta = tj["metadata"]
    stamp = (meta.get("annotations") or {}).get(resources.SUBMITTED_AT)
    when = stamp or meta.get("creationTimestamp") or "1970-01-01T00:00:00Z"
    moment = _time(when)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC), meta["name"])


def running(job: dict[str, Any]) -> bool:
    return not job_state(job).phase.finished


def select(
    tjs: list[dict[str, Any]], jobs: list[dict[str, Any]], cap: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Which queued TranscriptionJobs to admit now, in order, and which already have a Job
    (created before a restart cut the status write short) and only need their status fixed."""
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
    busy = sum(1 for j in jobs if running(j))
    free = len(waiting) if cap == 0 else max(cap - busy, 0)
    return waiting[:free], has_job


def admission_pass(ctx: Context) -> int:
    """Create Jobs for as many queued TranscriptionJobs as there are free slots; return how many."""
    ns = ctx.settings.namespace
    # Raw JSON, not the client's models: a pass reads every Job and TranscriptionJob.
    jobs: Any
    tjs: Any
    if ns:
        jobs = ctx.batch.list_namespaced_job(
            ns, label_selector=resources.JOB_LABEL, _preload_content=False
        )
        tjs = ctx.custom.list_namespaced_custom_object(
            resources.GROUP, resources.VERSION, ns, TJ_PLURAL
        )
    else:
        jobs = ctx.batch.list_job_for_all_namespaces(
            label_selector=resources.JOB_LABEL, _preload_content=False
        )
        tjs = ctx.custom.list_cluster_custom_object(resources.GROUP, resources.VERSION, TJ_PLURAL)
    job_dicts = json.loads(jobs.data)["items"]
    admit, repair = select(tjs["items"], job_dicts, ctx.settings.max_running_jobs)
    for tj in repair + admit:
        admit_one(ctx, tj)
    return len(admit)


def admit_one(ctx: Context, tj: dict[str, Any]) -> None:
    """Create the TranscriptionJob's Job (an existing one counts as created) and report it."""
    meta = tj["metadata"]
    job_id = resources.job_id_of(meta["name"])
    assert job_id is not None  # only accepted TranscriptionJobs are ever Queued
    spec = TranscriptionJobSpec.model_validate(tj["spec"])
    manifest = builders.transcriber_job(tj, job_id, spec, ctx.settings)
    try:
        ctx.batch.create_namespaced_job(meta["namespace"], manifest)  # type: ignore[arg-type]
    except ApiException as exc:
        if exc.status != 409:
            raise
    db_job = ctx.lifecycle.get(job_id)
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
    # Only over the Queued version listed: if the Job's handler already reported the Job
    # running, this older news must not overwrite it.
    if ctx.patch_status(
        TJ_PLURAL, meta["namespace"], meta["name"], status, resource_version=meta["resourceVersion"]
    ):
        ctx.post_event(tj, "Admitted", f"Created Job {manifest['metadata']['name']}.")


class Admission:
    """The single admission loop; ``wake`` is safe to call from handler threads."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.ctx.settings.admission_interval)
            self._wakeup.clear()
            try:
                await asyncio.to_thread(admission_pass, self.ctx)
            except Exception:
                # The next wake-up or interval retries; admission must outlive a bad pass.
                log.exception("admission pass failed")
