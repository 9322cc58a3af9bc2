"""/v1/transcriptions: submit an mp3, follow the job, download transcripts, cancel or delete."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import select, true

from gateway.deps import CodeDep, ReadSessionDep, ServicesDep
from gateway.jobwatch import watch
from gateway.pagination import newest_first
from gateway.schemas import ErrorResponse, ListResponse, TranscriptionOut
from gateway.services import Services
from gateway.submission import accept_upload, cancel_job, job_options, upload_request_body
from transcription import jobfiles
from transcription.db.models import CreditCode, Job, Transcript
from transcription.errors import NotFound, TranscriptNotReady
from transcription.states import JobStatus
from transcription.transcript import FORMATS, MEDIA_TYPES

router = APIRouter(prefix="/v1/transcriptions", tags=["transcriptions"])

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse}
    for status in (400, 401, 402, 404, 408, 409, 413, 415, 422, 429, 503)
}
#: Longest wait ``?wait=`` allows: under the timeouts proxies commonly put on a request.
MAX_WAIT_SECONDS = 60
#: Seconds between comments on a quiet event stream, so proxies do not close it as idle.
KEEPALIVE_SECONDS = 15.0


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
    jobs, has_more = newest_first(
        session,
        Job,
        stmt,
        after=after,
        limit=limit,
        visible=true() if code_id is None else Job.code_id == code_id,
    )
    transcripts = {
        t.job_id: t
        for t in session.scalars(
            select(Transcript).where(Transcript.job_id.in_([j.id for j in jobs]))
        )
    }
    return ListResponse[TranscriptionOut](
        data=[TranscriptionOut.build(j, transcripts.get(j.id)) for j in jobs],
        has_more=has_more,
    )


@router.post(
    "",
    status_code=202,
    response_model=TranscriptionOut,
    responses=ERRORS,
    summary="Submit an mp3 for transcription",
    openapi_extra=upload_request_body(),
)
async def create_transcription(
    request: Request,
    response: Response,
    services: ServicesDep,
    code: CodeDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> TranscriptionOut:
    """Upload an mp3 (multipart field ``file``); credit for its length is reserved at once."""
    accepted = await accept_upload(
        request,
        services,
        code,
        idempotency_key,
        lambda upload: (job_options(upload, services), None),
    )
    if accepted.job is None:
        response.headers["Idempotent-Replayed"] = "true"
        return await run_in_threadpool(_read, services, code, accepted.job_id)
    response.headers["Location"] = f"/v1/transcriptions/{accepted.job_id}"
    return TranscriptionOut.build(accepted.job)


@router.get("", response_model=ListResponse[TranscriptionOut], responses=ERRORS)
def list_transcriptions(
    session: ReadSessionDep,
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


def _read(services: Services, code: CreditCode, job_id: str) -> TranscriptionOut:
    with services.db.read() as session:
        job, transcript = find_job(session, code, job_id)
        return TranscriptionOut.build(job, transcript, with_text=True)


@router.get("/{job_id}", response_model=TranscriptionOut, responses=ERRORS)
async def get_transcription(
    request: Request,
    services: ServicesDep,
    code: CodeDep,
    job_id: str,
    wait: Annotated[
        float | None,
        Query(
            gt=0,
            le=MAX_WAIT_SECONDS,
            description="Answer as soon as the job has finished, or after this many seconds "
            f"(at most {MAX_WAIT_SECONDS}) with the job as it is then.",
        ),
    ] = None,
) -> TranscriptionOut:
    """A job's status, progress, credit and, once done, its transcript text and links."""
    read = partial(_read, services, code, job_id)
    if wait is None:
        return await run_in_threadpool(read)
    latest = None
    async for job in watch(services.notifier, job_id, read, seconds=wait):
        latest = job
        if await request.is_disconnected():
            break
    assert latest is not None
    return latest


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        **ERRORS,
        200: {
            "content": {"text/event-stream": {}},
            "description": "Server-sent events: the job now, its progress, its final state.",
        },
    },
)
async def transcription_events(
    services: ServicesDep,
    code: CodeDep,
    job_id: str,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    """Follow a job as server-sent events: at once an event named after its status, then
    ``progress`` events, then ``succeeded``, ``failed`` or ``cancelled``, after which the stream
    ends. Every event's data is the job as ``GET /v1/transcriptions/{id}`` shows it."""
    read = partial(_read, services, code, job_id)
    await run_in_threadpool(read)  # an unknown ID is a 404, not an empty stream
    counted = re.fullmatch(r"[0-9]{1,18}", last_event_id or "")
    return StreamingResponse(
        _events(watch(services.notifier, job_id, read), int(counted[0]) if counted else 0),
        media_type="text/event-stream",
        # Proxies that buffer responses (nginx) would hold the events back.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(jobs: AsyncIterator[TranscriptionOut], last_id: int) -> AsyncIterator[str]:
    """The stream's text: one event per change of status or progress, a comment when quiet."""
    yield "retry: 2000\n\n"
    shown: tuple[str, float] | None = None
    sent = time.monotonic()
    async for job in jobs:
        seen = (job.status.value, job.progress)
        if seen == shown:
            if time.monotonic() - sent >= KEEPALIVE_SECONDS:
                yield ": keep-alive\n\n"
                sent = time.monotonic()
            continue
        name = job.status.value if shown is None or shown[0] != seen[0] else "progress"
        last_id += 1
        yield f"id: {last_id}\nevent: {name}\ndata: {job.model_dump_json()}\n\n"
        shown, sent = seen, time.monotonic()


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
    with services.db.read() as session:
        job, transcript = find_job(session, code, job_id)
    if job.status != JobStatus.SUCCEEDED.value or transcript is None:
        why = {
            JobStatus.FAILED.value: "the transcription failed",
            JobStatus.CANCELLED.value: "the transcription was cancelled",
        }.get(job.status, f"the job is {job.status}")
        raise TranscriptNotReady(f"No transcript: {why}.", param="id")
    body = services.blobs.get_bytes(jobfiles.transcript_key(job.id, fmt))
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
    """Cancel an unfinished job or delete a finished one's transcripts.

    A queued job is refunded in full and its use given back; a running one is charged the audio
    already transcribed (at least progress times audio seconds, rounded up), the rest is released and
    the use stays spent. Deleting a finished job moves no money."""
    with services.db.transaction() as session:
        job, _ = find_job(session, code, job_id)
    if not JobStatus(job.status).finished:
        cancelled = cancel_job(services, job_id)
        if cancelled is not None:
            return TranscriptionOut.build(cancelled)
    return TranscriptionOut.build(services.lifecycle.mark_deleted(job_id))
