"""Turning an uploaded mp3 into a queued job, shared by ``/v1/transcriptions`` and the
OpenAI-compatible ``/v1/audio/transcriptions`` so both apply the same intake and credit rules."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, NotRequired, TypedDict, TypeVar

from fastapi.concurrency import run_in_threadpool
from starlette.requests import Request

from gateway.services import Services
from gateway.uploads import Upload, receive_upload
from transcription import idempotency, jobfiles, ledger, lifecycle
from transcription.audio import AudioInfo, probe_mp3
from transcription.db.models import CreditCode, Job
from transcription.errors import ClusterUnavailable, InvalidRequest
from transcription.joboptions import (
    check_language,
    check_mode,
    check_prompt,
    check_word_timestamps,
)
from transcription.states import Mode

log = logging.getLogger(__name__)

T = TypeVar("T")


class JobOptions(TypedDict):
    """What a submission asks of its job; ``temperature`` and ``word_timestamps`` are left out
    at their defaults, so such a request hashes as it did before they existed
    (``Idempotency-Key`` replays)."""

    language: str | None
    prompt: str | None
    mode: str
    temperature: NotRequired[float]
    word_timestamps: NotRequired[bool]


@dataclass(frozen=True)
class Accepted(Generic[T]):
    """A submission that holds a job: a new one, or (``job`` None) the one an
    ``Idempotency-Key`` made earlier; ``form`` is what the endpoint's parser made of the form."""

    job_id: str
    job: Job | None
    form: T

    @property
    def replayed(self) -> bool:
        return self.job is None


def job_options(upload: Upload, services: Services) -> JobOptions:
    """The job's ``language``, ``prompt``, ``mode`` and ``word_timestamps`` from the form,
    checked."""
    language = check_language(upload.field("language"))
    model = services.model_name or ""
    if language not in (None, "en") and model.endswith(".en"):
        raise InvalidRequest(
            f"The model {model} transcribes English only; omit language or use 'en'.",
            param="language",
        )
    prompt = check_prompt(upload.field("prompt"))
    mode = check_mode(upload.field("mode")).value
    options: JobOptions = {"language": language, "prompt": prompt, "mode": mode}
    if not check_word_timestamps(upload.field("word_timestamps")):
        options["word_timestamps"] = False
    return options


async def accept_upload(
    request: Request,
    services: Services,
    code: CreditCode,
    idempotency_key: str | None,
    parse: Callable[[Upload], tuple[JobOptions, T]],
) -> Accepted[T]:
    """Refuse a code that cannot pay for anything before reading the body, receive the
    multipart upload, check it with ``parse`` and the audio probe, then store it, create the
    job (reserving credit) and hand it to the runner; on any refusal nothing is stored or
    charged, and a job the runner cannot take is refunded."""
    ttl = timedelta(hours=services.settings.idempotency_ttl_hours)
    state = (
        await run_in_threadpool(idempotency.claim, services.db, code.id, idempotency_key, ttl)
        if idempotency_key is not None
        else None
    )
    owned = state if isinstance(state, idempotency.Claim) else None
    upload: Upload | None = None
    try:
        if owned is not None or state is None:
            ledger.ensure_usable(code)
        upload = await receive_upload(
            request,
            tmp_dir=services.upload_dir,
            max_bytes=services.settings.max_upload_bytes,
            idle_timeout=services.settings.body_timeout,
            min_rate=services.settings.min_upload_rate,
            slots=services.uploads,
            holder=code.id,
        )
        options, form = parse(upload)
        request_hash = _request_hash(upload, options)
        if isinstance(state, idempotency.Replay):
            return Accepted(idempotency.check_replay(state, request_hash), None, form)
        assert upload.path is not None
        info = await run_in_threadpool(
            probe_mp3, upload.path, max_seconds=services.settings.max_audio_seconds
        )
        job = await run_in_threadpool(
            _create_job, services, code, upload, info, options, owned, request_hash
        )
        owned = None
    finally:
        if upload is not None:
            upload.discard()
        if owned is not None:
            await run_in_threadpool(idempotency.abandon, services.db, owned)
    try:
        await run_in_threadpool(services.runner.submit, job.id)
    except ClusterUnavailable:
        await run_in_threadpool(withdraw_job, services, job.id)
        raise
    # The line that ties the request's ID to the job's.
    log.info(
        "job %s accepted: %.1f s of audio, %s s reserved, %s mode",
        job.id,
        job.audio_seconds,
        job.reserved_seconds,
        job.mode,
        extra={"job_id": job.id},
    )
    return Accepted(job.id, job, form)


def withdraw_job(services: Services, job_id: str) -> None:
    """Cancel a job the runner could not take (queued: full refund, use given back) before the
    client hears of it. Finished in the database, it gets no transcriber from the operator, even
    if its TranscriptionJob was created after all or the operator's reconciliation creates one."""
    services.lifecycle.cancel(job_id)
    idempotency.forget(services.db, job_id)


def cancel_job(services: Services, job_id: str) -> Job | None:
    """Cancel an unfinished job under the credit rules and stop its work; None if it had
    already finished."""
    cancelled = services.lifecycle.cancel(job_id)
    if cancelled is None:
        return None
    services.runner.cancel(job_id)
    return cancelled


def _request_hash(upload: Upload, options: JobOptions) -> str:
    canonical = json.dumps({"file": upload.sha256, **options}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _create_job(
    services: Services,
    code: CreditCode,
    upload: Upload,
    info: AudioInfo,
    options: JobOptions,
    owned: idempotency.Claim | None,
    request_hash: str,
) -> Job:
    """Store the audio, then create the job and reserve credit in one transaction."""
    assert upload.path is not None
    job_id = lifecycle.new_job_id()
    key = jobfiles.audio_key(job_id)
    services.blobs.put_file(key, upload.path, content_type="audio/mpeg")
    try:
        with services.db.transaction() as session:
            job = lifecycle.submit(
                session,
                lifecycle.NewJob(
                    job_id=job_id,
                    code_id=code.id,
                    audio_key=key,
                    audio_bytes=upload.size,
                    audio_seconds=info.duration,
                    filename=upload.filename,
                    language=options["language"],
                    prompt=options["prompt"],
                    mode=options["mode"] or Mode.FAST.value,
                    temperature=options.get("temperature"),
                    word_timestamps=options.get("word_timestamps", True),
                    engine=services.engine_name,
                    model=services.model_name,
                ),
            )
            if owned is not None:
                idempotency.complete(session, owned, job.id, request_hash)
    except BaseException:
        services.blobs.delete(key)
        raise
    return job


def upload_request_body(**properties: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI for a multipart mp3 upload: the fields every upload takes, plus ``properties``."""
    fields: dict[str, Any] = {
        "file": {"type": "string", "format": "binary"},
        "language": {"type": "string", "example": "en"},
        "prompt": {"type": "string"},
        "mode": {"type": "string", "enum": [m.value for m in Mode]},
        "word_timestamps": {"type": "boolean", "default": True},
        **properties,
    }
    schema = {"type": "object", "required": ["file"], "properties": fields}
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}
    }
