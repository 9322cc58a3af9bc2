"""/v1/credits: the presented code's balance."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.deps import CodeDep
from gateway.routers.transcriptions import ERRORS
from gateway.schemas import CreditsOut

router = APIRouter(prefix="/v1/credits", tags=["credits"])


@router.get("", response_model=CreditsOut, responses=ERRORS)
def get_credits(code: CodeDep) -> CreditsOut:
    """Budget, reserved, spent and remaining seconds, uses and expiry of your code."""
    return CreditsOut.build(code)
