"""Policies: push, review (submit, approve, reject), read, diff, and the active version.

The active version is what pipelines fetch: canonical JSON, with its signature
and version in headers, and ``304`` when ``If-None-Match`` matches its ETag.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Response

from ..crypto import b64e
from ..schemas import LabelInfo, PolicyDiff, PolicyInfo, PolicyPush, PolicyVersion, Reject
from ..services.base import Principal
from .deps import ALL_ROLES, READERS, Coord, LabelPath, VersionPath, require

router = APIRouter(prefix="/v1/policies", tags=["policies"])
Readers = Annotated[Principal, Depends(require(*READERS))]
Author = Annotated[Principal, Depends(require("author"))]
Reviewer = Annotated[Principal, Depends(require("reviewer"))]
Anyone = Annotated[Principal, Depends(require(*ALL_ROLES))]


@router.get("")
def list_policies(coord: Coord, _p: Readers) -> list[LabelInfo]:
    """Every label with its latest and active version."""
    return [LabelInfo(**x) for x in coord.policies.labels()]


@router.post("", status_code=201)
def push_policy(body: PolicyPush, coord: Coord, p: Author) -> PolicyInfo:
    """Push a new draft version (author); 422 lists every problem with its location."""
    return PolicyInfo(**coord.policies.push(p, body.document))


@router.get("/{label}/versions")
def history(label: LabelPath, coord: Coord, _p: Readers) -> list[PolicyInfo]:
    """Every version of a label and its review state."""
    return [PolicyInfo(**x) for x in coord.policies.history(label)]


@router.get("/{label}/versions/{version}")
def show(label: LabelPath, version: VersionPath, coord: Coord, _p: Readers) -> PolicyVersion:
    """One version with its document."""
    return PolicyVersion(**coord.policies.info(label, version, with_document=True))


@router.post("/{label}/versions/{version}/submit")
def submit(label: LabelPath, version: VersionPath, coord: Coord, p: Author) -> PolicyInfo:
    """draft -> in_review (the version is immutable from now on)."""
    return PolicyInfo(**coord.policies.submit(p, label, version))


@router.post("/{label}/versions/{version}/approve")
def approve(label: LabelPath, version: VersionPath, coord: Coord, p: Reviewer) -> PolicyInfo:
    """in_review -> active, by a reviewer who is not the author; signs the version."""
    return PolicyInfo(**coord.policies.approve(p, label, version))


@router.post("/{label}/versions/{version}/reject")
def reject(
    label: LabelPath, version: VersionPath, body: Reject, coord: Coord, p: Reviewer
) -> PolicyInfo:
    """in_review -> rejected, with a reason."""
    return PolicyInfo(**coord.policies.reject(p, label, version, body.reason))


@router.post("/{label}/versions/{version}/rollback")
def rollback(
    label: LabelPath, version: VersionPath, body: Reject, coord: Coord, p: Reviewer
) -> PolicyInfo:
    """superseded -> active again: an explicit, audited rollback by a reviewer, with a
    reason; the label's activation number grows, so clients accept it as the newest."""
    return PolicyInfo(**coord.policies.rollback(p, label, version, body.reason))


@router.get("/{label}/diff")
def diff(
    label: LabelPath,
    from_version: Annotated[int, Query(alias="from", ge=1, le=2**31 - 1)],
    to_version: Annotated[int, Query(alias="to", ge=1, le=2**31 - 1)],
    coord: Coord,
    _p: Readers,
) -> PolicyDiff:
    """Unified diff of two versions' canonical YAML."""
    text = coord.policies.diff(label, from_version, to_version)
    return PolicyDiff(label=label, from_version=from_version, to_version=to_version, diff=text)


@router.get(
    "/{label}/active",
    response_class=Response,
    responses={
        200: {
            "description": "canonical JSON of the active version; headers ETag, "
            "X-Cape-Policy-Version, X-Cape-Policy-Envelope (base64url of the envelope's "
            "canonical JSON: label, version, activation_seq, activated_at, sha256 of the "
            "body) and X-Cape-Signature (Ed25519 over b'cape.policy-envelope.v1\\n' + "
            "envelope, base64url)",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        304: {"description": "not modified (If-None-Match matched the ETag)"},
    },
)
def active(
    label: LabelPath,
    coord: Coord,
    p: Anyone,
    if_none_match: Annotated[str | None, Header(max_length=1024)] = None,
) -> Response:
    """The active version only; pipeline tokens only for their labels."""
    served = coord.policies.active(p, label)
    headers = {
        "ETag": f'"{served.sha256}"',
        "X-Cape-Policy-Version": str(served.version),
        "Cache-Control": "no-cache",
    }
    if if_none_match is not None:
        tags = {t.strip().removeprefix("W/").strip('"') for t in if_none_match.split(",")}
        if served.sha256 in tags or "*" in tags:
            # No envelope on a 304: the client re-verifies the signed copy it holds (every
            # version's bytes differ, so the same ETag means the same activation's bytes).
            return Response(status_code=304, headers=headers)
    headers["X-Cape-Policy-Envelope"] = b64e(served.envelope)
    headers["X-Cape-Signature"] = served.signature
    return Response(content=served.body, media_type="application/json", headers=headers)
