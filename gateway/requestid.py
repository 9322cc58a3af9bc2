"""Request IDs: each request gets one, from the client's ``X-Request-ID`` when it is a sane token
or made up here, on every log line written while serving it and on its response."""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from transcription import logs

HEADER = "X-Request-ID"
#: What a client's ID may be: what proxies and tracers send (UUIDs, hex, base64), never spaces,
#: quotes or control characters that could forge or break a log line.
ACCEPTED = re.compile(r"[A-Za-z0-9._~:+/=-]{1,128}")


def accepted(value: bytes | None) -> str | None:
    """The client's request ID, or None when it sent none or one that is not a sane token."""
    if value is None:
        return None
    text = value.decode("latin-1")
    return text if ACCEPTED.fullmatch(text) else None


class RequestId:
    """Pure ASGI middleware: sets the request ID for logging and returns it in ``X-Request-ID``.

    The context variable stays set for the rest of the request's task (the server runs each
    request in its own), so Starlette's error handler and uvicorn's error log, which run outside
    this middleware, log it too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(HEADER.lower().encode())
        request_id = accepted(sent) or uuid.uuid4().hex
        logs.request_id.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)
