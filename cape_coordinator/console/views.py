"""The console's pages and forms under ``/ui``.

Every page needs a live session (see :mod:`.sessions`) and checks its role
against :data:`~cape_coordinator.workflow_api.ROLE_MATRIX`, the table the API's
own dependencies use. Every form carries the session's CSRF token and a POST
without it (or with another session's) is refused with 403 before anything is
read or stored; a request from another origin is refused too. Every response
under ``/ui`` carries a Content-Security-Policy with no inline script or style
and ``frame-ancestors 'none'``, ``X-Frame-Options: DENY``, ``nosniff``, no
referrer and ``Cache-Control: no-store``. A refused action is shown as the
API's error code with its meaning in words, on the page the user was on.

This module holds what every page shares (the :class:`Console`, the session
wrapper, the route decorators, sign-in and home); the page groups are their own
modules (:mod:`.request_pages`, :mod:`.policy_pages`, :mod:`.run_pages`,
:mod:`.admin_pages`, :mod:`.catalog_pages`), installed in that order.
"""

from __future__ import annotations

import inspect
import os
import secrets
import tempfile
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import (
    HTMLResponse,
    RedirectResponse,
    Response,
)
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from .. import db
from ..coordinator import Coordinator
from ..errors import ApiError
from ..routers.workflow import may
from ..services.base import LABELLED_ROLES, Principal
from ..services.workflow import WorkflowService
from .sessions import COOKIE, ENDED, SIGNIN_COOKIE, Session, SessionEnded, SessionStore, csrf_ok

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: with no-referrer Chromium sends "Origin: null" on our own
    # form posts, which the origin check must refuse.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}
PAGE_SIZE = 50

# The API's error codes in words (the code is shown beside them).
ERROR_WORDS = {
    "unauthenticated": "That token is not valid.",
    "token_revoked": "That token has been revoked.",
    "token_expired": "That token has expired.",
    "forbidden": "Your role may not do this.",
    "self_approval": "You wrote this version, so you cannot approve it or review it.",
    "not_assigned": "Other reviewers are assigned to this version.",
    "already_approved": "You have already approved this version.",
    "invalid_state": "This cannot be done in the item's current state.",
    "invalid_policy": "The policy has problems; see the list.",
    "inline_key": "The policy holds key material; refer to keys as {secret: NAME}.",
    "not_found": "That item does not exist.",
    "not_author": "Only the version's author may do this.",
    "unknown_reviewer": "There is no reviewer token with that name.",
    "author_as_reviewer": "The author cannot review their own version.",
    "reason_required": "Give a reason.",
    "comment_empty": "Write a comment first.",
    "unknown_rule": "That rule does not exist in this version.",
    "invalid_schema": "A column's type is not one the console knows.",
    "unknown_column": "A needed column is not in the dataset's schema.",
    "already_revoked": "That token is already revoked.",
    "key_exists": "A key of that name exists; rotate it instead.",
    "labels_required": "A pipeline token needs at least one label.",
    "labels_not_allowed": "Only pipeline tokens take labels.",
    "too_few_reviewers": "Name at least as many default reviewers as approvals required.",
}
ROLE_NOTES = {
    "requester": "File requests for data and follow them.",
    "author": "Draft policies for requests and send them to review.",
    "reviewer": "Review versions: comment, request changes, approve or reject.",
    "auditor": "Follow runs and the audit trail; verify the chain.",
    "admin": "Manage tokens, keys and review settings; read runs and the audit trail.",
}


class _Refused(Exception):
    def __init__(self, status: int, title: str, message: str):
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


def _words(exc: ApiError) -> str:
    meaning = ERROR_WORDS.get(exc.code)
    text = f"{meaning} ({exc.code}: {exc.message})" if meaning else f"{exc.message} ({exc.code})"
    problems = exc.details.get("problems") or []
    if problems:
        text += " " + "; ".join(f"{p['loc']}: {p['msg']}" for p in problems[:10])
    return text


def _when(value: str | None) -> str:
    if not value:
        return ""
    try:
        return db.parse_time(value).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return value


def _state_words(state: str | None) -> str:
    """A state as people say it (``returned`` is the version sent back with changes asked)."""
    if state == "returned":
        return "changes requested"
    return (state or "").replace("_", " ")


class Console:
    """The console's state: the coordinator, the workflow, sessions and templates."""

    def __init__(self, coord: Coordinator, workflow: WorkflowService):
        self.coord = coord
        self.workflow = workflow
        settings = coord.settings
        self.sessions = SessionStore(
            coord,
            getattr(settings, "console_idle_seconds", 1800),
            getattr(settings, "console_absolute_seconds", 43200),
        )
        self.env = Environment(
            loader=PackageLoader("cape_coordinator.console", "templates"),
            autoescape=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["when"] = _when
        self.env.filters["words"] = _state_words
        self.env.globals["may"] = may

    # ---- responses ----------------------------------------------------------------------

    def page(
        self,
        request: Request,
        template: str,
        session: Session | None,
        status: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        html = self.env.get_template(template).render(
            request=request,
            session=session,
            me=session.principal if session else None,
            flash=context.pop("flash", None) or (session.flash if session else None),
            path=request.url.path,
            **context,
        )
        return HTMLResponse(html, status_code=status)

    def refused(self, request: Request, session: Session | None, exc: _Refused) -> HTMLResponse:
        return self.page(
            request,
            "refused.html",
            session,
            status=exc.status,
            title=exc.title,
            message=exc.message,
        )

    def back(self, session: Session, url: str, message: str | None = None) -> RedirectResponse:
        if message:
            self.sessions.flash(session, message)
        return RedirectResponse(url, status_code=303)

    # ---- sessions and forms -------------------------------------------------------------

    def session(self, request: Request) -> Session:
        return self.sessions.load(request.cookies.get(COOKIE))

    async def form(self, request: Request, session: Session) -> FormData:
        """The POSTed form, after the origin and CSRF checks."""
        _same_origin(request)
        form = await request.form()
        sent = form.get("csrf")
        if not csrf_ok(session, sent if isinstance(sent, str) else None):
            raise _Refused(
                403,
                "Form refused",
                "This form did not come from your console session (the CSRF check failed). "
                "Reload the page and try again.",
            )
        return form

    def need(self, session: Session, action: str) -> None:
        if not may(session.principal, action):
            raise _Refused(
                403,
                "Not for your role",
                f"Your role ({session.principal.role}) may not open this page.",
            )


def _same_origin(request: Request) -> None:
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        # Browsers send Origin with every cross-site POST; its absence means same-site or
        # a non-browser client, which the CSRF token still has to satisfy.
        if origin == "null":
            raise _Refused(403, "Form refused", "Forms from an opaque origin are refused.")
        return
    host = request.headers.get("host", "")
    if origin.split("://", 1)[-1] != host:
        raise _Refused(403, "Form refused", "This form was sent from another site.")


def _text(form: FormData, name: str, limit: int = 8000) -> str:
    value = form.get(name)
    return value.strip()[:limit] if isinstance(value, str) else ""


def _int(value: Any, default: int | None = None) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return default


def install(app: FastAPI) -> None:
    """Add ``/ui`` to ``app``."""
    coord: Coordinator = app.state.coordinator
    workflow: WorkflowService = coord.workflow
    con = Console(coord, workflow)
    app.state.console = con
    static = resources.files("cape_coordinator.console") / "static"
    app.mount("/ui/static", StaticFiles(directory=str(static)), name="console-static")

    @app.middleware("http")
    async def headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        if request.url.path == "/ui" or request.url.path.startswith("/ui/"):
            for k, v in SECURITY_HEADERS.items():
                response.headers.setdefault(k, v)
            if request.url.path.startswith("/ui/static/"):
                response.headers["Cache-Control"] = "max-age=300"
        return response

    def view(
        handler: Callable[..., Awaitable[Response]],
    ) -> Callable[..., Awaitable[Response]]:
        """Wrap a page: a live session or the sign-in page; refusals rendered in words."""

        async def wrapped(request: Request, **kwargs: Any) -> Response:
            try:
                session = await run_in_threadpool(con.session, request)
            except SessionEnded as ended:
                target = "/ui/signin"
                if ended.reason:
                    target += "?" + urlencode({"ended": ended.reason})
                response = RedirectResponse(target, status_code=303)
                response.delete_cookie(COOKIE, path="/ui")
                return response
            try:
                return await handler(request, session, **kwargs)
            except _Refused as exc:
                return con.refused(request, session, exc)
            except ApiError as exc:
                # Any refusal a page did not expect is still shown in words, as a page.
                return con.refused(request, session, _Refused(exc.status, "Refused", _words(exc)))

        # FastAPI reads the path parameters from the signature: the handler's, less session.
        sig = inspect.signature(handler)
        wrapped.__signature__ = sig.replace(  # type: ignore[attr-defined]
            parameters=[p for name, p in sig.parameters.items() if name != "session"]
        )
        wrapped.__name__ = handler.__name__
        wrapped.__doc__ = handler.__doc__
        return wrapped

    def get(path: str) -> Callable[..., Any]:
        def deco(fn: Callable[..., Awaitable[Response]]) -> Any:
            app.add_api_route(
                path,
                view(fn),
                methods=["GET"],
                include_in_schema=False,
                response_class=HTMLResponse,
            )
            return fn

        return deco

    def post(path: str) -> Callable[..., Any]:
        def deco(fn: Callable[..., Awaitable[Response]]) -> Any:
            app.add_api_route(path, view(fn), methods=["POST"], include_in_schema=False)
            return fn

        return deco

    async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await run_in_threadpool(fn, *args, **kwargs)

    # ---- sign-in ------------------------------------------------------------------------

    @app.get("/ui", include_in_schema=False)
    async def ui_root(request: Request) -> Response:
        return RedirectResponse("/ui/home", status_code=303)

    @app.get("/ui/signin", include_in_schema=False)
    async def signin_page(request: Request, error: str | None = None) -> Response:
        nonce = secrets.token_urlsafe(24)
        ended = ENDED.get(request.query_params.get("ended") or "")
        response = con.page(request, "signin.html", None, csrf=nonce, error=None, ended=ended)
        response.set_cookie(
            SIGNIN_COOKIE,
            nonce,
            path="/ui",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @app.post("/ui/signin", include_in_schema=False)
    async def signin(request: Request) -> Response:
        try:
            _same_origin(request)
        except _Refused as exc:
            return con.refused(request, None, exc)
        form = await request.form()
        sent, cookie = form.get("csrf"), request.cookies.get(SIGNIN_COOKIE)
        if not (isinstance(sent, str) and cookie and secrets.compare_digest(sent, cookie)):
            return con.refused(
                request,
                None,
                _Refused(403, "Form refused", "The sign-in form expired. Reload it and try again."),
            )
        token = form.get("token")
        error = None
        principal: Principal | None = None
        if not isinstance(token, str) or not token.strip():
            error = "Paste your API token."
        else:
            try:
                principal = await call(coord.tokens.authenticate, token.strip())
            except ApiError as exc:
                error = _words(exc)
        if principal is not None and principal.role in LABELLED_ROLES:
            error = f"{principal.role.capitalize()} tokens cannot sign in to the console."
            principal = None
        if principal is None:
            nonce = secrets.token_urlsafe(24)
            response = con.page(request, "signin.html", None, status=401, csrf=nonce, error=error)
            response.set_cookie(SIGNIN_COOKIE, nonce, path="/ui", httponly=True, samesite="strict")
            return response
        session_id = await call(con.sessions.create, principal)
        done = RedirectResponse("/ui/home", status_code=303)
        done.set_cookie(
            COOKIE,
            session_id,
            path="/ui",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        done.delete_cookie(SIGNIN_COOKIE, path="/ui")
        return done

    @post("/ui/signout")
    async def signout(request: Request, session: Session) -> Response:
        await con.form(request, session)
        await call(con.sessions.end, session)
        response = RedirectResponse("/ui/signin", status_code=303)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    # ---- home ---------------------------------------------------------------------------

    @get("/ui/home")
    async def home(request: Request, session: Session) -> Response:
        me = session.principal

        def gather() -> dict[str, Any]:
            out: dict[str, Any] = {"note": ROLE_NOTES.get(me.role, "")}
            if may(me, "request.read"):
                reqs = workflow.list_requests(me)
                out["open_requests"] = [
                    r for r in reqs if r["state"] not in ("fulfilled", "declined")
                ]
            if may(me, "policy.read"):
                out["in_review"] = _in_review(coord, workflow, me)
            if may(me, "runs.read"):
                runs = coord.runs.list(limit=200)
                out["attention"] = [r for r in runs if r["status"] in ("lost", "failed")][:10]
            return out

        return con.page(request, "home.html", session, **(await call(gather)))

    from .admin_pages import install as install_admin_pages
    from .policy_pages import install as install_policy_pages
    from .request_pages import install as install_request_pages
    from .run_pages import install as install_run_pages

    install_request_pages(con, get, post, call)
    install_policy_pages(con, get, post, call)
    install_run_pages(con, get, post, call)
    install_admin_pages(con, get, post, call)

    from .catalog_pages import install as install_catalog

    install_catalog(con, get, post, call)


# ---- helpers ----------------------------------------------------------------------------


def _in_review(
    coord: Coordinator, workflow: WorkflowService, me: Principal
) -> list[dict[str, Any]]:
    """Versions in review (and drafts of the caller's), with their review state."""
    out = []
    for item in coord.policies.labels():
        for v in coord.policies.history(item["label"]):
            mine = v["author"] == me.name
            # A returned version stays on its author's list until a newer version follows it.
            waiting = v["state"] == "draft" or (
                v["state"] == "returned" and v["version"] == item["latest"]
            )
            if v["state"] == "in_review" or (mine and waiting):
                state = workflow.review_state(v["label"], v["version"])
                out.append(
                    {
                        **v,
                        "reviewers": state["reviewers"],
                        "approvals": state["approvals"],
                        "required": state["required_approvals"],
                        "for_me": me.name in state["reviewers"],
                    }
                )
    return out


def _sample_schema(upload: UploadFile) -> dict[str, str]:
    from ..workflow_cli import schema_from_sample

    suffix = Path(upload.filename or "sample.csv").suffix.lower()
    if suffix not in (".csv", ".parquet", ".json", ".jsonl"):
        raise ApiError(422, "invalid_sample", "a sample must be a .csv, .parquet or .jsonl file")
    fd, name = tempfile.mkstemp(suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(upload.file.read())
        try:
            return schema_from_sample(name)
        except Exception as exc:  # the reader's own errors, named by type only
            raise ApiError(
                422, "invalid_sample", f"cannot read the sample file ({type(exc).__name__})"
            ) from None
    finally:
        os.unlink(name)
