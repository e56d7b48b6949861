"""The console's catalog page: datasets with their tags, and the pending proposals a reviewer
accepts or rejects (the same service calls and role table as ``/v1/catalog``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from ..errors import ApiError
from ..routers.catalog import CATALOG_ROLES
from .sessions import Session

# A route decorator: takes a path, returns the decorator that registers a page handler.
Route = Callable[[str], Callable[[Callable[..., Any]], Callable[..., Any]]]


def install(con: Any, get: Route, post: Route, call: Any) -> None:
    """Add ``/ui/catalog`` and its two forms to the console ``con``."""
    from .views import _int, _Refused, _text, _words

    catalog = con.coord.catalog

    def need(session: Session, action: str) -> None:
        if session.principal.role not in CATALOG_ROLES[action]:
            raise _Refused(
                403, "Not for your role", f"Your role ({session.principal.role}) may not do this."
            )

    @get("/ui/catalog")
    async def catalog_page(request: Request, session: Session) -> Response:
        need(session, "catalog.read")
        datasets = await call(catalog.list)
        proposals = await call(catalog.proposals, None, "pending")
        can = session.principal.role in CATALOG_ROLES["catalog.decide"]
        return con.page(  # type: ignore[no-any-return]
            request,
            "catalog.html",
            session,
            datasets=datasets,
            proposals=proposals,
            can_decide=can,
        )

    async def decide(request: Request, session: Session, pid: str, accept: bool) -> Response:
        need(session, "catalog.decide")
        form = await con.form(request, session)
        number = _int(pid)
        if number is None or number < 1:
            raise _Refused(404, "Not found", "No such proposal.")
        reason = None if accept else (_text(form, "reason", 2000) or None)
        try:
            info = await call(catalog.decide, session.principal, number, accept, reason)
        except ApiError as exc:
            return con.back(session, "/ui/catalog", "Not decided: " + _words(exc))  # type: ignore[no-any-return]
        verb = "Accepted" if accept else "Rejected"
        message = f"{verb}: {info['tag']} on {info['dataset']}.{info['column']}."
        return con.back(session, "/ui/catalog", message)  # type: ignore[no-any-return]

    @post("/ui/catalog/proposals/{pid}/accept")
    async def proposal_accept(request: Request, session: Session, pid: str) -> Response:
        return await decide(request, session, pid, True)

    @post("/ui/catalog/proposals/{pid}/reject")
    async def proposal_reject(request: Request, session: Session, pid: str) -> Response:
        return await decide(request, session, pid, False)
