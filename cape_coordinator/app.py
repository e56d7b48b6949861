"""The coordinator's HTTP API: a FastAPI app over :class:`~cape_coordinator.store.Coordinator`.

Every ``/v1`` endpoint takes ``Authorization: Bearer TOKEN`` and names the roles
it admits (see ``docs/coordinator/roles.md``). Errors are JSON
``{"error": {"code", "message", ...}}`` with a stable ``code``; request data and
key material are never echoed, and no response carries a stack trace. Request
bodies are limited in size before they are read. The OpenAPI spec is at
``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cape_pipelines.policy.models import LABEL_RE

from . import db
from .errors import ApiError
from .store import Coordinator, Principal

log = logging.getLogger("cape_coordinator.app")

MAX_INT = 2**63 - 1
LabelPath = Annotated[str, Path(pattern=f"^{LABEL_RE.pattern}$", max_length=128)]
VersionPath = Annotated[int, Path(ge=1, le=2**31 - 1)]
KeyNamePath = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
IdText = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
PlainText = r"^[^\x00-\x1f\x7f]*$"

ALL_ROLES = ("admin", "author", "reviewer", "pipeline", "auditor", "requester")
READERS = ("admin", "author", "reviewer", "auditor")


# ---- request and response models ---------------------------------------------------------


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error response."""

    error: ErrorDetail


class WhoAmI(BaseModel):
    token_id: str
    name: str
    role: str
    labels: list[str]


class SigningKey(BaseModel):
    algorithm: Literal["Ed25519"] = "Ed25519"
    public_key: str = Field(description="raw 32-byte public key, URL-safe base64 without padding")


class TokenCreate(_In):
    name: str = Field(min_length=1, max_length=128, pattern=PlainText)
    role: Literal["admin", "author", "reviewer", "pipeline", "auditor", "requester"]
    labels: list[Annotated[str, Field(max_length=128, pattern=PlainText)]] = Field(
        default_factory=list, max_length=100
    )
    expires_in: int | None = Field(default=None, ge=1, le=10 * 365 * 86400, description="seconds")


class TokenInfo(BaseModel):
    id: str
    name: str
    role: str
    labels: list[str]
    created_at: str
    created_by: str
    expires_at: str | None
    revoked_at: str | None


class TokenCreated(TokenInfo):
    token: str = Field(description="the bearer token; shown once, stored only hashed")


class PolicyPush(_In):
    document: dict[str, Any] = Field(description="the policy document (POLICY.md) as JSON")


class PolicyInfo(BaseModel):
    label: str
    version: int
    state: Literal["draft", "in_review", "changes_requested", "rejected", "active", "superseded"]
    sha256: str
    author: str
    created_at: str
    submitted_at: str | None
    reviewed_by: str | None
    reviewed_at: str | None
    reason: str | None
    activated_at: str | None


class PolicyVersion(PolicyInfo):
    document: dict[str, Any]


class LabelInfo(BaseModel):
    label: str
    latest: int
    active: int | None


class Reject(_In):
    reason: str = Field(min_length=1, max_length=2000)


class PolicyDiff(BaseModel):
    label: str
    from_version: int
    to_version: int
    diff: str


class KeyCreate(_In):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    labels: list[Annotated[str, Field(max_length=128, pattern=PlainText)]] = Field(
        min_length=1, max_length=100
    )


class KeyVersionInfo(BaseModel):
    version: int
    created_at: str


class KeyInfo(BaseModel):
    name: str
    labels: list[str]
    current: int
    versions: list[KeyVersionInfo]


class KeyMaterial(BaseModel):
    current: int
    versions: dict[str, str] = Field(description="version -> key bytes, URL-safe base64")


class LabelKeys(BaseModel):
    label: str
    keys: dict[str, KeyMaterial]


class PolicyRef(BaseModel):
    model_config = ConfigDict(extra="allow")

    label: str | None = Field(default=None, max_length=128)
    version: int | None = Field(default=None, ge=0, le=MAX_INT)
    sha256: str | None = Field(default=None, max_length=128)


class RunRecord(BaseModel):
    """One run record (cape_pipelines.audit); fields beyond these are kept as sent."""

    model_config = ConfigDict(extra="allow")

    record_id: IdText
    run_id: IdText
    event: Literal["run.started", "policy.fetched", "run.completed", "run.failed"]
    time: str = Field(max_length=64, description="RFC 3339")
    engine: str | None = Field(default=None, max_length=64)
    engine_version: str | None = Field(default=None, max_length=64)
    principal: str | None = Field(default=None, max_length=128)
    policy: PolicyRef | None = None
    rows_in: int | None = Field(default=None, ge=0, le=MAX_INT)
    rows_out: int | None = Field(default=None, ge=0, le=MAX_INT)
    rows_redacted: int | None = Field(default=None, ge=-MAX_INT, le=MAX_INT)

    @field_validator("time")
    @classmethod
    def _rfc3339(cls, value: str) -> str:
        try:
            moment = db.parse_time(value)
        except ValueError:
            raise ValueError("time must be RFC 3339") from None
        if not 1 <= moment.year <= 9998:
            raise ValueError("time is out of range")
        return value


class AuditBatch(_In):
    records: list[RunRecord] = Field(min_length=1, max_length=1000)


class AuditAccepted(BaseModel):
    accepted: int
    duplicates: int


class AuditEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    seq: int
    prev_hash: str
    hash: str
    kind: str
    source: str
    received_at: str
    record: dict[str, Any]


class VerifyOut(BaseModel):
    intact: bool
    count: int
    last_hash: str
    problems: list[str]


class RunInfo(BaseModel):
    run_id: str
    status: Literal["running", "succeeded", "failed", "lost"]
    engine: str | None
    engine_version: str | None
    label: str | None
    version: int | None
    principal: str | None
    started_at: str | None
    ended_at: str | None
    last_seen: str
    rows_in: int | None
    rows_out: int | None
    rows_redacted: int | None
    error_type: str | None
    records: int


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


class _TooLarge(Exception):
    pass


def _too_large(limit: int) -> dict[str, Any]:
    return {"error": {"code": "payload_too_large", "message": f"request body over {limit} bytes"}}


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = JSONResponse(body).body
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


_bearer = HTTPBearer(auto_error=False, description="an API token: `cape token create`")


def _coordinator(request: Request) -> Coordinator:
    return request.app.state.coordinator


def require(*roles: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency admitting tokens of ``roles`` only (401 without a valid token, else 403).

    A token verified in the last second is answered from memory on the event loop;
    otherwise the database is asked from the thread pool (it may block)."""

    async def dependency(
        request: Request,
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        if creds is None:
            raise ApiError(401, "unauthenticated", "send Authorization: Bearer <token>")
        coord = _coordinator(request)
        principal = coord.cached_principal(creds.credentials)
        if principal is None:
            principal = await run_in_threadpool(coord.authenticate, creds.credentials)
        if principal.role not in roles:
            raise ApiError(403, "forbidden", f"role {principal.role} may not do this")
        return principal

    dependency.__name__ = f"require_{'_'.join(roles)}"
    return dependency


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
    app = FastAPI(
        title="Cape coordinator",
        version="1",
        description="Reviewed, signed policies; keys; one tamper-evident audit trail per run.",
        responses=_ERRORS,
    )
    app.state.coordinator = coordinator
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=coordinator.settings.max_body_bytes)
    _routes(app, coordinator)
    # Deferred: these modules import this one's models and dependencies.
    from .console import mount_console
    from .workflow import Workflow
    from .workflow_api import workflow_routes

    app.state.workflow = Workflow(coordinator)
    workflow_routes(app)
    mount_console(app)
    return app


def _routes(app: FastAPI, coord: Coordinator) -> None:
    admin = Depends(require("admin"))
    readers = Depends(require(*READERS))
    anyone = Depends(require(*ALL_ROLES))

    @app.get("/healthz", tags=["meta"])
    def healthz() -> dict[str, str]:
        """Liveness (no authentication)."""
        return {"status": "ok"}

    @app.get("/v1/whoami", tags=["meta"])
    def whoami(p: Principal = anyone) -> WhoAmI:
        """The calling token's identity and role."""
        return WhoAmI(token_id=p.token_id, name=p.name, role=p.role, labels=list(p.labels))

    @app.get("/v1/signing-key", tags=["meta"])
    def signing_key(_p: Principal = anyone) -> SigningKey:
        """The Ed25519 public key policies are signed with (pin it out of band too)."""
        return SigningKey(public_key=coord.public_key_text)

    # tokens
    @app.post("/v1/tokens", status_code=201, tags=["tokens"])
    def create_token(body: TokenCreate, p: Principal = admin) -> TokenCreated:
        """Make an API token (admin). The token is in this response only."""
        info, token = coord.create_token(
            p, name=body.name, role=body.role, labels=body.labels, expires_in=body.expires_in
        )
        return TokenCreated(**info, token=token)

    @app.get("/v1/tokens", tags=["tokens"])
    def list_tokens(_p: Principal = admin) -> list[TokenInfo]:
        """Every token (never its secret)."""
        return [TokenInfo(**t) for t in coord.list_tokens()]

    @app.post("/v1/tokens/{token_id}/revoke", tags=["tokens"])
    def revoke_token(
        token_id: Annotated[str, Path(pattern=r"^[0-9a-f]{16}$")], p: Principal = admin
    ) -> TokenInfo:
        """Revoke a token at once."""
        return TokenInfo(**coord.revoke_token(p, token_id))

    # policies
    @app.get("/v1/policies", tags=["policies"])
    def list_policies(_p: Principal = readers) -> list[LabelInfo]:
        """Every label with its latest and active version."""
        return [LabelInfo(**x) for x in coord.list_labels()]

    @app.post("/v1/policies", status_code=201, tags=["policies"])
    def push_policy(body: PolicyPush, p: Principal = Depends(require("author"))) -> PolicyInfo:
        """Push a new draft version (author); 422 lists every problem with its location."""
        return PolicyInfo(**coord.push_policy(p, body.document))

    @app.get("/v1/policies/{label}/versions", tags=["policies"])
    def history(label: LabelPath, _p: Principal = readers) -> list[PolicyInfo]:
        """Every version of a label and its review state."""
        return [PolicyInfo(**x) for x in coord.policy_history(label)]

    @app.get("/v1/policies/{label}/versions/{version}", tags=["policies"])
    def show(label: LabelPath, version: VersionPath, _p: Principal = readers) -> PolicyVersion:
        """One version with its document."""
        return PolicyVersion(**coord.policy_info(label, version, with_document=True))

    @app.post("/v1/policies/{label}/versions/{version}/submit", tags=["policies"])
    def submit(
        label: LabelPath, version: VersionPath, p: Principal = Depends(require("author"))
    ) -> PolicyInfo:
        """draft -> in_review (the version is immutable from now on)."""
        return PolicyInfo(**coord.submit_policy(p, label, version))

    @app.post("/v1/policies/{label}/versions/{version}/approve", tags=["policies"])
    def approve(
        label: LabelPath, version: VersionPath, p: Principal = Depends(require("reviewer"))
    ) -> PolicyInfo:
        """Approve a version in review (a reviewer who is not the author, and assigned when
        reviewers are assigned); the approval that reaches the label's required number
        activates and signs it."""
        return PolicyInfo(**app.state.workflow.approve(p, label, version))

    @app.post("/v1/policies/{label}/versions/{version}/reject", tags=["policies"])
    def reject(
        label: LabelPath,
        version: VersionPath,
        body: Reject,
        p: Principal = Depends(require("reviewer")),
    ) -> PolicyInfo:
        """in_review -> rejected, with a reason."""
        return PolicyInfo(**coord.reject_policy(p, label, version, body.reason))

    @app.get("/v1/policies/{label}/diff", tags=["policies"])
    def diff(
        label: LabelPath,
        from_version: Annotated[int, Query(alias="from", ge=1, le=2**31 - 1)],
        to_version: Annotated[int, Query(alias="to", ge=1, le=2**31 - 1)],
        _p: Principal = readers,
    ) -> PolicyDiff:
        """Unified diff of two versions' canonical YAML."""
        text = coord.diff_policy(label, from_version, to_version)
        return PolicyDiff(label=label, from_version=from_version, to_version=to_version, diff=text)

    @app.get(
        "/v1/policies/{label}/active",
        tags=["policies"],
        response_class=Response,
        responses={
            200: {
                "description": "canonical JSON of the active version; headers ETag, "
                "X-Cape-Signature (Ed25519 over the body, base64url), X-Cape-Policy-Version",
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            304: {"description": "not modified (If-None-Match matched the ETag)"},
        },
    )
    def active(
        label: LabelPath,
        p: Principal = anyone,
        if_none_match: Annotated[str | None, Header(max_length=1024)] = None,
    ) -> Response:
        """The active version only; pipeline tokens only for their labels."""
        body, sha, signature, version = coord.active_policy(p, label)
        headers = {
            "ETag": f'"{sha}"',
            "X-Cape-Signature": signature,
            "X-Cape-Policy-Version": str(version),
            "Cache-Control": "no-cache",
        }
        if if_none_match is not None:
            tags = {t.strip().removeprefix("W/").strip('"') for t in if_none_match.split(",")}
            if sha in tags or "*" in tags:
                return Response(status_code=304, headers=headers)
        return Response(content=body, media_type="application/json", headers=headers)

    # keys
    @app.post("/v1/keys", status_code=201, tags=["keys"])
    def create_key(body: KeyCreate, p: Principal = admin) -> KeyInfo:
        """Make a named random 32-byte key for pipelines of the given labels."""
        return KeyInfo(**coord.create_key(p, body.name, body.labels))

    @app.get("/v1/keys", tags=["keys"])
    def list_keys(_p: Principal = Depends(require("admin", "auditor"))) -> list[KeyInfo]:
        """Every key's name, labels and versions (never material)."""
        return [KeyInfo(**k) for k in coord.list_keys()]

    @app.post("/v1/keys/{name}/rotate", tags=["keys"])
    def rotate_key(name: KeyNamePath, p: Principal = admin) -> KeyInfo:
        """A new current version; old versions stay readable for reversal."""
        return KeyInfo(**coord.rotate_key(p, name))

    @app.get("/v1/labels/{label}/keys", tags=["keys"])
    def label_keys(
        label: LabelPath, response: Response, p: Principal = Depends(require("pipeline"))
    ) -> LabelKeys:
        """Key material for a label (pipeline tokens of that label only; every read audited)."""
        response.headers["Cache-Control"] = "no-store"
        keys = coord.keys_for_label(p, label)
        return LabelKeys(label=label, keys={n: KeyMaterial(**k) for n, k in keys.items()})

    # audit
    @app.post("/v1/audit", tags=["audit"])
    async def post_audit(
        body: AuditBatch, p: Principal = Depends(require("pipeline"))
    ) -> AuditAccepted:
        """Append run records; a record_id already stored is skipped (idempotent).
        Answered only after the transaction holding them has committed."""
        if len(body.records) > coord.settings.max_batch_records:
            raise ApiError(
                413, "batch_too_large", f"at most {coord.settings.max_batch_records} records"
            )
        records = [r.model_dump(mode="json", exclude_unset=True) for r in body.records]
        # Preparing the batch is CPU work (no I/O): it stays on the loop, and the commit
        # is awaited without holding a thread.
        done = coord.submit_audit(p, records)
        return AuditAccepted(**await asyncio.wrap_future(done))

    auditors = Depends(require("admin", "auditor"))

    @app.get("/v1/audit", tags=["audit"])
    def list_audit(
        _p: Principal = auditors,
        run_id: Annotated[str | None, Query(max_length=128, pattern=PlainText)] = None,
        label: Annotated[str | None, Query(max_length=128, pattern=PlainText)] = None,
        event: Annotated[str | None, Query(max_length=64, pattern=PlainText)] = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after_seq: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[AuditEntry]:
        """Chain entries in order, filtered by run, label, event and record time [since, until)."""
        rows = coord.list_audit(
            run_id=run_id,
            label=label,
            event=event,
            since=_checked_time(since),
            until=_checked_time(until),
            after_seq=after_seq,
            limit=limit,
        )
        return [AuditEntry(**r) for r in rows]

    @app.get("/v1/audit/verify", tags=["audit"])
    def verify(
        _p: Principal = auditors,
        expect_seq: Annotated[int | None, Query(ge=1, le=MAX_INT)] = None,
        expect_hash: Annotated[str | None, Query(pattern=r"^[0-9a-f]{64}$")] = None,
    ) -> VerifyOut:
        """Check the whole chain and its signed anchor (and, optionally, a kept anchor)."""
        if (expect_seq is None) != (expect_hash is None):
            raise ApiError(422, "invalid_request", "give both expect_seq and expect_hash")
        expect = (expect_seq, expect_hash) if expect_seq is not None else None
        result = coord.verify_audit(expect)  # type: ignore[arg-type]
        return VerifyOut(**result.__dict__)

    @app.get("/v1/runs", tags=["runs"])
    def list_runs(
        _p: Principal = auditors,
        status: Literal["running", "succeeded", "failed", "lost"] | None = None,
        label: Annotated[str | None, Query(max_length=128, pattern=PlainText)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[RunInfo]:
        """Pipeline runs, newest activity first."""
        return [RunInfo(**r) for r in coord.list_runs(status=status, label=label, limit=limit)]


def _checked_time(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    if not 1 <= moment.year <= 9998:
        raise ApiError(422, "invalid_request", "time is out of range")
    return moment
