"""Orchestrator endpoints (admin, auditor): what the coordinator polls and how it went."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from ..services.base import Principal
from .deps import Coord, require

router = APIRouter(prefix="/v1/orchestrators", tags=["runs"])


@router.get("")
def list_orchestrators(
    coord: Coord,
    _p: Annotated[Principal, Depends(require("admin", "auditor"))],
) -> list[dict[str, Any]]:
    """The configured endpoints (never their credentials) and each one's last poll."""
    return coord.orchestrators.endpoints_view()
