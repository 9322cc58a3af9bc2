"""Limits on what one client can hold: request bodies, slow headers, connections.

The body limit is a pure ASGI middleware so that it runs before routing and authentication and
sees the body as it arrives; the header deadline lives in uvicorn's protocol, which alone sees
a request before its headers are complete. Upload routes keep their own limits (gateway.uploads).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection
from http import HTTPStatus
from typing import Any

import h11
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.errors import error_body, status_for
from gateway.uploads import human_size
from transcription.errors import (
    DomainError,
    InvalidRequest,
    RequestTimeout,
    RequestTooLarge,
    ServerBusy,
)
from transcription.settings import GatewaySettings


def _error_content(exc: DomainError) -> tuple[int, dict[str, object]]:
    status, type_ = status_for(exc)
    return status, error_body(exc.message, type_, exc.code, exc.param)


class BodyLimit:
    """Reads the whole body of every request but the ``uploads`` routes before the app runs,
    refusing one over ``max_bytes`` (413) or stalled for ``timeout`` seconds (408)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        timeout: float,
        uploads: Collection[tuple[str, str]],
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.uploads = uploads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.uploads:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and self._too_large(int(declared)):
            await _refuse(self._too_large_error(), scope, receive, send)
            return
        body = bytearray()
        more_body = True
        while more_body:
            try:
                async with asyncio.timeout(self.timeout or None):
                    message = await receive()
            except TimeoutError:
                stalled = RequestTimeout(
                    f"No part of the request body arrived for {self.timeout:g} s; send it again."
                )
                await _refuse(stalled, scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if self._too_large(len(body)):
                await _refuse(self._too_large_error(), scope, receive, send)
                return
            more_body = message.get("more_body", False)
        await self.app(scope, _replay(bytes(body), receive), send)

    def _too_large(self, size: int) -> bool:
        return bool(self.max_bytes) and size > self.max_bytes

    def _too_large_error(self) -> RequestTooLarge:
        return RequestTooLarge(
            f"The request body is larger than the {human_size(self.max_bytes)} limit."
        )


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the app the body already read, then what the server sends
    (a disconnect, which streaming responses watch for)."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


async def _refuse(exc: DomainError, scope: Scope, receive: Receive, send: Send) -> None:
    status, content = _error_content(exc)
    # Closing spares reading (or waiting for) the rest of a body nobody will use.
    response = JSONResponse(content, status_code=status, headers={"Connection": "close"})
    await response(scope, receive, send)


#: What h11 holds of unfinished headers when uvicorn is not told otherwise.
H11_DEFAULT_HEADER_BYTES = 16 * 1024
#: Seconds a client refused at the connection limit is asked to wait.
BUSY_RETRY_AFTER = 2


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with what uvicorn lacks: a deadline for each request's line and
    headers, counted from the connection's start or from a later request's first byte (the
    keep-alive timeout covers the wait before it; ``header_timeout`` 0 means none), no reading
    on past a response given before its request's body was read, and its own refusals (too many
    connections, malformed requests) in the API's JSON error shape instead of plain text."""

    header_timeout: float = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            if self._crowded():
                # What uvicorn's limit_concurrency would answer later, as plain text.
                busy = ServerBusy(
                    "The server is at its connection limit; try again shortly.",
                    retry_after=BUSY_RETRY_AFTER,
                )
                self.transport.write(_raw_response(busy, {"Retry-After": str(BUSY_RETRY_AFTER)}))
                self.transport.close()
                return
            self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def send_400_response(self, msg: str) -> None:
        limit = self.config.h11_max_incomplete_event_size or H11_DEFAULT_HEADER_BYTES
        invalid = InvalidRequest(
            "The request is not valid HTTP/1.1, or its line and headers are larger than "
            f"{human_size(limit)}.",
            code="invalid_http_request",
        )
        self.transport.write(_raw_response(invalid))
        self.transport.close()

    def _crowded(self) -> bool:
        # uvicorn's own test, made before it would: this connection is among those counted.
        limit = self.limit_concurrency
        return limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        if self.conn.their_state is h11.SEND_BODY:
            # A refusal (401, 413, 429…) sent before the body was read: uvicorn would read and
            # drop the rest of it for as long as the client kept sending.
            self.transport.close()
        super().on_response_complete()

    def _arm(self) -> None:
        if self.header_timeout and self._deadline is None:
            self._deadline = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        started, _ = self.conn.trailing_data
        if started:
            # Only a client that began a request is told why; an idle one is just closed.
            late = RequestTimeout(
                f"The request's headers did not arrive within {self.header_timeout:g} s."
            )
            self.transport.write(_raw_response(late))
        self.transport.close()


def _raw_response(exc: DomainError, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 response for ``exc`` that closes the connection, written below h11
    (which will not answer a request it has not received)."""
    status, content = _error_content(exc)
    body = json.dumps(content).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        f"{extra}connection: close\r\n\r\n"
    )
    return head.encode() + body


def server_options(settings: GatewaySettings) -> dict[str, Any]:
    """``uvicorn.run`` keyword arguments for the settings' connection limits."""
    protocol = type(
        BoundedH11Protocol.__name__,
        (BoundedH11Protocol,),
        {"header_timeout": settings.header_timeout},
    )
    return {
        "http": protocol,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "limit_concurrency": settings.max_connections or None,
        "timeout_keep_alive": settings.keep_alive_timeout,
        # uvicorn would believe X-Forwarded-For from 127.0.0.1; the app believes it only from
        # WHISPER_TRUSTED_PROXIES, since the failed-auth limit counts by client address.
        "proxy_headers": False,
    }
