"""The audit trail: pipelines post run records; auditors list and verify the chain."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from ..errors import ApiError
from ..metrics import CoordinatorMetrics
from ..schemas import (
    MAX_INT,
    AuditAccepted,
    AuditAnchor,
    AuditBatch,
    AuditEntry,
    PlainText,
    VerifyOut,
)
from ..services.base import AUDIT_WRITER_ROLE, Principal
from ..services.ingest import check_records
from .deps import Coord, checked_time, require

router = APIRouter(prefix="/v1/audit", tags=["audit"])
Auditors = Annotated[Principal, Depends(require("admin", "auditor"))]


@router.post(
    "",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": AuditBatch.model_json_schema()}},
        }
    },
    responses={
        403: {"description": "label_not_allowed or run_not_yours (index, record_id)"},
        409: {"description": "record_conflict (index, record_id)"},
        422: {"description": "record_invalid (index, record_id)"},
    },
)
async def post_audit(
    request: Request,
    coord: Coord,
    p: Annotated[Principal, Depends(require("pipeline", AUDIT_WRITER_ROLE))],
) -> AuditAccepted:
    """Append run records, all or none of the batch. An identical resend of a stored record
    by its sender is acknowledged as a duplicate; a record that cannot be stored or names
    no label is a 422 naming its index, one for another label or another sender's run a
    403, an id its sender stored with other content a 409 (ids are per sender: another
    token's record with the same id is its own). Answered only after the transaction
    holding the batch has committed. The body is read only after the token is checked.
    Pipeline tokens post, and the audit-writer tokens they mint for their workers."""
    metrics: CoordinatorMetrics | None = getattr(request.app.state, "metrics", None)
    started = time.perf_counter()
    raw = await request.body()
    try:
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise ApiError(400, "malformed_json", "request body is not valid JSON") from None
        records = check_records(data, coord.settings.max_batch_records)
        # Preparing the batch is CPU work (no I/O): it stays on the loop, and the commit
        # is awaited without holding a thread.
        done = coord.ingest.submit(p, records)
        result = await asyncio.wrap_future(done)
    except ApiError as exc:
        if metrics is not None:
            metrics.batches_refused.labels(exc.code).inc()
        raise
    if metrics is not None:
        metrics.ingest_seconds.observe(time.perf_counter() - started)
        metrics.records_ingested.inc(len(records))
    return AuditAccepted(**result)


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


@router.get("/anchor")
def anchor(coord: Coord, _p: Auditors) -> AuditAnchor:
    """The chain's signed anchor now (entries, last hash, Ed25519 signature): record it
    outside the coordinator and check later with `cape audit verify --anchor`."""
    return AuditAnchor(**coord.chain.current_anchor())


@router.get("/verify")
def verify(
    request: Request,
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
    metrics: CoordinatorMetrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.observe_verify(result.intact)
    return VerifyOut(**result.__dict__)
