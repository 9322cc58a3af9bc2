"""FastAPI dependencies as ``Annotated`` aliases: services, sessions, the caller's code, admin."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from gateway.services import Services
from transcription import ledger
from transcription.db.models import CreditCode
from transcription.errors import AdminDisabled, AdminRequired, Unauthenticated


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_session(services: ServicesDep) -> Iterator[Session]:
    with services.db.transaction() as session:
        yield session


# "function" scope commits before the response is sent: a client that is told "created" can
# use what it was told about at once (the default scope commits only after the response).
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_read_session(services: ServicesDep) -> Iterator[Session]:
    with services.db.read() as session:
        yield session


ReadSessionDep = Annotated[Session, Depends(get_read_session, scope="function")]


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def get_code(request: Request, services: ServicesDep) -> CreditCode:
    """The credit code presented as the bearer token; it may still be unable to pay."""
    token = bearer_token(request)
    if token is None:
        raise Unauthenticated(
            "Send your credit code as 'Authorization: Bearer <code>'.", code="missing_code"
        )
    with services.auth_limiter.attempt(request), services.db.read() as session:
        return ledger.authenticate(session, services.code_key, token)


CodeDep = Annotated[CreditCode, Depends(get_code)]


def require_admin(request: Request, services: ServicesDep) -> None:
    expected = services.settings.admin_token
    if expected is None:
        raise AdminDisabled(
            "The admin API is disabled: set WHISPER_ADMIN_TOKEN on the server to enable it."
        )
    token = bearer_token(request)
    if token is None:
        raise AdminRequired("Send the admin token as 'Authorization: Bearer <token>'.")
    with services.auth_limiter.attempt(request):
        if not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
            raise AdminRequired("Send the admin token as 'Authorization: Bearer <token>'.")


AdminDep = Annotated[None, Depends(require_admin)]
