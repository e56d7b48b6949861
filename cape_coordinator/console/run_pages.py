"""The console's runs and audit pages: runs with their chart, one run, audit search, export.

Moved out of :mod:`.views`, which installs each page group in turn (the order
of installation is the order FastAPI matches paths in).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import (
    Response,
    StreamingResponse,
)
from sqlalchemy import select

from .. import db
from ..coordinator import Coordinator
from .catalog_pages import Route
from .sessions import Session
from .views import PAGE_SIZE, Console, _int, _Refused


def install(con: Console, get: Route, post: Route, call: Any) -> None:
    """Add this group's pages to the console ``con``."""
    coord = con.coord

    # ---- runs ---------------------------------------------------------------------------

    @get("/ui/runs")
    async def runs_page(request: Request, session: Session) -> Response:
        con.need(session, "runs.read")
        q = request.query_params
        filters = {
            "status": q.get("status") or "",
            "label": q.get("label") or "",
            "engine": q.get("engine") or "",
            "since": q.get("since") or "",
            "until": q.get("until") or "",
        }

        def gather() -> dict[str, Any]:
            status = (
                filters["status"]
                if filters["status"] in ("running", "succeeded", "failed", "lost")
                else None
            )
            rows = coord.runs.list(status=status, label=filters["label"] or None, limit=1000)
            every = coord.runs.list(limit=1000)
            engines = sorted({r["engine"] for r in every if r["engine"]})
            labels = sorted({r["label"] for r in every if r["label"]})
            rows = _filter_runs(rows, filters)
            coord.orchestrators.attach(rows[:200])
            return {
                "rows": rows[:200],
                "total": len(rows),
                "engines": engines,
                "labels": labels,
                "chart": _chart(rows),
                "lost": [r for r in every if r["status"] == "lost"],
            }

        return con.page(request, "runs.html", session, filters=filters, **(await call(gather)))

    @get("/ui/runs/{run_id}")
    async def run_show(request: Request, session: Session, run_id: str) -> Response:
        con.need(session, "runs.read")

        def gather() -> dict[str, Any] | None:
            run = _run(coord, run_id)
            if run is None:
                return None
            records = coord.list_audit(run_id=run_id, limit=1000)
            columns: dict[str, Any] = {}
            for entry in records:
                rec = entry.get("record", {})
                if rec.get("event") in ("run.completed", "run.failed") and isinstance(
                    rec.get("columns"), dict
                ):
                    columns = rec["columns"]
            return {"run": run, "records": records, "columns": columns}

        ctx = await call(gather)
        if ctx is None:
            raise _Refused(404, "Run not found", f"No run {run_id} has reported.")
        return con.page(request, "run_show.html", session, **ctx)

    # ---- audit --------------------------------------------------------------------------

    @get("/ui/audit")
    async def audit_page(request: Request, session: Session) -> Response:
        con.need(session, "audit.read")
        q = request.query_params
        filters = {k: (q.get(k) or "") for k in ("run_id", "label", "event", "since", "until")}
        after = _int(q.get("after"), 0) or 0
        try:
            kwargs = _audit_filters(filters)
        except ValueError as exc:
            raise _Refused(422, "Filter not understood", str(exc)) from None

        def gather() -> dict[str, Any]:
            rows = coord.list_audit(after_seq=after, limit=PAGE_SIZE + 1, **kwargs)
            verify = coord.verify_audit()
            return {
                "rows": rows[:PAGE_SIZE],
                "more": len(rows) > PAGE_SIZE,
                "verify": verify,
            }

        ctx = await call(gather)
        query = {k: v for k, v in filters.items() if v}
        next_url = None
        if ctx["more"]:
            next_url = "/ui/audit?" + urlencode({**query, "after": ctx["rows"][-1]["seq"]})
        export_url = "/ui/audit/export.jsonl" + ("?" + urlencode(query) if query else "")
        return con.page(
            request,
            "audit.html",
            session,
            filters=filters,
            after=after,
            next_url=next_url,
            export_url=export_url,
            first_url="/ui/audit?" + urlencode(query),
            **ctx,
        )

    @get("/ui/audit/export.jsonl")
    async def audit_export(request: Request, session: Session) -> Response:
        con.need(session, "audit.read")
        q = request.query_params
        filters = {k: (q.get(k) or "") for k in ("run_id", "label", "event", "since", "until")}
        try:
            kwargs = _audit_filters(filters)
        except ValueError as exc:
            raise _Refused(422, "Filter not understood", str(exc)) from None

        def lines() -> Iterator[str]:
            after = 0
            while True:
                rows = coord.list_audit(after_seq=after, limit=1000, **kwargs)
                for row in rows:
                    yield json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n"
                if len(rows) < 1000:
                    return
                after = rows[-1]["seq"]

        # Streamed page by page (the generator runs in the thread pool), never held whole.
        return StreamingResponse(
            lines(),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": 'attachment; filename="cape-audit.jsonl"'},
        )


def _filter_runs(rows: list[dict[str, Any]], filters: dict[str, str]) -> list[dict[str, Any]]:
    out = rows
    if filters["engine"]:
        out = [r for r in out if r["engine"] == filters["engine"]]
    bounds: tuple[tuple[str, Callable[[str, str], bool]], ...] = (
        ("since", lambda t, b: t >= b),
        ("until", lambda t, b: t < b),
    )
    for key, keep in bounds:
        if filters[key]:
            try:
                bound = db.format_time(db.parse_time(filters[key]))
            except ValueError:
                raise _Refused(
                    422, "Filter not understood", f"{key}: give a date like 2026-11-30"
                ) from None
            out = [r for r in out if r["started_at"] and keep(r["started_at"], bound)]
    return out


def _chart(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows processed and failures per time bucket, for two server-drawn SVG bar charts."""
    timed = [r for r in rows if r["started_at"]]
    if not timed:
        return {"buckets": []}
    times = sorted(db.parse_time(r["started_at"]) for r in timed)
    span = max(times[-1] - times[0], timedelta(hours=1))
    n = 12
    step = span / n
    start = times[0]
    buckets: list[dict[str, Any]] = [
        {"start": start + step * i, "rows": 0, "failures": 0, "runs": 0} for i in range(n + 1)
    ]
    for r in timed:
        i = min(int((db.parse_time(r["started_at"]) - start) / step), n)
        b = buckets[i]
        b["runs"] += 1
        b["rows"] += r["rows_in"] or 0
        if r["status"] in ("failed", "lost"):
            b["failures"] += 1
    top_rows = max(b["rows"] for b in buckets) or 1
    top_fail = max(b["failures"] for b in buckets) or 1
    width = 600 / len(buckets)
    for i, b in enumerate(buckets):
        b["x"] = round(i * width + 2, 1)
        b["w"] = round(width - 4, 1)
        b["rows_h"] = round(140 * b["rows"] / top_rows, 1)
        b["fail_h"] = round(140 * b["failures"] / top_fail, 1)
        b["label"] = b["start"].astimezone(UTC).strftime("%m-%d %H:%M")
    return {"buckets": buckets, "top_rows": top_rows, "top_fail": top_fail}


def _run(coord: Coordinator, run_id: str) -> dict[str, Any] | None:
    with coord.engine.connect() as conn:
        row = conn.execute(select(db.runs).where(db.runs.c.run_id == run_id)).mappings().first()
    if row is None:
        return None
    item = dict(row)
    cutoff = db.format_time(
        datetime.now(UTC) - timedelta(seconds=coord.settings.lost_after_seconds)
    )
    if item["status"] == "running" and item["last_seen"] < cutoff:
        item["status"] = "lost"
    coord.orchestrators.attach([item])
    return item


def _audit_filters(filters: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("run_id", "label", "event"):
        if filters[key]:
            out[key] = filters[key][:128]
    for key in ("since", "until"):
        if filters[key]:
            try:
                out[key] = db.parse_time(filters[key])
            except ValueError:
                raise ValueError(
                    f"{key}: give a date like 2026-11-30 or 2026-11-30T12:00Z"
                ) from None
    return out
