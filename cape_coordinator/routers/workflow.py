"""HTTP endpoints of the request -> review workflow (see :mod:`..services.workflow`).

The console under ``/ui`` calls the same service methods behind the same role
checks (:data:`ROLE_MATRIX` is the one table both read), so a page offers only
what the API would let its user do.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, Field

from ..schemas import PlainText, PolicyInfo, _In
from ..services.base import Principal
from .deps import LabelPath, VersionPath, require

RequestIdPath = Annotated[str, Path(pattern=r"^req-[0-9a-f]{12}$")]
ColumnName = Annotated[str, Field(min_length=1, max_length=128, pattern=PlainText)]
Name = Annotated[str, Field(min_length=1, max_length=128, pattern=PlainText)]

# Who may do what in the workflow: the API's dependencies and the console's pages use this.
ROLE_MATRIX: dict[str, tuple[str, ...]] = {
    "request.create": ("requester",),
    "request.read": ("requester", "author", "reviewer", "admin", "auditor"),
    "request.decline": ("author", "admin"),
    "request.link": ("author",),
    "policy.read": ("admin", "author", "reviewer", "auditor"),
    "policy.push": ("author",),
    "policy.submit": ("author",),
    "policy.approve": ("reviewer",),
    "policy.reject": ("reviewer",),
    "policy.request_changes": ("reviewer",),
    "policy.comment": ("author", "reviewer"),
    "policy.assign": ("author", "admin"),
    "review.settings": ("admin",),
    "review.settings.read": ("admin", "author", "reviewer", "auditor"),
    "runs.read": ("admin", "auditor"),
    "audit.read": ("admin", "auditor"),
    "tokens.manage": ("admin",),
    "keys.read": ("admin", "auditor"),
    "keys.manage": ("admin",),
}


def may(principal: Principal, action: str) -> bool:
    """Whether ``principal``'s role admits ``action`` (a key of :data:`ROLE_MATRIX`)."""
    return principal.role in ROLE_MATRIX[action]


def allowed(action: str) -> Any:
    """The FastAPI dependency admitting the roles of ``action``."""
    return Depends(require(*ROLE_MATRIX[action]))


class NeededColumn(BaseModel):
    name: ColumnName
    need: str = Field(min_length=1, max_length=2000, description="what the column is needed for")


class RequestCreate(_In):
    dataset: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    dataset_schema: dict[ColumnName, str] = Field(
        alias="schema",
        min_length=1,
        max_length=500,
        description="column -> type: string, int64, int32, float64, double, bool, date, "
        "timestamp, decimal, binary",
    )
    purpose: str = Field(min_length=1, max_length=4000)
    columns: list[NeededColumn] = Field(min_length=1, max_length=500)


class RequestInfo(BaseModel):
    id: str
    dataset: str
    request_schema: dict[str, str] = Field(alias="schema", serialization_alias="schema")
    purpose: str
    columns: list[NeededColumn]
    requester: str
    created_at: str
    state: Literal["open", "drafting", "in_review", "fulfilled", "declined"]
    label: str | None
    version: int | None
    latest_version: int | None
    linked_by: str | None
    declined_by: str | None
    declined_at: str | None
    decline_reason: str | None


class Decline(_In):
    reason: str = Field(min_length=1, max_length=2000)


class Link(_In):
    label: str = Field(max_length=128, pattern=r"^[a-z0-9][a-z0-9._-]{0,127}$")
    version: int = Field(ge=1, le=2**31 - 1)


class Assign(_In):
    reviewers: list[Name] = Field(min_length=1, max_length=20)


class ReviewSettings(_In):
    required_approvals: int = Field(ge=1, le=10, description="2 = the two-person rule")
    reviewers: list[Name] = Field(default_factory=list, max_length=20)


class ReviewSettingsInfo(BaseModel):
    label: str
    required_approvals: int
    reviewers: list[str]


class ReviewState(BaseModel):
    label: str
    version: int
    state: str
    author: str
    reviewers: list[str] = Field(description="assigned reviewers; empty: any reviewer")
    approvals: list[str]
    required_approvals: int


class CommentCreate(_In):
    body: str = Field(min_length=1, max_length=8000)
    rule: int | None = Field(default=None, ge=0, le=10000, description="0-based rule index")
    reply_to: int | None = Field(default=None, ge=1, le=2**63 - 1)


class CommentInfo(BaseModel):
    id: int
    label: str
    version: int
    author: str
    role: str
    body: str
    rule: int | None
    reply_to: int | None
    created_at: str


class RequestChanges(_In):
    reason: str = Field(min_length=1, max_length=2000)


class PlanColumn(BaseModel):
    column: str | None
    input_type: str | None
    status: str
    actions: list[str]
    output_type: str | None


class PlanOut(BaseModel):
    columns: list[PlanColumn]
    error: str | None


class DiffRow(BaseModel):
    kind: Literal["same", "changed", "removed", "added"]
    left: str
    right: str
    left_no: int | None
    right_no: int | None


class Review(ReviewState):
    policy: PolicyInfo
    document: dict[str, Any]
    yaml: str
    active_version: int | None
    base_version: int | None = Field(
        description="what the diff compares with: the active version, or for the active "
        "version itself the one it replaced"
    )
    diff: str = Field(description="unified diff against base_version")
    side_by_side: list[DiffRow]
    request: RequestInfo | None = Field(description="who asked for it and why")
    plan: PlanOut | None = Field(description="the plan over the requested dataset's schema")
    coverage: dict[str, Any] | None = Field(
        default=None,
        description="the catalog's coverage report against the label's dataset (tagged "
        "columns no rule covers, rules that match nothing; `required`: it blocks approval)",
    )
    comments: list[CommentInfo]


def _wf(request: Request) -> Any:
    return request.app.state.coordinator.workflow


router = APIRouter()


@router.post("/v1/requests", status_code=201, tags=["requests"], response_model_by_alias=True)
def create_request(
    body: RequestCreate, request: Request, p: Principal = allowed("request.create")
) -> RequestInfo:
    """File a policy request for a dataset: its schema, the purpose, the columns needed."""
    info = _wf(request).create_request(
        p,
        dataset=body.dataset,
        schema=body.dataset_schema,
        purpose=body.purpose,
        columns=[c.model_dump() for c in body.columns],
    )
    return RequestInfo(**info)


@router.get("/v1/requests", tags=["requests"], response_model_by_alias=True)
def list_requests(
    request: Request,
    p: Principal = allowed("request.read"),
    state: Literal["open", "drafting", "in_review", "fulfilled", "declined"] | None = None,
) -> list[RequestInfo]:
    """Requests, newest first (a requester sees only their own)."""
    return [RequestInfo(**r) for r in _wf(request).list_requests(p, state)]


@router.get("/v1/requests/{request_id}", tags=["requests"], response_model_by_alias=True)
def show_request(
    request_id: RequestIdPath,
    request: Request,
    p: Principal = allowed("request.read"),
) -> RequestInfo:
    """One request with its state."""
    return RequestInfo(**_wf(request).get_request(p, request_id))


@router.post("/v1/requests/{request_id}/decline", tags=["requests"], response_model_by_alias=True)
def decline_request(
    request_id: RequestIdPath,
    body: Decline,
    request: Request,
    p: Principal = allowed("request.decline"),
) -> RequestInfo:
    """Decline a request, with a reason."""
    return RequestInfo(**_wf(request).decline_request(p, request_id, body.reason))


@router.post("/v1/requests/{request_id}/link", tags=["requests"], response_model_by_alias=True)
def link_request(
    request_id: RequestIdPath,
    body: Link,
    request: Request,
    p: Principal = allowed("request.link"),
) -> RequestInfo:
    """Link a version (its author) to the request; the request follows that label."""
    return RequestInfo(**_wf(request).link_request(p, request_id, body.label, body.version))


@router.get("/v1/policies/{label}/review-settings", tags=["review"])
def get_settings(
    label: LabelPath, request: Request, _p: Principal = allowed("review.settings.read")
) -> ReviewSettingsInfo:
    """Approvals a label needs and its default reviewers."""
    return ReviewSettingsInfo(**_wf(request).review_settings(label))


@router.put("/v1/policies/{label}/review-settings", tags=["review"])
def put_settings(
    label: LabelPath,
    body: ReviewSettings,
    request: Request,
    p: Principal = allowed("review.settings"),
) -> ReviewSettingsInfo:
    """Set a label's required approvals (2 = two-person rule) and default reviewers."""
    info = _wf(request).set_review_settings(
        p, label, required_approvals=body.required_approvals, reviewers=body.reviewers
    )
    return ReviewSettingsInfo(**info)


@router.post("/v1/policies/{label}/versions/{version}/reviewers", tags=["review"])
def assign(
    label: LabelPath,
    version: VersionPath,
    body: Assign,
    request: Request,
    p: Principal = allowed("policy.assign"),
) -> ReviewState:
    """Assign reviewers to a version (its author or an admin)."""
    return ReviewState(**_wf(request).assign(p, label, version, body.reviewers))


@router.post("/v1/policies/{label}/versions/{version}/request-changes", tags=["review"])
def request_changes(
    label: LabelPath,
    version: VersionPath,
    body: RequestChanges,
    request: Request,
    p: Principal = allowed("policy.request_changes"),
) -> PolicyInfo:
    """Send a version in review back to its author, with what should change."""
    return PolicyInfo(**_wf(request).request_changes(p, label, version, body.reason))


@router.get("/v1/policies/{label}/versions/{version}/comments", tags=["review"])
def list_comments(
    label: LabelPath,
    version: VersionPath,
    request: Request,
    _p: Principal = allowed("policy.read"),
) -> list[CommentInfo]:
    """The version's thread (with the versions it revises), oldest first."""
    return [CommentInfo(**c) for c in _wf(request).comments(label, version)]


@router.post("/v1/policies/{label}/versions/{version}/comments", status_code=201, tags=["review"])
def add_comment(
    label: LabelPath,
    version: VersionPath,
    body: CommentCreate,
    request: Request,
    p: Principal = allowed("policy.comment"),
) -> CommentInfo:
    """Comment on a version, optionally on one rule or as a reply."""
    out = _wf(request).comment(p, label, version, body.body, rule=body.rule, reply_to=body.reply_to)
    return CommentInfo(**out)


@router.get("/v1/policies/{label}/versions/{version}/review", tags=["review"])
def review(
    label: LabelPath,
    version: VersionPath,
    request: Request,
    _p: Principal = allowed("policy.read"),
) -> Review:
    """What a reviewer needs: diff against the active version, the plan over the
    requested dataset's schema, who asked and why, reviewers, approvals, comments."""
    return Review(**_wf(request).review(label, version))


__all__ = ["ROLE_MATRIX", "allowed", "may", "router"]
