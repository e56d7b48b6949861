"""The coordinator's HTTP API: a FastAPI app mounting one router per service.

Every ``/v1`` endpoint takes ``Authorization: Bearer TOKEN`` and names the roles
it admits (see ``docs/coordinator/roles.md``). Errors are JSON
``{"error": {"code", "message", ...}}`` with a stable ``code``; request data and
key material are never echoed, and no response carries a stack trace. Request
bodies are limited in size before they are read. The OpenAPI spec is at
``/openapi.json``. The routes live in :mod:`cape_coordinator.routers`, the
request and response models in :mod:`cape_coordinator.schemas`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .console import mount_console
from .coordinator import Coordinator
from .errors import ApiError
from .metrics import CoordinatorMetrics
from .routers import ROUTERS
from .schemas import ErrorBody

log = logging.getLogger("cape_coordinator.app")


# ---- plumbing ----------------------------------------------------------------------------


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _send_json(send, 413, _too_large(self.limit))
            return
        state = {"received": 0, "exceeded": False, "replaced": False}

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.limit:
                    state["exceeded"] = True
                    raise _TooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            if state["exceeded"]:
                if message["type"] == "http.response.start" and not state["replaced"]:
                    state["replaced"] = True
                    await _send_json(send, 413, _too_large(self.limit))
                return
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            if not state["replaced"]:
                await _send_json(send, 413, _too_large(self.limit))


class AuthFirst:
    """Checks the bearer token of a ``/v1`` request that carries a body before a byte of
    the body is read: an unauthenticated client cannot make the server receive, buffer
    or parse megabytes (the routes check roles again, as before)."""

    def __init__(self, app: ASGIApp, coordinator: Coordinator):
        self.app = app
        self.tokens = coordinator.tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in ("POST", "PUT", "PATCH")
            or not str(scope.get("path", "")).startswith("/v1/")
        ):
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.decode("latin-1").partition(" ")
        try:
            if scheme.lower() != "bearer" or not token.strip():
                raise ApiError(401, "unauthenticated", "send Authorization: Bearer <token>")
            if self.tokens.cached_principal(token.strip()) is None:
                await run_in_threadpool(self.tokens.authenticate, token.strip())
        except ApiError as exc:
            await _send_json(send, exc.status, exc.body(), auth=True)
            return
        await self.app(scope, receive, send)


class _TooLarge(Exception):
    pass


def _too_large(limit: int) -> dict[str, Any]:
    return {"error": {"code": "payload_too_large", "message": f"request body over {limit} bytes"}}


async def _send_json(send: Send, status: int, body: dict[str, Any], auth: bool = False) -> None:
    payload = JSONResponse(body).body
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"connection", b"close"),
    ]
    if auth:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 409, 413, 422)
}


def _problems(exc: RequestValidationError) -> list[dict[str, str]]:
    out = []
    for err in exc.errors()[:50]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        out.append({"loc": loc, "msg": str(err.get("msg", "invalid"))[:200]})
    return out


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        body: dict[str, Any]
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            body = {
                "error": {"code": "malformed_json", "message": "request body is not valid JSON"}
            }
            return JSONResponse(body, status_code=400)
        body = {
            "error": {
                "code": "invalid_request",
                "message": "request does not match the API",
                "problems": _problems(exc),
            }
        }
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI raises 400 only when a body cannot be parsed (bad encoding, too deep).
        codes = {404: "not_found", 405: "method_not_allowed", 400: "malformed_json"}
        code = codes.get(exc.status_code, "http_error")
        message = {
            404: "no such endpoint",
            405: "method not allowed",
            400: "request body is not valid JSON",
        }.get(exc.status_code, "request refused")
        return JSONResponse(
            {"error": {"code": code, "message": message}},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(UnicodeError)
    async def bad_text(_request: Request, _exc: UnicodeError) -> JSONResponse:
        body = {"error": {"code": "invalid_text", "message": "text is not valid Unicode"}}
        return JSONResponse(body, status_code=422)

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        # The type only: messages of driver errors can quote request data.
        log.error("internal error: %s", type(exc).__name__)
        body = {"error": {"code": "internal", "message": "internal error"}}
        return JSONResponse(body, status_code=500)


# ---- the app -----------------------------------------------------------------------------


def create_app(coordinator: Coordinator) -> FastAPI:
    """The ASGI app serving ``coordinator`` (size limit and error handling included)."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # The audit sinks deliver and the orchestrator poller polls while the app serves
        # (their threads never block a request; docs/monitoring/sinks.md, docs/orchestrators.md).
        coordinator.delivery.start()
        coordinator.orchestrators.start()
        try:
            yield
        finally:
            await run_in_threadpool(coordinator.orchestrators.stop)
            await run_in_threadpool(coordinator.delivery.stop)

    app = FastAPI(
        lifespan=lifespan,
        title="Cape coordinator",
        version="1",
        description="Reviewed, signed policies; keys; one tamper-evident audit trail per run.",
        responses=_ERRORS,
        docs_url="/docs" if coordinator.settings.api_docs else None,
        redoc_url="/redoc" if coordinator.settings.api_docs else None,
        openapi_url="/openapi.json" if coordinator.settings.api_docs else None,
    )
    app.state.coordinator = coordinator
    app.state.metrics = CoordinatorMetrics(coordinator)
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=coordinator.settings.max_body_bytes)
    # Added last, so it runs first: no body is read for a request without a valid token.
    app.add_middleware(AuthFirst, coordinator=coordinator)
    for router in ROUTERS:
        app.include_router(router)
    mount_console(app)
    return app
