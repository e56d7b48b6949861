"""The console's administration: pipeline tokens and keys (admins only).

Moved out of :mod:`.views`, which installs each page group in turn (the order
of installation is the order FastAPI matches paths in).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import (
    Response,
)

from ..errors import ApiError
from .catalog_pages import Route
from .sessions import Session
from .views import Console, _int, _text, _words


def install(con: Console, get: Route, post: Route, call: Any) -> None:
    """Add this group's pages to the console ``con``."""
    coord = con.coord

    # ---- admin --------------------------------------------------------------------------

    @get("/ui/admin/tokens")
    async def tokens_page(request: Request, session: Session) -> Response:
        con.need(session, "tokens.manage")
        rows = await call(coord.tokens.list)
        return con.page(request, "tokens.html", session, rows=rows, created=None, error=None)

    @post("/ui/admin/tokens")
    async def token_create(request: Request, session: Session) -> Response:
        con.need(session, "tokens.manage")
        form = await con.form(request, session)
        labels = _text(form, "labels").replace(",", " ").split()
        expires = _int(_text(form, "expires_days")) if _text(form, "expires_days") else None
        created, error = None, None
        try:
            info, token = await call(
                coord.create_token,
                session.principal,
                name=_text(form, "name"),
                role=_text(form, "role"),
                labels=labels,
                expires_in=expires * 86400 if expires is not None else None,
            )
            created = {**info, "token": token}
        except ApiError as exc:
            error = _words(exc)
        rows = await call(coord.tokens.list)
        return con.page(
            request,
            "tokens.html",
            session,
            status=201 if created else 422,
            rows=rows,
            created=created,
            error=error,
        )

    @post("/ui/admin/tokens/{token_id}/revoke")
    async def token_revoke(request: Request, session: Session, token_id: str) -> Response:
        con.need(session, "tokens.manage")
        await con.form(request, session)
        try:
            info = await call(coord.tokens.revoke, session.principal, token_id)
        except ApiError as exc:
            return con.back(session, "/ui/admin/tokens", "Not revoked: " + _words(exc))
        return con.back(
            session, "/ui/admin/tokens", f"Token {info['id']} ({info['name']}) revoked."
        )

    @get("/ui/admin/keys")
    async def keys_page(request: Request, session: Session) -> Response:
        con.need(session, "keys.read")
        rows = await call(coord.secrets.list)
        return con.page(request, "keys.html", session, rows=rows)

    @post("/ui/admin/keys")
    async def key_create(request: Request, session: Session) -> Response:
        con.need(session, "keys.manage")
        form = await con.form(request, session)
        labels = _text(form, "labels").replace(",", " ").split()
        name = _text(form, "name")
        try:
            await call(coord.secrets.create, session.principal, name, labels)
        except ApiError as exc:
            return con.back(session, "/ui/admin/keys", "Key not created: " + _words(exc))
        return con.back(session, "/ui/admin/keys", f"Key {name} created.")

    @post("/ui/admin/keys/{name}/rotate")
    async def key_rotate(request: Request, session: Session, name: str) -> Response:
        con.need(session, "keys.manage")
        await con.form(request, session)
        try:
            info = await call(coord.secrets.rotate, session.principal, name)
        except ApiError as exc:
            return con.back(session, "/ui/admin/keys", "Not rotated: " + _words(exc))
        return con.back(
            session, "/ui/admin/keys", f"Key {name} rotated: version {info['current']} is current."
        )
