"""/v1/admin: issue, inspect, top up, extend and revoke codes; see every transcription."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from gateway.deps import AdminDep, ReadSessionDep, ServicesDep, SessionDep
from gateway.pagination import newest_first
from gateway.routers.transcriptions import ERRORS, list_jobs
from gateway.schemas import (
    CodeCreate,
    CodeCreated,
    CodeUpdate,
    CreditsOut,
    ListResponse,
    TranscriptionOut,
)
from transcription import ledger
from transcription.db.models import CreditCode
from transcription.states import JobStatus

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[])


@router.post("/codes", status_code=201, response_model=CodeCreated, responses=ERRORS)
def create_code(
    _admin: AdminDep, services: ServicesDep, session: SessionDep, body: CodeCreate
) -> CodeCreated:
    """Mint a code; the response is the only place its secret ever appears."""
    issued = ledger.issue_code(
        session,
        services.code_key,
        seconds=body.seconds,
        max_uses=body.max_uses,
        expires_at=body.expires_at,
        label=body.label,
    )
    session.flush()
    return CodeCreated(**CreditsOut.build(issued.record).model_dump(), code=issued.code)


@router.get("/codes", response_model=ListResponse[CreditsOut], responses=ERRORS)
def list_codes(
    _admin: AdminDep,
    session: ReadSessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[
        str | None, Query(description="Cursor: the last ID of the page before.")
    ] = None,
) -> ListResponse[CreditsOut]:
    """Every code, newest first."""
    rows, has_more = newest_first(session, CreditCode, select(CreditCode), after=after, limit=limit)
    return ListResponse[CreditsOut](data=[CreditsOut.build(r) for r in rows], has_more=has_more)


@router.get("/codes/{code_id}", response_model=CreditsOut, responses=ERRORS)
def get_code(_admin: AdminDep, session: ReadSessionDep, code_id: str) -> CreditsOut:
    return CreditsOut.build(ledger.get_code(session, code_id))


@router.patch("/codes/{code_id}", response_model=CreditsOut, responses=ERRORS)
def update_code(
    _admin: AdminDep, session: SessionDep, code_id: str, body: CodeUpdate
) -> CreditsOut:
    """Top up (``add_seconds``), change ``max_uses``, extend or clear ``expires_at``, revoke."""
    record = ledger.get_code(session, code_id)
    if body.add_seconds is not None:
        record = ledger.top_up(session, code_id, body.add_seconds)
    if body.max_uses is not None:
        record = ledger.set_max_uses(session, code_id, body.max_uses)
    if "expires_at" in body.model_fields_set:
        record = ledger.set_expiry(session, code_id, body.expires_at)
    if "label" in body.model_fields_set:
        record.label = body.label
    if body.revoked:
        record = ledger.revoke(session, code_id)
    session.flush()
    return CreditsOut.build(record)


@router.delete("/codes/{code_id}", response_model=CreditsOut, responses=ERRORS)
def revoke_code(_admin: AdminDep, session: SessionDep, code_id: str) -> CreditsOut:
    """Revoke the code; jobs it already paid for finish normally."""
    return CreditsOut.build(ledger.revoke(session, code_id))


@router.get("/transcriptions", response_model=ListResponse[TranscriptionOut], responses=ERRORS)
def list_all_transcriptions(
    _admin: AdminDep,
    session: ReadSessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query()] = None,
    status: Annotated[JobStatus | None, Query()] = None,
    code_id: Annotated[str | None, Query()] = None,
) -> ListResponse[TranscriptionOut]:
    """Every job, newest first, optionally for one code or status."""
    return list_jobs(
        session, code_id=code_id, status=status.value if status else None, limit=limit, after=after
    )
