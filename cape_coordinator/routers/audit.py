"""The audit trail: pipelines post run records; auditors list and verify the chain."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from ..errors import ApiError
from ..schemas import MAX_INT, AuditAccepted, AuditBatch, AuditEntry, PlainText, VerifyOut
from ..services.base import Principal
from .deps import Coord, checked_time, require

router = APIRouter(prefix="/v1/audit", tags=["audit"])
Auditors = Annotated[Principal, Depends(require("admin", "auditor"))]


@router.post("")
async def post_audit(
    body: AuditBatch, coord: Coord, p: Annotated[Principal, Depends(require("pipeline"))]
) -> AuditAccepted:
    """Append run records; a record_id already stored is skipped (idempotent).
    Answered only after the transaction holding them has committed."""
    if len(body.records) > coord.settings.max_batch_records:
        raise ApiError(
            413, "batch_too_large", f"at most {coord.settings.max_batch_records} records"
        )
    records = [r.model_dump(mode="json", exclude_unset=True) for r in body.records]
    # Preparing the batch is CPU work (no I/O): it stays on the loop, and the commit
    # is awaited without holding a thread.
    done = coord.ingest.submit(p, records)
    return AuditAccepted(**await asyncio.wrap_future(done))


@router.get("")
def list_audit(
    coord: Coord,
    _p: Auditors,
    run_id: Annotated[str | None, Query(max_length=128, pattern=PlainText)] = None,
    label: Annotated[str | None, Query(max_length=128, pattern=PlainText)] = None,
    event: Annotated[str | None, Query(max_length=64, pattern=PlainText)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    after_seq: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditEntry]:
    """Chain entries in order, filtered by run, label, event and record time [since, until)."""
    rows = coord.ingest.list(
        run_id=run_id,
        label=label,
        event=event,
        since=checked_time(since),
        until=checked_time(until),
        after_seq=after_seq,
        limit=limit,
    )
    return [AuditEntry(**r) for r in rows]


@router.get("/verify")
def verify(
    coord: Coord,
    _p: Auditors,
    expect_seq: Annotated[int | None, Query(ge=1, le=MAX_INT)] = None,
    expect_hash: Annotated[str | None, Query(pattern=r"^[0-9a-f]{64}$")] = None,
) -> VerifyOut:
    """Check the whole chain and its signed anchor (and, optionally, a kept anchor)."""
    if (expect_seq is None) != (expect_hash is None):
        raise ApiError(422, "invalid_request", "give both expect_seq and expect_hash")
    expect = (expect_seq, expect_hash) if expect_seq is not None else None
    result = coord.verify_audit(expect)  # type: ignore[arg-type]
    return VerifyOut(**result.__dict__)
