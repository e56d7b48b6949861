"""HTTP endpoints of the governance catalog (see :mod:`..services.catalog`).

Who may do what is one table, :data:`CATALOG_ROLES`, in the style of the
workflow's: every role reads (pipelines resolve ``{tag: ...}`` rules through
it at plan time); authors and admins register datasets and post a scan's
proposals; only a person holding a reviewer or admin token puts a tag on a
column or decides a proposal; the taxonomy and the per-label coverage rule are
the admin's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, Field

from ..errors import not_found
from ..schemas import PlainText, _In
from ..services.base import ROLES, Principal
from .deps import LabelPath, require

CATALOG_ROLES: dict[str, tuple[str, ...]] = {
    "catalog.read": ROLES,
    "catalog.register": ("admin", "author"),
    "catalog.propose": ("admin", "author"),
    "catalog.tag": ("admin", "reviewer"),
    "catalog.decide": ("admin", "reviewer"),
    "catalog.taxonomy": ("admin",),
    "catalog.settings": ("admin",),
}

DatasetPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
ProposalPath = Annotated[int, Path(ge=1, le=2**31 - 1)]
Text128 = Annotated[str, Field(min_length=1, max_length=128, pattern=PlainText)]


def allowed(action: str) -> Any:
    """The dependency admitting the roles of ``action`` (a key of :data:`CATALOG_ROLES`)."""
    return Depends(require(*CATALOG_ROLES[action]))


def _catalog(request: Request) -> Any:
    return request.app.state.coordinator.catalog


class TagDefine(_In):
    tag: Text128
    description: str = Field(min_length=1, max_length=2000, pattern=PlainText)


class TagInfo(BaseModel):
    tag: str
    description: str
    builtin: bool
    created_by: str | None


class DatasetRegister(_In):
    owner: Text128
    schema_: dict[Text128, Text128] = Field(
        alias="schema", description="column -> Arrow type name (`cape catalog scan` fills it)"
    )


class ColumnTag(BaseModel):
    tag: str
    tagged_by: str
    tagged_at: str
    source: Literal["manual", "scan", "atlas"] | str


class ColumnInfo(BaseModel):
    name: str
    type: str
    tags: list[ColumnTag]


class DatasetInfo(BaseModel):
    name: str
    owner: str
    created_by: str
    created_at: str
    updated_at: str
    columns: list[ColumnInfo]


class TagColumn(_In):
    column: Text128
    tag: Text128


class ProposalIn(_In):
    column: Text128
    tag: Text128
    confidence: float = Field(ge=0.0, le=1.0)
    evidence: int = Field(ge=0, le=2**31 - 1, description="sampled values the detector confirmed")
    sampled: int = Field(ge=0, le=2**31 - 1, description="non-null values sampled")
    detector: Annotated[str, Field(min_length=1, max_length=64, pattern=PlainText)]


class Proposals(_In):
    proposals: list[ProposalIn] = Field(min_length=1, max_length=2000)


class ProposalInfo(BaseModel):
    id: int
    dataset: str
    column: str
    tag: str
    confidence: float
    evidence: int
    sampled: int
    detector: str
    state: Literal["pending", "accepted", "rejected"]
    proposed_by: str
    proposed_at: str
    decided_by: str | None
    decided_at: str | None
    reason: str | None


class Decision(_In):
    reason: str | None = Field(default=None, max_length=2000, pattern=PlainText)


class CoverageIn(_In):
    document: dict[str, Any] = Field(description="a policy document (as `cape policy push`)")


class LabelSettings(_In):
    dataset: Text128
    require_coverage: bool = Field(
        description="refuse approving a version that leaves a tagged column uncovered"
    )


class LabelSettingsInfo(BaseModel):
    label: str
    dataset: str
    require_coverage: bool


router = APIRouter(prefix="/v1/catalog", tags=["catalog"])


@router.get("/tags")
def list_tags(request: Request, _p: Principal = allowed("catalog.read")) -> list[TagInfo]:
    """The taxonomy: built-in tags and the operator's."""
    return [TagInfo(**t) for t in _catalog(request).taxonomy()]


@router.post("/tags", status_code=201)
def define_tag(
    body: TagDefine, request: Request, p: Principal = allowed("catalog.taxonomy")
) -> TagInfo:
    """Extend the taxonomy with a tag or a family (``prefix.*``)."""
    return TagInfo(**_catalog(request).add_tag(p, body.tag, body.description))


@router.get("/datasets")
def list_datasets(request: Request, _p: Principal = allowed("catalog.read")) -> list[DatasetInfo]:
    """Every dataset with its columns and their tags."""
    return [DatasetInfo(**d) for d in _catalog(request).list()]


@router.put("/datasets/{name}")
def register_dataset(
    name: DatasetPath,
    body: DatasetRegister,
    request: Request,
    p: Principal = allowed("catalog.register"),
) -> DatasetInfo:
    """Register a dataset or replace its schema (tags of removed columns go, audited)."""
    return DatasetInfo(**_catalog(request).register(p, name, body.owner, body.schema_))


@router.get("/datasets/{name}")
def get_dataset(
    name: DatasetPath, request: Request, _p: Principal = allowed("catalog.read")
) -> DatasetInfo:
    """A dataset: owner, schema, each column's tags with who tagged it and when."""
    return DatasetInfo(**_catalog(request).get(name))


@router.get("/datasets/{name}/column-tags")
def dataset_column_tags(
    name: DatasetPath, request: Request, _p: Principal = allowed("catalog.read")
) -> dict[str, list[str]]:
    """{column: [tag, ...]}: what a plan's ``column_tags`` takes."""
    return _catalog(request).column_tags(name)  # type: ignore[no-any-return]


@router.post("/datasets/{name}/tags")
def tag_column(
    name: DatasetPath, body: TagColumn, request: Request, p: Principal = allowed("catalog.tag")
) -> DatasetInfo:
    """Put a tag on a column (audited: who and when)."""
    return DatasetInfo(**_catalog(request).tag(p, name, body.column, body.tag))


@router.post("/datasets/{name}/untag")
def untag_column(
    name: DatasetPath, body: TagColumn, request: Request, p: Principal = allowed("catalog.tag")
) -> DatasetInfo:
    """Take a tag off a column (audited)."""
    return DatasetInfo(**_catalog(request).untag(p, name, body.column, body.tag))


@router.post("/datasets/{name}/proposals", status_code=201)
def propose_tags(
    name: DatasetPath,
    body: Proposals,
    request: Request,
    p: Principal = allowed("catalog.propose"),
) -> list[ProposalInfo]:
    """Store a scan's proposals as pending: no tag changes until a person accepts one."""
    items = [x.model_dump() for x in body.proposals]
    return [ProposalInfo(**x) for x in _catalog(request).propose(p, name, items)]


@router.get("/proposals")
def list_proposals(
    request: Request,
    _p: Principal = allowed("catalog.read"),
    dataset: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")] = None,
    state: Literal["pending", "accepted", "rejected"] | None = None,
) -> list[ProposalInfo]:
    """Proposals, oldest first."""
    return [ProposalInfo(**x) for x in _catalog(request).proposals(dataset, state)]


@router.post("/proposals/{pid}/accept")
def accept_proposal(
    pid: ProposalPath, request: Request, p: Principal = allowed("catalog.decide")
) -> ProposalInfo:
    """Accept: the proposed tag goes on the column, tagged by the caller."""
    return ProposalInfo(**_catalog(request).decide(p, pid, True))


@router.post("/proposals/{pid}/reject")
def reject_proposal(
    pid: ProposalPath,
    body: Decision,
    request: Request,
    p: Principal = allowed("catalog.decide"),
) -> ProposalInfo:
    """Reject: nothing is tagged; the decision and its reason are kept."""
    return ProposalInfo(**_catalog(request).decide(p, pid, False, body.reason))


@router.post("/datasets/{name}/coverage")
def coverage(
    name: DatasetPath,
    body: CoverageIn,
    request: Request,
    _p: Principal = allowed("catalog.read"),
) -> dict[str, Any]:
    """The coverage of a policy document against the dataset's tagged columns."""
    return _catalog(request).coverage(body.document, name)  # type: ignore[no-any-return]


@router.put("/labels/{label}")
def set_label_settings(
    label: LabelPath,
    body: LabelSettings,
    request: Request,
    p: Principal = allowed("catalog.settings"),
) -> LabelSettingsInfo:
    """Tie a policy label to its dataset; with ``require_coverage``, approvals of versions
    leaving a tagged column uncovered are refused."""
    info = _catalog(request).set_label_settings(p, label, body.dataset, body.require_coverage)
    return LabelSettingsInfo(**info)


@router.get("/labels/{label}")
def get_label_settings(
    label: LabelPath, request: Request, _p: Principal = allowed("catalog.read")
) -> LabelSettingsInfo:
    """A label's dataset and coverage rule (404 when it has none)."""
    info = _catalog(request).label_settings(label)
    if info is None:
        raise not_found(f"catalog settings of label {label}")
    return LabelSettingsInfo(**info)


__all__ = ["CATALOG_ROLES", "router"]
