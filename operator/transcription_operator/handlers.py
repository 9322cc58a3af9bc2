"""The kopf handlers: thin glue between Kubernetes events, the lifecycle and the builders.

No money moves only on an event: kopf never retries ``on.event`` handlers, so the Job handler
just wakes the reconciler, whose level-based passes settle, refund and repair everything from
the database, the TranscriptionJobs and the Jobs. Every handler is safe to run twice (a restart
replays them). Status is written by the operator alone, through the status subresource.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from transcription import ledger
from transcription.db.models import CreditCode
from transcription.errors import Conflict, NotFound
from transcription.metrics import register_database_collector
from transcription.resources import (
    CC_PLURAL,
    GROUP,
    JOB_LABEL,
    TJ_PLURAL,
    VERSION,
    CreditCodeSpec,
    CreditCodeStatus,
    Phase,
    TranscriptionJobSpec,
    job_id_of,
)
from transcription.settings import OperatorSettings
from transcription_operator import builders, joblog, metrics
from transcription_operator.context import Context
from transcription_operator.reconcile import Reconciler
from transcription_operator.status import cr_status, snapshot

log = logging.getLogger(__name__)

CODE_REFRESH_INTERVAL = 30.0


def _ctx(memo: Any) -> Context:
    ctx: Context = memo.ctx
    return ctx


def _reconciler(memo: Any) -> Reconciler:
    reconciler: Reconciler = memo.reconciler
    return reconciler


@kopf.on.startup()
def serve_metrics(memo: kopf.Memo, **_: Any) -> None:
    """Serve Prometheus metrics on their own port when one is set; before ``start``, so an
    operator still waiting for its CRDs is seen not reconciling."""
    settings = OperatorSettings()
    try:
        memo.metrics_server = metrics.serve(
            settings.metrics_port, settings.metrics_host, settings.max_running_jobs
        )
    except OSError as exc:
        # Retrying cannot free the port: stop with the reason rather than run unobserved.
        raise kopf.PermanentError(
            f"Cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {exc}"
        ) from exc


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Keep kopf's bookkeeping in our annotations (a structural CRD would prune it from status)
    and start the reconciliation loop, whose first pass runs at once."""
    joblog.install()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.level = logging.WARNING
    # kopf would otherwise list namespaces and watch CRDs cluster-wide, which the chart's
    # namespaced RBAC does not grant (it stalls a minute, then falls back): it serves the
    # resources discovery finds at start, so the CRDs must be served before it goes on.
    settings.scanning.disabled = True
    ctx = await asyncio.to_thread(Context.build, OperatorSettings())
    await asyncio.to_thread(_require_crds, ctx)
    memo.unregister_collector = register_database_collector(ctx.db)
    reconciler = Reconciler(ctx)
    memo.ctx = ctx
    memo.reconciler = reconciler
    memo.reconcile_task = asyncio.create_task(reconciler.run(), name="reconcile")


def _require_crds(ctx: Context) -> None:
    try:
        served = {r.name for r in ctx.custom.get_api_resources(GROUP, VERSION).resources}
    except ApiException as exc:
        if exc.status != 404:
            raise
        served = set()
    missing = sorted({TJ_PLURAL, CC_PLURAL} - served)
    if missing:
        ctx.close()
        raise kopf.TemporaryError(
            f"The API server does not serve {', '.join(missing)} ({GROUP}/{VERSION}) yet: "
            "install the CRDs (crds/ or the chart); retrying.",
            delay=5,
        )


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    memo.reconcile_task.cancel()
    memo.unregister_collector()
    if memo.metrics_server is not None:
        memo.metrics_server.shutdown()
    _ctx(memo).close()


# --- TranscriptionJob ---------------------------------------------------------------------


def _reject(ctx: Context, body: kopf.Body, reason: str, message: str) -> kopf.PermanentError:
    status = cr_status(
        dict(body.get("status") or {}),
        phase=Phase.FAILED,
        reason=reason,
        message=message,
        db=None,
        job_name=None,
        generation=body.metadata.get("generation"),
        now=datetime.now(UTC),
    )
    ctx.patch_status(TJ_PLURAL, body.metadata["namespace"], body.metadata["name"], status)
    ctx.post_event(dict(body), reason, message, warning=True)
    return kopf.PermanentError(message)


@kopf.on.resume(GROUP, VERSION, TJ_PLURAL)
@kopf.on.create(GROUP, VERSION, TJ_PLURAL)
def accept(body: kopf.Body, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Validate a new TranscriptionJob against the database and queue it for admission."""
    ctx = _ctx(memo)
    phase = (body.get("status") or {}).get("phase")
    if phase and Phase(phase).finished:
        return
    job_id = job_id_of(name)
    if job_id is None:
        raise _reject(
            ctx, body, "InvalidName", f"{name!r} is not a transcription ID; the gateway names them."
        )
    try:
        spec = TranscriptionJobSpec.model_validate(dict(body.spec))
    except ValidationError as exc:
        ctx.lifecycle.fail(job_id, code="invalid_spec", message=str(exc))
        raise _reject(ctx, body, "InvalidSpec", f"The spec is invalid: {exc}") from None
    if spec.job_id != job_id:
        message = f"spec.jobId {spec.job_id!r} does not match the name {name!r}."
        ctx.lifecycle.fail(job_id, code="invalid_spec", message=message)
        raise _reject(ctx, body, "InvalidSpec", message)
    try:
        db_job = ctx.lifecycle.get(job_id)
    except NotFound:
        raise _reject(
            ctx,
            body,
            "UnknownJob",
            f"No submitted transcription {job_id}: TranscriptionJobs are created by the gateway, "
            "which stores the audio and reserves its credit.",
        ) from None
    if phase is None:
        status = cr_status(
            {},
            phase=Phase.QUEUED,
            reason="Queued",
            message="Waiting for a free transcriber slot.",
            db=snapshot(db_job, None),
            job_name=None,
            generation=body.metadata.get("generation"),
            now=datetime.now(UTC),
        )
        ctx.patch_status(TJ_PLURAL, body.metadata["namespace"], name, status)
        ctx.post_event(dict(body), "Queued", f"Accepted {db_job.audio_seconds:.1f} s of audio.")
    _reconciler(memo).wake()


@kopf.on.delete(GROUP, VERSION, TJ_PLURAL)
def cancel(body: kopf.Body, name: str, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """Deleting an unfinished TranscriptionJob cancels it under the credit rules and stops its
    Job; kopf retries this handler until it succeeds, and only then lets the object go."""
    ctx = _ctx(memo)
    assert namespace is not None  # TranscriptionJobs are namespaced
    job_id = job_id_of(name)
    if job_id is not None:
        if ctx.lifecycle.cancel(job_id) is not None:
            log.info(
                "cancelled %s: its TranscriptionJob was deleted", job_id, extra={"job_id": job_id}
            )
        else:
            # Already finished, perhaps by this handler before a crash cut its tidying short.
            with contextlib.suppress(NotFound):
                ctx.lifecycle.discard_leftovers(job_id)
    try:
        ctx.batch.delete_namespaced_job(
            builders.job_name(name), namespace, propagation_policy="Background"
        )
    except ApiException as exc:
        if exc.status != 404:
            raise
    _reconciler(memo).wake()


# --- the child Jobs -------------------------------------------------------------------------


@kopf.on.event("batch", "v1", "jobs", labels={JOB_LABEL: kopf.PRESENT})
def follow_job(memo: kopf.Memo, **_: Any) -> None:
    """A child Job changed: reconcile now rather than at the next tick."""
    _reconciler(memo).wake()


# --- CreditCode -----------------------------------------------------------------------------


def _code_id(uid: str) -> str:
    """The ledger ID of a CreditCode, fixed by its UID so a replayed mint finds the same code."""
    return ledger.CODE_ID_PREFIX + hashlib.sha256(uid.encode()).hexdigest()[:16]


def _secret_code(ctx: Context, body: kopf.Body, code_id: str) -> str:
    """The code in the CreditCode's Secret, creating the Secret with a fresh code if needed."""
    namespace = body.metadata["namespace"]
    fresh = ledger.generate_code()
    try:
        ctx.core.create_namespaced_secret(
            namespace,
            builders.code_secret(dict(body), fresh, code_id),  # type: ignore[arg-type]
        )
        return fresh
    except ApiException as exc:
        if exc.status != 409:
            raise
    secret = ctx.core.read_namespaced_secret(builders.secret_name(body.metadata["name"]), namespace)
    return base64.b64decode((secret.data or {})["code"]).decode()


def _code_status(record: CreditCode, secret: str, message: str, generation: Any) -> dict[str, Any]:
    return CreditCodeStatus(
        code_id=record.id,
        secret_name=secret,
        hint=record.hint,
        budget_seconds=record.budget_seconds,
        remaining_seconds=max(record.remaining_seconds, 0),
        reserved_seconds=record.reserved_seconds,
        spent_seconds=record.spent_seconds,
        uses=record.uses,
        max_uses=record.max_uses,
        state=record.state(),
        observed_generation=generation,
        message=message,
    ).dump()


@kopf.on.resume(GROUP, VERSION, CC_PLURAL)
@kopf.on.create(GROUP, VERSION, CC_PLURAL)
@kopf.on.update(GROUP, VERSION, CC_PLURAL, field="spec")
def reconcile_code(body: kopf.Body, uid: str, memo: kopf.Memo, **_: Any) -> None:
    """Mint the code on first sight; afterwards make the ledger match the spec."""
    ctx = _ctx(memo)
    try:
        spec = CreditCodeSpec.model_validate(dict(body.spec))
    except ValidationError as exc:
        ctx.post_event(dict(body), "InvalidSpec", str(exc), warning=True)
        raise kopf.PermanentError(f"The spec is invalid: {exc}") from None
    code_id = _code_id(uid)
    notes: list[str] = []
    with ctx.db.transaction() as session:
        try:
            record = ledger.get_code(session, code_id, for_update=True)
        except NotFound:
            code = _secret_code(ctx, body, code_id)
            record = ledger.issue_code(
                session,
                ctx.code_key,
                seconds=spec.seconds,
                max_uses=spec.max_uses,
                expires_at=spec.expires_at,
                label=spec.label,
                code=code,
                code_id=code_id,
            ).record
            notes.append(f"Minted a code worth {spec.seconds} s into its Secret.")
        # Level-based, so a replay after a restart adds nothing twice.
        try:
            if spec.seconds > record.budget_seconds:
                added = spec.seconds - record.budget_seconds
                record = ledger.top_up(session, code_id, added)
                notes.append(f"Topped up by {added} s.")
            elif spec.seconds < record.budget_seconds:
                notes.append(
                    f"spec.seconds cannot lower the budget below {record.budget_seconds} s; "
                    "budgets only grow."
                )
            if spec.max_uses != record.max_uses:
                ledger.set_max_uses(session, code_id, spec.max_uses)
        except Conflict as exc:  # revoked by an admin: no retry could ever apply the spec
            notes.append(exc.message)
        if spec.expires_at != record.expires_at:
            ledger.set_expiry(session, code_id, spec.expires_at)
        if spec.label != record.label:
            record.label = spec.label
        session.flush()
        session.refresh(record)
        status = _code_status(
            record,
            builders.secret_name(body.metadata["name"]),
            " ".join(notes) or "In sync with the ledger.",
            body.metadata.get("generation"),
        )
    ctx.patch_status(CC_PLURAL, body.metadata["namespace"], body.metadata["name"], status)
    for note in notes:
        ctx.post_event(dict(body), "Minted" if note.startswith("Minted") else "Updated", note)


@kopf.timer(GROUP, VERSION, CC_PLURAL, interval=CODE_REFRESH_INTERVAL, initial_delay=5)
def refresh_code(body: kopf.Body, uid: str, memo: kopf.Memo, **_: Any) -> None:
    """Keep the counters in the status current as jobs spend the code."""
    ctx = _ctx(memo)
    with ctx.db.transaction() as session:
        try:
            record = ledger.get_code(session, _code_id(uid))
        except NotFound:
            return
        old = dict(body.get("status") or {})
        status = _code_status(
            record,
            builders.secret_name(body.metadata["name"]),
            old.get("message") or "",
            old.get("observedGeneration"),
        )
    if {k: old.get(k) for k in status} != status:
        ctx.patch_status(CC_PLURAL, body.metadata["namespace"], body.metadata["name"], status)


@kopf.on.delete(GROUP, VERSION, CC_PLURAL)
def revoke_code(uid: str, memo: kopf.Memo, **_: Any) -> None:
    """Deleting a CreditCode revokes it; jobs it already pays for still finish."""
    ctx = _ctx(memo)
    with ctx.db.transaction() as session:
        try:
            ledger.revoke(session, _code_id(uid))
        except NotFound:
            return
