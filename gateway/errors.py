"""The one place where domain errors become HTTP responses, in OpenAI's error shape."""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.ratelimit import penalty
from gateway.requestid import HEADER
from transcription import errors as e
from transcription import logs

log = logging.getLogger(__name__)

#: Most specific class first: the first ``isinstance`` match decides the status.
STATUS: list[tuple[type[e.DomainError], int, str]] = [
    (e.Unauthenticated, 401, "authentication_error"),
    (e.AdminRequired, 401, "authentication_error"),
    (e.AdminDisabled, 403, "permission_error"),
    (e.CreditError, 402, "insufficient_quota"),
    (e.NotFound, 404, "not_found_error"),
    (e.IdempotencyKeyInUse, 409, "conflict_error"),
    (e.Conflict, 409, "conflict_error"),
    (e.UploadTooLarge, 413, "invalid_request_error"),
    (e.RequestTooLarge, 413, "invalid_request_error"),
    (e.RequestTimeout, 408, "invalid_request_error"),
    (e.TooManyRequests, 429, "rate_limit_error"),
    (e.ClusterUnavailable, 503, "server_error"),
    (e.ServerBusy, 503, "server_error"),
    (e.UnsupportedMediaType, 415, "invalid_request_error"),
    (e.InvalidAudio, 422, "invalid_request_error"),
    (e.IdempotencyKeyReused, 422, "invalid_request_error"),
    (e.InvalidRequest, 400, "invalid_request_error"),
    (e.EngineUnavailable, 502, "server_error"),
    (e.TranscriptionFailed, 422, "invalid_request_error"),
]

#: Where OpenAI's API answers with another status than ours, for the OpenAI-compatible routes.
OPENAI_STATUS: list[tuple[type[e.DomainError], int, str]] = [
    (e.CreditError, 429, "insufficient_quota"),
    (e.UnsupportedMediaType, 400, "invalid_request_error"),
]


def error_body(
    message: str, type_: str, code: str, param: str | None = None, **details: str
) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code, **details}}


def status_for(exc: e.DomainError, *, openai: bool = False) -> tuple[int, str]:
    for cls, status, type_ in [*(OPENAI_STATUS if openai else []), *STATUS]:
        if isinstance(exc, cls):
            return status, type_
    return 500, "server_error"


def openai_dialect(request: Request) -> None:
    """Route dependency: the route's errors use OpenAI's status codes, and tell the OpenAI SDK
    not to retry them, since a retried upload would be a second job."""
    request.state.openai_dialect = True


def _headers(request: Request, status: int) -> dict[str, str]:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if getattr(request.state, "openai_dialect", False):
        headers["x-should-retry"] = "false"
    return headers


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, e.DomainError)
    if delay := penalty(request):
        await asyncio.sleep(delay)
    status, type_ = status_for(exc, openai=getattr(request.state, "openai_dialect", False))
    body = error_body(exc.message, type_, exc.code, exc.param, **exc.details())
    headers = _headers(request, status)
    retryable = e.TooManyRequests | e.RequestTimeout | e.ClusterUnavailable
    if isinstance(exc, retryable) and "x-should-retry" in headers:
        # Nothing was stored (or it was refunded), so a retry cannot make a second job.
        headers["x-should-retry"] = "true"
    if isinstance(exc, e.TooManyRequests | e.ClusterUnavailable):
        headers["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, e.RequestTimeout):
        # The rest of the body may never come: close rather than wait to read past it.
        headers["Connection"] = "close"
    return JSONResponse(body, status_code=status, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(location) or None
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else "Invalid request."
    return JSONResponse(
        error_body(message, "invalid_request_error", "invalid_request", param),
        status_code=400,
        headers=_headers(request, 400),
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(
        error_body(str(exc.detail), "invalid_request_error", code),
        status_code=exc.status_code,
        headers={**_headers(request, exc.status_code), **(exc.headers or {})},
    )


async def _unstorable_value(request: Request, exc: Exception) -> JSONResponse:
    # PostgreSQL refuses some values SQLite takes (a NUL character in text): the input's fault.
    return JSONResponse(
        error_body(
            "The request contains a value that cannot be stored, such as a NUL character.",
            "invalid_request_error",
            "invalid_request",
        ),
        status_code=400,
        headers=_headers(request, 400),
    )


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    headers = _headers(request, 500)
    request_id = logs.request_id.get()
    if request_id is not None:
        # Starlette answers this one from outside every middleware, gateway.requestid's too.
        headers[HEADER] = request_id
    return JSONResponse(
        error_body("The server hit an unexpected error.", "server_error", "internal_error"),
        status_code=500,
        headers=headers,
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(e.DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DataError, _unstorable_value)
    app.add_exception_handler(Exception, _unexpected_error)
