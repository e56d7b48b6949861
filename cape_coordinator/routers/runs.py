"""Pipeline runs (admin, auditor): running, succeeded, failed, lost."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query

from ..schemas import PlainText, RunInfo
from ..services.base import Principal
from .deps import Coord, require

router = APIRouter(prefix="/v1/runs", tags=["runs"])


@router.get("")
def list_runs(
    coord: Coord,
    _p: Annotated[Principal, Depends(require("admin", "auditor"))],
    status: Literal["running", "succeeded", "failed", "lost"] | None = None,
    label: Annotated[str | None, Query(max_length=128, pattern=PlainText)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[RunInfo]:
    """Pipeline runs, newest activity first, each with the orchestrator applications
    (Spark, YARN, Airflow) it was linked to."""
    rows = coord.orchestrators.attach(coord.runs.list(status=status, label=label, limit=limit))
    return [RunInfo(**r) for r in rows]
