"""``GET /metrics``: the coordinator's Prometheus metrics (see :mod:`cape_coordinator.metrics`).

Off unless protected: 404 when no metrics token is configured or when metrics are
served on their own bind address; otherwise 401 without the metrics token.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from ..errors import ApiError
from ..metrics import CONTENT_TYPE, CoordinatorMetrics, metrics_token_hash, token_matches
from .deps import Coord

router = APIRouter(tags=["monitoring"])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, coord: Coord) -> Response:
    """The metrics in Prometheus text format, for a scrape carrying the metrics token."""
    registry: CoordinatorMetrics | None = getattr(request.app.state, "metrics", None)
    expected = metrics_token_hash(coord.settings.metrics_token_sha256)
    if registry is None or coord.settings.metrics_bind or expected is None:
        raise ApiError(404, "not_found", "no such endpoint")
    if not token_matches(request.headers.get("authorization"), expected):
        raise ApiError(401, "unauthenticated", "send Authorization: Bearer <metrics token>")
    # The database figures are queries: off the event loop.
    body = await run_in_threadpool(registry.render)
    return Response(content=body, media_type=CONTENT_TYPE)
