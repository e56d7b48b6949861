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
"""

from __future__ import annotations

import inspect
import json
import os
import secrets
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from cape_pipelines.errors import PolicyError
from cape_pipelines.policy import load_policy
from cape_pipelines.policy.load import _parse_text

from .. import db
from ..coordinator import Coordinator
from ..errors import ApiError
from ..routers.workflow import may
from ..services.base import Principal
from ..services.policies import canonical_yaml
from ..services.workflow import SCHEMA_TYPES, WorkflowService, plan_for_schema
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
        if principal is not None and principal.role == "pipeline":
            error = "Pipeline tokens cannot sign in to the console."
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

    # ---- policies -----------------------------------------------------------------------

    @get("/ui/policies")
    async def policies(request: Request, session: Session) -> Response:
        con.need(session, "policy.read")

        def gather() -> dict[str, Any]:
            return {
                "labels": coord.policies.labels(),
                "in_review": _in_review(coord, workflow, session.principal),
            }

        return con.page(request, "policies.html", session, **(await call(gather)))

    @get("/ui/policies/new")
    async def policy_new(request: Request, session: Session) -> Response:
        con.need(session, "policy.push")
        request_id = request.query_params.get("request") or ""
        base = request.query_params.get("from") or ""

        def gather() -> dict[str, Any]:
            text, req = "", None
            if request_id:
                try:
                    req = workflow.get_request(session.principal, request_id)
                except ApiError:
                    req = None
            label, _, version = base.rpartition("@")
            if label and _int(version):
                try:
                    doc = coord.policies.info(label, _int(version) or 0, with_document=True)
                    document = dict(doc["document"])
                    document.pop("version", None)
                    text = canonical_yaml(document)
                    req = req or workflow.request_for_version(label, _int(version) or 0)
                except ApiError:
                    text = ""
            if not text:
                text = _starter(req)
            return {"text": text, "req": req, "base": base}

        return con.page(request, "policy_new.html", session, error=None, **(await call(gather)))

    @post("/ui/policies/validate")
    async def policy_validate(request: Request, session: Session) -> Response:
        con.need(session, "policy.push")
        form = await con.form(request, session)
        result = await call(
            _validate,
            workflow,
            session.principal,
            _text(form, "yaml", 200_000),
            _text(form, "request"),
        )
        return JSONResponse(result)

    @post("/ui/policies")
    async def policy_push(request: Request, session: Session) -> Response:
        con.need(session, "policy.push")
        form = await con.form(request, session)
        text, request_id = _text(form, "yaml", 200_000), _text(form, "request")
        base = _text(form, "base")
        try:
            try:
                document = _parse_text(text, None)
            except PolicyError as exc:
                raise ApiError(
                    422,
                    "invalid_policy",
                    "the YAML does not parse",
                    problems=[{"loc": loc, "msg": msg} for loc, msg in exc.problems],
                ) from None
            info = await call(coord.policies.push, session.principal, document)
            if request_id:
                await call(
                    workflow.link_request,
                    session.principal,
                    request_id,
                    info["label"],
                    info["version"],
                )
        except ApiError as exc:
            req = None
            if request_id:
                try:
                    req = await call(workflow.get_request, session.principal, request_id)
                except ApiError:
                    req = None
            return con.page(
                request,
                "policy_new.html",
                session,
                status=exc.status,
                text=text,
                req=req,
                base=base,
                error=_words(exc),
            )
        return con.back(
            session,
            f"/ui/policies/{info['label']}/{info['version']}",
            f"Version {info['version']} of {info['label']} saved as a draft.",
        )

    @get("/ui/policies/{label}")
    async def policy_label(request: Request, session: Session, label: str) -> Response:
        con.need(session, "policy.read")

        def gather() -> dict[str, Any]:
            return {
                "label": label,
                "versions": list(reversed(coord.policies.history(label))),
                "settings": workflow.review_settings(label),
            }

        try:
            ctx = await call(gather)
        except ApiError as exc:
            raise _Refused(exc.status, "Policy not found", _words(exc)) from None
        return con.page(request, "policy_label.html", session, **ctx)

    @post("/ui/policies/{label}/settings")
    async def policy_settings(request: Request, session: Session, label: str) -> Response:
        con.need(session, "review.settings")
        form = await con.form(request, session)
        url = f"/ui/policies/{label}"
        reviewers = [r for r in _text(form, "reviewers").replace(",", " ").split() if r]
        try:
            await call(
                workflow.set_review_settings,
                session.principal,
                label,
                required_approvals=_int(form.get("required_approvals"), 0) or 0,
                reviewers=reviewers,
            )
        except ApiError as exc:
            return con.back(session, url, "Settings not saved: " + _words(exc))
        return con.back(session, url, "Review settings saved.")

    @get("/ui/policies/{label}/{version}")
    async def policy_version(
        request: Request, session: Session, label: str, version: str
    ) -> Response:
        con.need(session, "policy.read")
        number = _int(version)
        if number is None or number < 1:
            raise _Refused(404, "Version not found", "Versions are numbered 1, 2, ...")
        try:
            review = await call(workflow.review, label, number)
        except ApiError as exc:
            raise _Refused(exc.status, "Version not found", _words(exc)) from None
        rules = review["document"].get("rules", [])
        threads = _threads(review["comments"])
        return con.page(
            request,
            "policy_version.html",
            session,
            v=review,
            rules=rules,
            threads=threads,
            label=label,
            version=number,
        )

    async def _act(
        request: Request,
        session: Session,
        label: str,
        version: str,
        action: str,
        fn: Callable[[FormData, int], Any],
        done: str,
    ) -> Response:
        con.need(session, action)
        form = await con.form(request, session)
        number = _int(version, 0) or 0
        url = f"/ui/policies/{label}/{number}"
        try:
            await call(fn, form, number)
        except ApiError as exc:
            return con.back(session, url, "Refused: " + _words(exc))
        return con.back(session, url, done)

    @post("/ui/policies/{label}/{version}/submit")
    async def policy_submit(
        request: Request, session: Session, label: str, version: str
    ) -> Response:
        return await _act(
            request,
            session,
            label,
            version,
            "policy.submit",
            lambda f, n: coord.policies.submit(session.principal, label, n),
            "Sent to review.",
        )

    @post("/ui/policies/{label}/{version}/approve")
    async def policy_approve(
        request: Request, session: Session, label: str, version: str
    ) -> Response:
        return await _act(
            request,
            session,
            label,
            version,
            "policy.approve",
            lambda f, n: workflow.approve(session.principal, label, n),
            "Approved.",
        )

    @post("/ui/policies/{label}/{version}/reject")
    async def policy_reject(
        request: Request, session: Session, label: str, version: str
    ) -> Response:
        return await _act(
            request,
            session,
            label,
            version,
            "policy.reject",
            lambda f, n: coord.policies.reject(session.principal, label, n, _text(f, "reason")),
            "Rejected.",
        )

    @post("/ui/policies/{label}/{version}/request-changes")
    async def policy_changes(
        request: Request, session: Session, label: str, version: str
    ) -> Response:
        return await _act(
            request,
            session,
            label,
            version,
            "policy.request_changes",
            lambda f, n: workflow.request_changes(session.principal, label, n, _text(f, "reason")),
            "Sent back to the author with your request for changes.",
        )

    @post("/ui/policies/{label}/{version}/comment")
    async def policy_comment(
        request: Request, session: Session, label: str, version: str
    ) -> Response:
        def add(f: FormData, n: int) -> Any:
            rule = _text(f, "rule")
            reply = _text(f, "reply_to")
            return workflow.comment(
                session.principal,
                label,
                n,
                _text(f, "body"),
                rule=_int(rule) if rule else None,
                reply_to=_int(reply) if reply else None,
            )

        return await _act(request, session, label, version, "policy.comment", add, "Comment added.")

    @post("/ui/policies/{label}/{version}/assign")
    async def policy_assign(
        request: Request, session: Session, label: str, version: str
    ) -> Response:
        def assign(f: FormData, n: int) -> Any:
            names = _text(f, "reviewers").replace(",", " ").split()
            return workflow.assign(session.principal, label, n, names)

        return await _act(
            request, session, label, version, "policy.assign", assign, "Reviewers assigned."
        )

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


def _starter(req: dict[str, Any] | None) -> str:
    """A first draft for a request: the columns it does not ask for are dropped; the ones it
    needs are left for the author to protect (tokenize, round, ...) rule by rule."""
    if req is None:
        return "label: my-dataset\nrules:\n  - match: {name: email}\n    actions: [drop]\n"
    label = req["dataset"].lower().replace("_", "-")
    needed = [c["name"] for c in req["columns"]]
    unused = [c for c in req["schema"] if c not in needed]
    lines = [f"label: {label}"]
    lines += [
        f"# needed: {json.dumps(c['name'])}: {' '.join(c['need'].split())}" for c in req["columns"]
    ]
    lines.append("rules:")
    if unused:
        lines += [f"  - match: {{names: {json.dumps(unused)}}}", "    actions: [drop]"]
    else:
        lines += [f"  - match: {{name: {json.dumps(needed[0])}}}", "    actions: [drop]"]
    return "\n".join(lines) + "\n"


def _validate(
    workflow: WorkflowService, me: Principal, text: str, request_id: str
) -> dict[str, Any]:
    """The editor's check: problems with their locations, and the plan over the request's
    schema when one is linked."""
    try:
        document = _parse_text(text, None)
        load_policy(document)
    except PolicyError as exc:
        return {
            "valid": False,
            "problems": [{"loc": loc, "msg": msg} for loc, msg in exc.problems],
            "plan": None,
        }
    plan = None
    if request_id:
        try:
            req = workflow.get_request(me, request_id)
            plan = plan_for_schema(document, req["schema"])
        except ApiError:
            plan = None
    return {"valid": True, "problems": [], "plan": plan}


def _threads(comments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Comments as threads: top-level ones, each with its replies (any depth, flattened)."""
    by_id = {c["id"]: {**c, "replies": []} for c in comments}
    roots = []
    for c in by_id.values():
        parent = c["reply_to"]
        while parent is not None and parent in by_id and by_id[parent]["reply_to"] is not None:
            parent = by_id[parent]["reply_to"]
        if parent is not None and parent in by_id:
            by_id[parent]["replies"].append(c)
        else:
            roots.append(c)
    return roots


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
