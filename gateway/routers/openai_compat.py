"""The OpenAI-compatible API: ``POST /v1/audio/transcriptions`` and ``GET /v1/models``, so code
written for the OpenAI SDK works with a credit code as its API key.

A request runs the normal job (same intake, credit and idempotency rules) and waits for it. Past
``sync_wait_seconds`` it answers ``409 transcription_pending`` with the job's ID (in ``param``
and ``job_id``) to poll at ``/v1/transcriptions/{id}``; the job goes on. With ``stream=true``
the answer is server-sent events in OpenAI's shapes: the finished transcript's segments as
``transcript.text.delta`` events, then ``transcript.text.done`` (a transcript is never shown
before its job has succeeded, so the deltas come at the end), or an event carrying
``{"error": …}``, which the OpenAI SDK raises. A caller that hangs up
before the answer cancels its job under the credit rules of every cancel: a job still queued is
refunded in full and its use given back; a running one is charged the audio already transcribed
and its use stays spent, so hanging up never buys transcription for free. (The OpenAI SDK sends
no idempotency key of its own: its retry after a timeout is a new upload.)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from gateway.deps import CodeDep, ServicesDep
from gateway.errors import error_body, openai_dialect, status_for
from gateway.jobwatch import watch
from gateway.routers.transcriptions import KEEPALIVE_SECONDS, find_job
from gateway.schemas import ErrorResponse
from gateway.services import Services
from gateway.submission import (
    JobOptions,
    accept_upload,
    cancel_job,
    job_options,
    upload_request_body,
)
from gateway.uploads import Upload
from transcription import jobfiles
from transcription.db.models import Job, Transcript
from transcription.errors import (
    Conflict,
    DomainError,
    EngineUnavailable,
    InvalidRequest,
    NotFound,
    TranscriptionFailed,
    TranscriptionPending,
)
from transcription.languages import name_of
from transcription.states import CreditState, JobStatus

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(openai_dialect)])

DEFAULT_MODEL = "whisper-1"
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
STREAMED_FORMATS = ("json", "text")
GRANULARITIES = ("timestamp_granularities[]", "timestamp_granularities")
TIMESTAMPS = ("word", "segment")
#: OpenAI's fields that ask for what only its gpt-4o models do, each refused by name.
UNSUPPORTED = {
    "include[]": "log probabilities (include[]=logprobs) are not available from Whisper.",
    "include": "log probabilities (include[]=logprobs) are not available from Whisper.",
    "known_speaker_names[]": "speaker diarization is not available.",
    "known_speaker_references[]": "speaker diarization is not available.",
}
CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads it, the access log does

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 408, 409, 413, 422, 429, 502, 503)
}


@dataclass(frozen=True)
class Form:
    """The OpenAI-only fields of the form; the rest become the job's options."""

    model: str
    response_format: str
    timestamps: frozenset[str] = frozenset()
    stream: bool = False


def accepted_models(services: Services) -> list[str]:
    """``whisper-1`` (what OpenAI code asks for: this service's model) and the model's own name."""
    return list(dict.fromkeys(m for m in (DEFAULT_MODEL, services.model_name) if m))


def parse_form(upload: Upload, services: Services) -> tuple[JobOptions, Form]:
    """Check the OpenAI fields (refusing what this service cannot honour) and the job's."""
    model = (upload.field("model") or DEFAULT_MODEL).strip()
    models = accepted_models(services)
    if model not in models:
        raise InvalidRequest(
            f"The model {model!r} does not exist here; use one of: {', '.join(models)}.",
            param="model",
            code="model_not_found",
        )
    response_format = (upload.field("response_format") or "json").strip().lower()
    if response_format not in RESPONSE_FORMATS:
        raise InvalidRequest(
            f"response_format must be one of {', '.join(RESPONSE_FORMATS)}.",
            param="response_format",
        )
    for name, why in UNSUPPORTED.items():
        if any(v.strip() for v in upload.fields.get(name, [])):
            raise InvalidRequest(f"{name} is not supported here: {why}", param=name)
    strategy = (upload.field("chunking_strategy") or "auto").strip()
    if strategy != "auto":
        raise InvalidRequest(
            "chunking_strategy can only be 'auto': the audio is cut at quiet points.",
            param="chunking_strategy",
        )
    options = job_options(upload, services)
    temperature = upload.field("temperature")
    if temperature is not None and temperature.strip():
        try:
            value = float(temperature)
        except ValueError:
            value = -1.0
        if not 0.0 <= value <= 1.0:
            raise InvalidRequest("temperature must be a number from 0 to 1.", param="temperature")
        options["temperature"] = value
    timestamps = frozenset(g.strip() for name in GRANULARITIES for g in upload.fields.get(name, []))
    if timestamps - set(TIMESTAMPS) or (timestamps and response_format != "verbose_json"):
        raise InvalidRequest(
            "timestamp_granularities[] takes 'word' and 'segment', with "
            "response_format=verbose_json.",
            param="timestamp_granularities[]",
        )
    if "word" in timestamps and options.get("word_timestamps") is False:
        raise InvalidRequest(
            "timestamp_granularities[]=word needs the words timed: drop word_timestamps=false.",
            param="timestamp_granularities[]",
        )
    stream = (upload.field("stream") or "false").strip().lower()
    if stream not in ("true", "false") or (
        stream == "true" and response_format not in STREAMED_FORMATS
    ):
        raise InvalidRequest(
            "stream=true answers with response_format json or text; verbose_json, srt and vtt "
            "are not streamed.",
            param="stream",
        )
    return options, Form(model, response_format, timestamps, stream == "true")


@router.post(
    "/audio/transcriptions",
    responses={
        **ERRORS,
        200: {"content": {"application/json": {}, "text/plain": {}}},
    },
    response_class=Response,
    summary="Transcribe an mp3 and wait for it (OpenAI-compatible)",
    openapi_extra=upload_request_body(
        model={"type": "string", "example": DEFAULT_MODEL},
        response_format={"type": "string", "enum": list(RESPONSE_FORMATS)},
        temperature={"type": "number", "minimum": 0, "maximum": 1},
        stream={"type": "boolean", "default": False},
        **{
            "timestamp_granularities[]": {
                "type": "array",
                "items": {"type": "string", "enum": list(TIMESTAMPS)},
            }
        },
    ),
)
async def create_transcription(
    request: Request,
    services: ServicesDep,
    code: CodeDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Response:
    """Upload an mp3 with the credit code as bearer token; answers with the transcript in the
    requested ``response_format`` when the job is done, or streams it with ``stream=true``.
    ``temperature`` is the first temperature of the engine's decoding."""
    accepted = await accept_upload(
        request, services, code, idempotency_key, lambda upload: parse_form(upload, services)
    )
    if accepted.form.stream:
        return StreamingResponse(
            _stream(request, services, accepted.job_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    finished = await _wait(request, services, accepted.job_id)
    if finished is None:
        await run_in_threadpool(cancel_job, services, accepted.job_id)
        return Response(status_code=CLIENT_CLOSED)
    job, transcript = finished
    if job.status != JobStatus.SUCCEEDED.value or transcript is None:
        raise _outcome_error(job)
    return await run_in_threadpool(_render, services, job, transcript, accepted.form)


@dataclass(frozen=True)
class _Found:
    job: Job
    transcript: Transcript | None

    @property
    def status(self) -> str:
        return self.job.status


async def _wait(
    request: Request, services: Services, job_id: str
) -> tuple[Job, Transcript | None] | None:
    """The job once it has finished, woken by this process's changes and re-read for others'
    (gateway.jobwatch); None if the caller hung up first."""
    seconds = services.settings.sync_wait_seconds
    status = JobStatus.QUEUED.value
    async for found in watch(
        services.notifier, job_id, lambda: _fetch(services, job_id), seconds=seconds
    ):
        if JobStatus(found.status).finished:
            return found.job, found.transcript
        if await request.is_disconnected():
            return None
        status = found.status
    raise TranscriptionPending(
        f"The transcription {job_id} is still {status} after {seconds:g} s; it goes on: poll "
        f"GET /v1/transcriptions/{job_id} for its result.",
        job_id=job_id,
    )


async def _stream(request: Request, services: Services, job_id: str) -> AsyncIterator[str]:
    """The job's outcome as server-sent events; a caller that hangs up before the end cancels
    the job as a non-streamed caller does."""
    answered = False
    waiting = asyncio.ensure_future(_wait(request, services, job_id))
    try:
        # A comment now and then while the job runs, so proxies do not close the stream as idle.
        while not (await asyncio.wait({waiting}, timeout=KEEPALIVE_SECONDS))[0]:
            yield ": keep-alive\n\n"
        try:
            finished = waiting.result()
        except DomainError as exc:
            answered = True
            yield _event(_error(exc))
            return
        if finished is None:
            return
        job, transcript = finished
        answered = True
        if job.status != JobStatus.SUCCEEDED.value or transcript is None:
            yield _event(_error(_outcome_error(job)))
            return
        stored = await run_in_threadpool(_stored, services, job)
        texts = [s["text"] for s in stored.get("segments", []) if s["text"]]
        for i, text in enumerate(texts):
            # Joined, the deltas spell the done event's text: segments are joined by a space.
            yield _event({"type": "transcript.text.delta", "delta": (" " if i else "") + text})
        yield _event({"type": "transcript.text.done", "text": transcript.text})
    finally:
        waiting.cancel()
        if not answered:
            # Also when the server cancelled this generator because the caller hung up.
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(cancel_job, services, job_id)


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _error(exc: DomainError) -> dict[str, Any]:
    """The body a non-streamed call would have answered ``exc`` with."""
    _status, type_ = status_for(exc, openai=True)
    return error_body(exc.message, type_, exc.code, exc.param, **exc.details())


def _fetch(services: Services, job_id: str) -> _Found:
    with services.db.read() as session:
        return _Found(*find_job(session, None, job_id))


def _outcome_error(job: Job) -> DomainError:
    """The error that reports an unsuccessful job, keeping its code and naming it."""
    if job.status == JobStatus.CANCELLED.value:
        return Conflict(
            f"The transcription {job.id} was cancelled; {cancel_charge(job)}",
            param=job.id,
            code="transcription_cancelled",
        )
    message = f"{job.error_message or 'The transcription failed.'} (job {job.id}; refunded)"
    error_code = job.error_code or "transcription_failed"
    if error_code.startswith("engine_"):
        return EngineUnavailable(message, param=job.id, code=error_code)
    if error_code == "internal_error":
        return DomainError(message, param=job.id, code=error_code)
    return TranscriptionFailed(message, param=job.id, code=error_code)


def cancel_charge(job: Job) -> str:
    """What a cancel cost, in the words of the credit rules."""
    if job.credit_state == CreditState.RELEASED:
        return "it had not started, so its credit was refunded and the use given back."
    return (
        f"it was charged {job.charged_seconds or 0} s for the audio already transcribed, the "
        "rest of its credit was released and the use stays spent."
    )


def _render(services: Services, job: Job, transcript: Transcript, form: Form) -> Response:
    fmt = form.response_format
    if fmt in ("text", "srt", "vtt"):
        key = jobfiles.transcript_key(job.id, "txt" if fmt == "text" else fmt)
        return PlainTextResponse(services.blobs.get_bytes(key).decode())
    usage = {"type": "duration", "seconds": job.charged_seconds or 0}
    if fmt == "json":
        return JSONResponse({"text": transcript.text, "usage": usage})
    segments = _stored(services, job).get("segments", [])
    verbose: dict[str, Any] = {
        "task": "transcribe",
        "language": name_of(transcript.language),
        "duration": transcript.duration_seconds,
        "text": transcript.text,
    }
    # OpenAI's rule: segments unless only words were asked for.
    if "segment" in form.timestamps or not form.timestamps:
        verbose["segments"] = [_segment(s) for s in segments]
    if "word" in form.timestamps:
        # A transcript stored before words were timed has none.
        verbose["words"] = [_word(w) for s in segments for w in s.get("words", [])]
    return JSONResponse({**verbose, "usage": usage})


def _stored(services: Services, job: Job) -> dict[str, Any]:
    """The job's stored JSON transcript."""
    stored: dict[str, Any] = json.loads(
        services.blobs.get_bytes(jobfiles.transcript_key(job.id, "json"))
    )
    return stored


def _word(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored word in OpenAI's shape, which has no probability."""
    return {"word": stored["word"], "start": stored["start"], "end": stored["end"]}


def _segment(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored segment in OpenAI's shape; figures the engine did not report are null, and
    ``seek`` is the start in Whisper's 10 ms frames."""
    return {
        "id": stored["id"],
        "seek": round(stored["start"] * 100),
        "start": stored["start"],
        "end": stored["end"],
        "text": stored["text"],
        "tokens": [],
        "temperature": stored.get("temperature"),
        "avg_logprob": stored.get("avg_logprob"),
        "compression_ratio": stored.get("compression_ratio"),
        "no_speech_prob": stored.get("no_speech_prob"),
    }


@router.get("/models", responses=ERRORS)
def list_models(services: ServicesDep, _code: CodeDep) -> dict[str, Any]:
    """The model IDs ``/v1/audio/transcriptions`` accepts, in OpenAI's list shape."""
    return {"object": "list", "data": [_model(m, services) for m in accepted_models(services)]}


@router.get("/models/{model_id}", responses=ERRORS)
def get_model(services: ServicesDep, _code: CodeDep, model_id: str) -> dict[str, Any]:
    """One accepted model, or 404 ``model_not_found``."""
    if model_id not in accepted_models(services):
        raise NotFound(f"The model {model_id!r} does not exist here.", code="model_not_found")
    return _model(model_id, services)


def _model(model_id: str, services: Services) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": services.engine_name}
