"""The console's requests: what a data consumer needs, and the author who takes it up.

Moved out of :mod:`.views`, which installs each page group in turn (the order
of installation is the order FastAPI matches paths in).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import (
    Response,
)
from starlette.datastructures import UploadFile

from ..coordinator import Coordinator
from ..errors import ApiError
from ..routers.workflow import may
from ..services.base import Principal
from ..services.workflow import SCHEMA_TYPES
from .catalog_pages import Route
from .sessions import Session
from .views import Console, _int, _Refused, _sample_schema, _text, _words


def install(con: Console, get: Route, post: Route, call: Any) -> None:
    """Add this group's pages to the console ``con``."""
    coord = con.coord
    workflow = con.workflow

    # ---- requests -----------------------------------------------------------------------

    @get("/ui/requests")
    async def requests_page(request: Request, session: Session) -> Response:
        con.need(session, "request.read")
        state = request.query_params.get("state") or None
        rows = await call(workflow.list_requests, session.principal, state)
        return con.page(request, "requests.html", session, rows=rows, state=state)

    @get("/ui/requests/new")
    async def request_new(request: Request, session: Session) -> Response:
        con.need(session, "request.create")
        return con.page(
            request, "request_new.html", session, types=list(SCHEMA_TYPES), values={}, error=None
        )

    @post("/ui/requests")
    async def request_create(request: Request, session: Session) -> Response:
        con.need(session, "request.create")
        form = await con.form(request, session)
        values = {k: _text(form, k) for k in ("dataset", "schema", "purpose", "needs")}
        try:
            schema = _schema_from_form(values["schema"], form.get("sample"))
            needs = _needs_from_form(values["needs"])
            info = await call(
                workflow.create_request,
                session.principal,
                dataset=values["dataset"],
                schema=schema,
                purpose=values["purpose"],
                columns=needs,
            )
        except ApiError as exc:
            return con.page(
                request,
                "request_new.html",
                session,
                status=exc.status,
                types=list(SCHEMA_TYPES),
                values=values,
                error=_words(exc),
            )
        return con.back(session, f"/ui/requests/{info['id']}", f"Request {info['id']} filed.")

    @get("/ui/requests/{request_id}")
    async def request_show(request: Request, session: Session, request_id: str) -> Response:
        con.need(session, "request.read")
        try:
            info = await call(workflow.get_request, session.principal, request_id)
        except ApiError as exc:
            raise _Refused(exc.status, "Request not found", _words(exc)) from None
        mine: list[dict[str, Any]] = []
        if may(session.principal, "request.link"):
            mine = await call(_my_drafts, coord, session.principal)
        return con.page(request, "request_show.html", session, r=info, drafts=mine)

    @post("/ui/requests/{request_id}/decline")
    async def request_decline(request: Request, session: Session, request_id: str) -> Response:
        con.need(session, "request.decline")
        form = await con.form(request, session)
        url = f"/ui/requests/{request_id}"
        try:
            await call(
                workflow.decline_request, session.principal, request_id, _text(form, "reason")
            )
        except ApiError as exc:
            return con.back(session, url, "Not declined: " + _words(exc))
        return con.back(session, url, "Request declined.")

    @post("/ui/requests/{request_id}/link")
    async def request_link(request: Request, session: Session, request_id: str) -> Response:
        con.need(session, "request.link")
        form = await con.form(request, session)
        url = f"/ui/requests/{request_id}"
        label, _, version = _text(form, "version").rpartition("@")
        try:
            await call(
                workflow.link_request, session.principal, request_id, label, _int(version, 0) or 0
            )
        except ApiError as exc:
            return con.back(session, url, "Not linked: " + _words(exc))
        return con.back(session, url, f"Linked to {label} version {version}.")


def _my_drafts(coord: Coordinator, me: Principal) -> list[dict[str, Any]]:
    out = []
    for item in coord.policies.labels():
        for v in coord.policies.history(item["label"]):
            if v["author"] == me.name and v["state"] in ("draft", "in_review"):
                out.append(v)
    return out


def _schema_from_form(text: str, sample: Any) -> dict[str, str]:
    """``column: type`` lines, or the schema of an uploaded sample file (its data unused)."""
    if isinstance(sample, UploadFile) and sample.filename:
        return _sample_schema(sample)
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, sep, kind = line.rpartition(":")
        if not sep or not name.strip():
            raise ApiError(422, "invalid_schema", f"schema line {n}: write COLUMN: TYPE")
        out[name.strip()] = kind.strip()
    if not out:
        raise ApiError(422, "schema_required", "give the dataset's columns, or a sample file")
    return out


def _needs_from_form(text: str) -> list[dict[str, str]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, sep, why = line.partition(":")
        if not sep:
            raise ApiError(422, "need_required", f"needed columns line {n}: write COLUMN: WHY")
        out.append({"name": name.strip(), "need": why.strip()})
    return out
