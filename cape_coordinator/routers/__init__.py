"""The HTTP API's routers, one per service; :func:`cape_coordinator.app.create_app` mounts
them in :data:`ROUTERS` order."""

from __future__ import annotations

from . import audit, catalog, keys, meta, metrics, orchestrators, policies, runs, tokens, workflow

ROUTERS = (
    meta.router,
    tokens.router,
    policies.router,
    workflow.router,
    keys.router,
    audit.router,
    runs.router,
    catalog.router,
    metrics.router,
    orchestrators.router,
)

__all__ = ["ROUTERS"]
