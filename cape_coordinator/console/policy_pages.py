"""The console's policy pages: drafting, validating, reviewing each version, comments.

Moved out of :mod:`.views`, which installs each page group in turn (the order
of installation is the order FastAPI matches paths in).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import (
    JSONResponse,
    Response,
)
from starlette.datastructures import FormData

from cape_pipelines.errors import PolicyError
from cape_pipelines.policy import load_policy
from cape_pipelines.policy.load import _parse_text

from ..errors import ApiError
from ..services.base import Principal
from ..services.policies import canonical_yaml
from ..services.workflow import WorkflowService, plan_for_schema
from .catalog_pages import Route
from .sessions import Session
from .views import Console, _in_review, _int, _Refused, _text, _words


def install(con: Console, get: Route, post: Route, call: Any) -> None:
    """Add this group's pages to the console ``con``."""
    coord = con.coord
    workflow = con.workflow

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
