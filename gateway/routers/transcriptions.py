"""/v1/transcriptions: submit an mp3, follow the job, download transcripts, cancel or delete."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select

from gateway.deps import CodeDep, ServicesDep, SessionDep
from gateway.schemas import ErrorResponse, ListResponse, TranscriptionOut
from gateway.services import Services
from gateway.uploads import Upload, receive_upload
from transcription import idempotency, ledger, lifecycle
from transcription.audio import AudioInfo, probe_mp3
from transcription.db.models import CreditCode, Job, Transcript
from transcription.errors import InvalidRequest, NotFound, TranscriptNotReady
from transcription.states import JobStatus, Mode
from transcription.transcript import FORMATS, MEDIA_TYPES

router = APIRouter(prefix="/v1/transcriptions", tags=["transcriptions"])

LANGUAGE = re.compile(r"^[a-z]{2,3}$")
MAX_PROMPT_CHARS = 2000

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 402, 404, 409, 413, 415, 422)
}


def find_job(session: Any, code: CreditCode | None, job_id: str) -> tuple[Job, Transcript | None]:
    """The job if it exists, is not deleted and (for a code holder) belongs to the code."""
    job = session.get(Job, job_id)
    if job is None or job.deleted_at is not None or (code is not None and job.code_id != code.id):
        raise NotFound(f"No transcription with ID {job_id!r}.", param="id")
    transcript = session.scalar(select(Transcript).where(Transcript.job_id == job_id))
    return job, transcript


def list_jobs(
    session: Any, *, code_id: str | None, status: str | None, limit: int, after: str | None
) -> ListResponse[TranscriptionOut]:
    stmt = select(Job).where(Job.deleted_at.is_(None))
    if code_id is not None:
        stmt = stmt.where(Job.code_id == code_id)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if after is not None:
        cursor = session.get(Job, after)
        if cursor is None:
            raise InvalidRequest(f"Unknown cursor {after!r}.", param="after")
        stmt = stmt.where(
            (Job.created_at < cursor.created_at)
            | ((Job.created_at == cursor.created_at) & (Job.id < cursor.id))
        )
    jobs = list(
        session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1))
    )
    transcripts = {
        t.job_id: t
        for t in session.scalars(
            select(Transcript).where(Transcript.job_id.in_([j.id for j in jobs[:limit]]))
        )
    }
    return ListResponse[TranscriptionOut](
        data=[TranscriptionOut.build(j, transcripts.get(j.id)) for j in jobs[:limit]],
        has_more=len(jobs) > limit,
    )


def _options(upload: Upload, services: Services) -> dict[str, str | None]:
    language = (upload.field("language") or "").strip().lower() or None
    if language is not None and not LANGUAGE.match(language):
        raise InvalidRequest(
            "language must be an ISO-639-1 code such as 'en' or 'de'.", param="language"
        )
    model = services.model_name or ""
    if language not in (None, "en") and model.endswith(".en"):
        raise InvalidRequest(
            f"The model {model} transcribes English only; omit language or use 'en'.",
            param="language",
        )
    prompt = upload.field("prompt") or None
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"prompt is limited to {MAX_PROMPT_CHARS} characters.", param="prompt")
    mode = (upload.field("mode") or Mode.FAST.value).strip().lower()
    if mode not in {m.value for m in Mode}:
        raise InvalidRequest("mode must be 'fast' or 'accurate'.", param="mode")
    return {"language": language, "prompt": prompt, "mode": mode}


def _request_hash(upload: Upload, options: dict[str, str | None]) -> str:
    canonical = json.dumps({"file": upload.sha256, **options}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _create_job(
    services: Services,
    code: CreditCode,
    upload: Upload,
    info: AudioInfo,
    options: dict[str, str | None],
    owned: idempotency.Claim | None,
    request_hash: str,
) -> Job:
    """Store the audio, then create the job and reserve credit in one transaction."""
    assert upload.path is not None
    job_id = lifecycle.new_job_id()
    key = lifecycle.audio_key(job_id)
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


@router.post(
    "",
    status_code=202,
    response_model=TranscriptionOut,
    responses=ERRORS,
    summary="Submit an mp3 for transcription",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "language": {"type": "string", "example": "en"},
                            "prompt": {"type": "string"},
                            "mode": {"type": "string", "enum": ["fast", "accurate"]},
                        },
                    }
                }
            },
        }
    },
)
async def create_transcription(
    request: Request,
    response: Response,
    services: ServicesDep,
    code: CodeDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> TranscriptionOut:
    """Upload an mp3 (multipart field ``file``); credit for its length is reserved at once."""
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
        )
        options = _options(upload, services)
        request_hash = _request_hash(upload, options)
        if isinstance(state, idempotency.Replay):
            job_id = idempotency.check_replay(state, request_hash)
            response.headers["Idempotent-Replayed"] = "true"
            return await run_in_threadpool(_load, services, code, job_id)
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
    services.runner.submit(job.id)
    response.headers["Location"] = f"/v1/transcriptions/{job.id}"
    return TranscriptionOut.build(job)


def _load(services: Services, code: CreditCode, job_id: str) -> TranscriptionOut:
    with services.db.transaction() as session:
        job, transcript = find_job(session, code, job_id)
        return TranscriptionOut.build(job, transcript, with_text=True)


@router.get("", response_model=ListResponse[TranscriptionOut], responses=ERRORS)
def list_transcriptions(
    session: SessionDep,
    code: CodeDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[
        str | None, Query(description="Cursor: the last ID of the page before.")
    ] = None,
    status: Annotated[JobStatus | None, Query()] = None,
) -> ListResponse[TranscriptionOut]:
    """The code's jobs, newest first."""
    return list_jobs(
        session,
        code_id=code.id,
        status=status.value if status else None,
        limit=limit,
        after=after,
    )


@router.get("/{job_id}", response_model=TranscriptionOut, responses=ERRORS)
def get_transcription(session: SessionDep, code: CodeDep, job_id: str) -> TranscriptionOut:
    """A job's status, progress, credit and, once done, its transcript text and links."""
    job, transcript = find_job(session, code, job_id)
    return TranscriptionOut.build(job, transcript, with_text=True)


@router.get(
    "/{job_id}/transcript.{fmt}",
    responses={
        **ERRORS,
        200: {"content": {m.split(";")[0]: {} for m in MEDIA_TYPES.values()}},
    },
    response_class=Response,
)
def get_transcript(services: ServicesDep, code: CodeDep, job_id: str, fmt: str) -> Response:
    """Download the transcript as txt, srt, vtt or json; 409 until the job has succeeded."""
    if fmt not in FORMATS:
        raise NotFound(
            f"Unknown transcript format {fmt!r}; use one of {', '.join(FORMATS)}.", param="fmt"
        )
    with services.db.transaction() as session:
        job, transcript = find_job(session, code, job_id)
    if job.status != JobStatus.SUCCEEDED.value or transcript is None:
        why = {
            JobStatus.FAILED.value: "the transcription failed",
            JobStatus.CANCELLED.value: "the transcription was cancelled",
        }.get(job.status, f"the job is {job.status}")
        raise TranscriptNotReady(f"No transcript: {why}.", param="id")
    body = services.blobs.get_bytes(lifecycle.transcript_key(job.id, fmt))
    stem = (job.filename or job.id).rsplit(".", 1)[0] or job.id
    return Response(
        content=body,
        media_type=MEDIA_TYPES[fmt],
        headers={"Content-Disposition": f'attachment; filename="{_safe(stem)}.{fmt}"'},
    )


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100] or "transcript"


@router.delete("/{job_id}", response_model=TranscriptionOut, responses=ERRORS)
def delete_transcription(services: ServicesDep, code: CodeDep, job_id: str) -> TranscriptionOut:
    """Cancel an unfinished job (its credit is refunded) or delete a finished one's files."""
    with services.db.transaction() as session:
        job, _ = find_job(session, code, job_id)
    if not JobStatus(job.status).finished:
        cancelled = services.lifecycle.cancel(job_id)
        if cancelled is not None:
            services.runner.cancel(job_id)
            services.blobs.delete(cancelled.audio_key)
            return TranscriptionOut.build(cancelled)
    services.blobs.delete(job.audio_key)
    for fmt in FORMATS:
        services.blobs.delete(lifecycle.transcript_key(job_id, fmt))
    return TranscriptionOut.build(services.lifecycle.mark_deleted(job_id))
