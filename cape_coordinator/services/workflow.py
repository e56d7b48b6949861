"""The policy workflow from a request to collaborative review: requests, reviewers,
approvals from distinct reviewers, threaded comments and "request changes".

A data user (role ``requester``) files a **request** for a dataset: its schema,
the purpose and the columns needed with what for. An author links a draft
version to it; the request's state (open, drafting, in review, fulfilled,
declined) is derived from the linked label's versions, so it can never
disagree with them. Reviewers are **assigned** to a version, or by default to a
label; each label needs ``required_approvals`` approvals (default 1; 2 is the
two-person rule) from distinct reviewers who are not the author, and the last
one activates and signs the version. A reviewer may **request changes**
instead: the version goes back (state ``returned``) to its author, whose next version keeps the
comment thread (and the reviewers) of the one sent back. Every action is a
record on the audit chain, written in the transaction that makes the change, so
a refused action stores nothing.

Why one module over 500 lines: :class:`WorkflowService` is one state machine,
and a request's state is derived from its label's review state, so the rules
for requests, assignments, approvals and comments read each other's tables in
the same transactions; the schema-plan helpers at the top serve the same
review page. Splitting it by action would spread one set of state rules over
several modules.
"""

from __future__ import annotations

import difflib
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyarrow as pa
from sqlalchemy import (
    Column,
    Connection,
    Index,
    Integer,
    String,
    Table,
    Text,
    func,
    insert,
    select,
    update,
)

from cape_pipelines.errors import CapeError, PolicyError
from cape_pipelines.keys import KeyResolver
from cape_pipelines.policy.models import LABEL_RE

from .. import db
from ..errors import ApiError, not_found
from .base import NAME_RE, PRINCIPAL_RE, Principal
from .chain import AuditChain
from .policies import PolicyService, canonical_yaml

# ---- tables (created by migration 0003) ----------------------------------------------------

requests_table = Table(
    "policy_requests",
    db.metadata,
    Column("id", String(32), primary_key=True),
    Column("dataset", String(128), nullable=False),
    Column("schema", Text, nullable=False),
    Column("purpose", Text, nullable=False),
    Column("columns", Text, nullable=False),
    Column("requester", String(128), nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("label", String(128)),
    Column("version", Integer),
    Column("linked_by", String(128)),
    Column("declined_by", String(128)),
    Column("declined_at", String(32)),
    Column("decline_reason", Text),
    Index("ix_requests_label", "label"),
)

review_settings = Table(
    "review_settings",
    db.metadata,
    Column("label", String(128), primary_key=True),
    Column("required_approvals", Integer, nullable=False),
    Column("reviewers", Text, nullable=False),
    Column("updated_by", String(128), nullable=False),
    Column("updated_at", String(32), nullable=False),
)

assignments = Table(
    "review_assignments",
    db.metadata,
    Column("label", String(128), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("reviewer", String(128), primary_key=True),
    Column("assigned_by", String(128), nullable=False),
    Column("assigned_at", String(32), nullable=False),
)

approvals = Table(
    "review_approvals",
    db.metadata,
    Column("label", String(128), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("reviewer", String(128), primary_key=True),
    Column("approved_at", String(32), nullable=False),
)

comments = Table(
    "review_comments",
    db.metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("label", String(128), nullable=False),
    Column("version", Integer, nullable=False),
    Column("author", String(128), nullable=False),
    Column("role", String(16), nullable=False),
    Column("body", Text, nullable=False),
    Column("rule", Integer),
    Column("reply_to", Integer),
    Column("created_at", String(32), nullable=False),
    Index("ix_comments_label_version", "label", "version"),
)

WORKFLOW_TABLES = [requests_table, review_settings, assignments, approvals, comments]

# The dataset schema a requester may describe: Arrow type names a plan understands.
SCHEMA_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int64": pa.int64(),
    "int32": pa.int32(),
    "float64": pa.float64(),
    "double": pa.float64(),
    "bool": pa.bool_(),
    "date": pa.date32(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "decimal": pa.decimal128(18, 2),
    "binary": pa.binary(),
}
REQUEST_STATES = ("open", "drafting", "in_review", "fulfilled", "declined")
MAX_REQUIRED_APPROVALS = 10


class _PlanKeys(KeyResolver):
    """Stands in zero bytes for every key: a plan over a schema reads no data and no key."""

    def resolve(self, ref: Any) -> bytes:
        return bytes(32)


def plan_for_schema(document: Mapping[str, Any], schema: Mapping[str, str]) -> dict[str, Any]:
    """What ``document`` does to each column of ``schema`` ({column: type name}):
    ``{"columns": [...], "error": None}``, or the plan's error in words."""
    from cape_pipelines.plan import build_plan

    fields = [pa.field(name, SCHEMA_TYPES[kind]) for name, kind in schema.items()]
    try:
        plan = build_plan(dict(document), pa.schema(fields), resolver=_PlanKeys())
    except (CapeError, PolicyError) as exc:
        return {"columns": [], "error": str(exc)}
    return {"columns": plan.describe(), "error": None}


def side_by_side(old: str, new: str) -> list[dict[str, Any]]:
    """Rows of a side-by-side diff: ``{kind, left, right, left_no, right_no}`` where kind is
    ``same``, ``changed``, ``removed`` or ``added``."""
    a, b = old.splitlines(), new.splitlines()
    rows: list[dict[str, Any]] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            for k in range(i2 - i1):
                rows.append(_diff_row("same", a, b, i1 + k, j1 + k))
        else:
            n = max(i2 - i1, j2 - j1)
            for k in range(n):
                li = i1 + k if i1 + k < i2 else None
                rj = j1 + k if j1 + k < j2 else None
                kind = (
                    "changed"
                    if li is not None and rj is not None
                    else ("removed" if li is not None else "added")
                )
                rows.append(_diff_row(kind, a, b, li, rj))
    return rows


def _diff_row(
    kind: str, a: list[str], b: list[str], i: int | None, j: int | None
) -> dict[str, Any]:
    return {
        "kind": kind,
        "left": a[i] if i is not None else "",
        "right": b[j] if j is not None else "",
        "left_no": i + 1 if i is not None else None,
        "right_no": j + 1 if j is not None else None,
    }


class WorkflowService:
    """Requests, reviewers, approvals and comments, over the audit chain and the policies.

    It is the policies' ``review_gate``: an approval passes through :meth:`approval_gate`
    in the approving transaction, and only the one that reaches the label's number
    activates the version."""

    def __init__(self, chain: AuditChain, policies: PolicyService):
        self.chain = chain
        self.policies = policies
        self.engine = chain.engine
        policies.review_gate = self.approval_gate
        # The catalog's coverage of a version (label, document) -> report or None; set by
        # the coordinator so this service does not import the catalog.
        self.coverage: Callable[[str, Mapping[str, Any]], dict[str, Any] | None] | None = None

    # ---- requests -----------------------------------------------------------------------

    def create_request(
        self,
        actor: Principal,
        *,
        dataset: str,
        schema: Mapping[str, str],
        purpose: str,
        columns: Sequence[Mapping[str, str]],
    ) -> dict[str, Any]:
        """File a request for a policy over ``dataset``; returns it (state ``open``)."""
        purpose = purpose.strip()
        if not purpose:
            raise ApiError(422, "purpose_required", "say what the data is for")
        if not schema:
            raise ApiError(422, "schema_required", "give the dataset's columns and types")
        bad = sorted(k for k, v in schema.items() if v not in SCHEMA_TYPES)
        if bad:
            raise ApiError(
                422,
                "invalid_schema",
                f"column(s) {', '.join(bad)}: type must be one of {', '.join(SCHEMA_TYPES)}",
            )
        needed = []
        for i, col in enumerate(columns):
            name, why = str(col.get("name", "")), str(col.get("need", "")).strip()
            if name not in schema:
                raise ApiError(
                    422, "unknown_column", f"columns[{i}]: {name!r} is not in the dataset's schema"
                )
            if not why:
                raise ApiError(422, "need_required", f"columns[{i}]: say what {name} is needed for")
            needed.append({"name": name, "need": why})
        if not needed:
            raise ApiError(422, "columns_required", "name at least one column you need")
        dataset = dataset.strip()
        if not NAME_RE.fullmatch(dataset):
            raise ApiError(422, "invalid_dataset", "dataset must match [A-Za-z0-9][A-Za-z0-9._-]*")
        request_id = "req-" + secrets.token_hex(6)
        row = {
            "id": request_id,
            "dataset": dataset,
            "schema": json.dumps(dict(schema)),
            "purpose": purpose,
            "columns": json.dumps(needed),
            "requester": actor.name,
            "created_at": db.now(),
        }
        with self.chain.write() as (conn, appended):
            conn.execute(insert(requests_table), row)
            self.chain.record(
                conn,
                appended,
                actor,
                "request.created",
                None,
                request_id=request_id,
                dataset=dataset,
            )
        return self.get_request(actor, request_id)

    def list_requests(self, actor: Principal, state: str | None = None) -> list[dict[str, Any]]:
        """Requests, newest first; a requester sees only their own."""
        stmt = select(requests_table).order_by(requests_table.c.created_at.desc())
        if actor.role == "requester":
            stmt = stmt.where(requests_table.c.requester == actor.name)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).mappings().all()
            out = [self._request_info(conn, r) for r in rows]
        return [r for r in out if state is None or r["state"] == state]

    def get_request(self, actor: Principal, request_id: str) -> dict[str, Any]:
        """One request; a requester may read only their own (others look missing)."""
        with self.engine.connect() as conn:
            row = self._request_row(conn, request_id)
            if actor.role == "requester" and row["requester"] != actor.name:
                raise not_found(f"request {request_id}")
            return self._request_info(conn, row)

    def decline_request(self, actor: Principal, request_id: str, reason: str) -> dict[str, Any]:
        """Decline an open or drafting request with a reason (authors, admins)."""
        reason = reason.strip()
        if not reason:
            raise ApiError(422, "reason_required", "declining a request needs a reason")
        with self.chain.write() as (conn, appended):
            row = self._request_row(conn, request_id)
            state = self._request_state(conn, row)
            if state in ("declined", "fulfilled"):
                raise ApiError(409, "invalid_state", f"request {request_id} is {state}")
            conn.execute(
                update(requests_table)
                .where(requests_table.c.id == request_id)
                .values(declined_by=actor.name, declined_at=db.now(), decline_reason=reason)
            )
            self.chain.record(
                conn,
                appended,
                actor,
                "request.declined",
                row["label"],
                request_id=request_id,
                reason=reason,
            )
        return self.get_request(actor, request_id)

    def link_request(
        self, actor: Principal, request_id: str, label: str, version: int
    ) -> dict[str, Any]:
        """Link a version (by its author) to a request; the request follows that label."""
        with self.chain.write() as (conn, appended):
            row = self._request_row(conn, request_id)
            state = self._request_state(conn, row)
            if state in ("declined", "fulfilled"):
                raise ApiError(409, "invalid_state", f"request {request_id} is {state}")
            policy = self.policies.row(conn, label, version)
            if policy["author"] != actor.name:
                raise ApiError(403, "not_author", "only the version's author may link it")
            conn.execute(
                update(requests_table)
                .where(requests_table.c.id == request_id)
                .values(label=label, version=version, linked_by=actor.name)
            )
            self.chain.record(
                conn,
                appended,
                actor,
                "request.linked",
                label,
                request_id=request_id,
                version=version,
            )
        return self.get_request(actor, request_id)

    def _request_row(self, conn: Connection, request_id: str) -> Any:
        row = (
            conn.execute(select(requests_table).where(requests_table.c.id == request_id))
            .mappings()
            .first()
        )
        if row is None:
            raise not_found(f"request {request_id}")
        return row

    def _request_state(self, conn: Connection, row: Any) -> str:
        if row["declined_at"] is not None:
            return "declined"
        if row["label"] is None:
            return "open"
        states = set(
            conn.execute(
                select(db.policies.c.state).where(
                    db.policies.c.label == row["label"], db.policies.c.version >= row["version"]
                )
            ).scalars()
        )
        if states & {"active", "superseded"}:
            return "fulfilled"
        if "in_review" in states:
            return "in_review"
        return "drafting"

    def _request_info(self, conn: Connection, row: Any) -> dict[str, Any]:
        latest = None
        if row["label"] is not None:
            latest = conn.execute(
                select(func.max(db.policies.c.version)).where(db.policies.c.label == row["label"])
            ).scalar()
        return {
            "id": row["id"],
            "dataset": row["dataset"],
            "schema": json.loads(row["schema"]),
            "purpose": row["purpose"],
            "columns": json.loads(row["columns"]),
            "requester": row["requester"],
            "created_at": row["created_at"],
            "state": self._request_state(conn, row),
            "label": row["label"],
            "version": row["version"],
            "latest_version": latest,
            "linked_by": row["linked_by"],
            "declined_by": row["declined_by"],
            "declined_at": row["declined_at"],
            "decline_reason": row["decline_reason"],
        }

    def request_for_version(self, label: str, version: int) -> dict[str, Any] | None:
        """The request a version answers: the newest one linked to this label at or before
        ``version`` (a revision keeps its predecessor's request)."""
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    select(requests_table)
                    .where(requests_table.c.label == label, requests_table.c.version <= version)
                    .order_by(requests_table.c.version.desc(), requests_table.c.created_at.desc())
                )
                .mappings()
                .first()
            )
            return self._request_info(conn, row) if row is not None else None

    # ---- review settings and assignments ------------------------------------------------

    def set_review_settings(
        self,
        actor: Principal,
        label: str,
        *,
        required_approvals: int,
        reviewers: Sequence[str] = (),
    ) -> dict[str, Any]:
        """A label's approvals needed (2 = the two-person rule) and default reviewers (admin)."""
        _check_label(label)
        if not 1 <= required_approvals <= MAX_REQUIRED_APPROVALS:
            raise ApiError(
                422,
                "invalid_approvals",
                f"required approvals must be 1 to {MAX_REQUIRED_APPROVALS}",
            )
        names = _reviewer_names(reviewers)
        if names and len(names) < required_approvals:
            raise ApiError(
                422,
                "too_few_reviewers",
                f"{required_approvals} approvals need at least as many default reviewers",
            )
        values = {
            "required_approvals": required_approvals,
            "reviewers": json.dumps(names),
            "updated_by": actor.name,
            "updated_at": db.now(),
        }
        with self.chain.write() as (conn, appended):
            exists = conn.execute(
                select(review_settings.c.label).where(review_settings.c.label == label)
            ).first()
            if exists:
                conn.execute(
                    update(review_settings).where(review_settings.c.label == label).values(values)
                )
            else:
                conn.execute(insert(review_settings), {"label": label, **values})
            self.chain.record(
                conn,
                appended,
                actor,
                "review.settings_changed",
                label,
                required_approvals=required_approvals,
                reviewers=names,
            )
        return self.review_settings(label)

    def review_settings(self, label: str) -> dict[str, Any]:
        """A label's review settings (defaults: one approval, no default reviewers)."""
        with self.engine.connect() as conn:
            return self._settings(conn, label)

    def _settings(self, conn: Connection, label: str) -> dict[str, Any]:
        row = (
            conn.execute(select(review_settings).where(review_settings.c.label == label))
            .mappings()
            .first()
        )
        if row is None:
            return {"label": label, "required_approvals": 1, "reviewers": []}
        return {
            "label": label,
            "required_approvals": row["required_approvals"],
            "reviewers": json.loads(row["reviewers"]),
        }

    def assign(
        self, actor: Principal, label: str, version: int, reviewers: Sequence[str]
    ) -> dict[str, Any]:
        """Assign reviewers to a draft or in-review version (its author, or an admin)."""
        names = _reviewer_names(reviewers)
        if not names:
            raise ApiError(422, "reviewers_required", "name at least one reviewer")
        with self.chain.write() as (conn, appended):
            row = self.policies.row(conn, label, version)
            if row["state"] not in ("draft", "in_review"):
                raise ApiError(409, "invalid_state", f"version {version} is {row['state']}")
            if actor.role != "admin" and row["author"] != actor.name:
                raise ApiError(403, "not_author", "only the version's author or an admin assigns")
            if row["author"] in names:
                raise ApiError(422, "author_as_reviewer", "the author cannot review their version")
            self._check_reviewer_tokens(conn, names)
            have = set(
                conn.execute(
                    select(assignments.c.reviewer).where(
                        assignments.c.label == label, assignments.c.version == version
                    )
                ).scalars()
            )
            fresh = [n for n in names if n not in have]
            if fresh:
                stamp = db.now()
                conn.execute(
                    insert(assignments),
                    [
                        {
                            "label": label,
                            "version": version,
                            "reviewer": n,
                            "assigned_by": actor.name,
                            "assigned_at": stamp,
                        }
                        for n in fresh
                    ],
                )
            self.chain.record(
                conn, appended, actor, "review.assigned", label, version=version, reviewers=names
            )
        return self.review_state(label, version)

    def _check_reviewer_tokens(self, conn: Connection, names: Sequence[str]) -> None:
        """Every name must hold a live reviewer token: assigning anyone else would block
        the version forever."""
        known = set(
            conn.execute(
                select(db.tokens.c.name).where(
                    db.tokens.c.role == "reviewer", db.tokens.c.revoked_at.is_(None)
                )
            ).scalars()
        )
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ApiError(
                422, "unknown_reviewer", f"no reviewer token named {', '.join(sorted(unknown))}"
            )

    def _thread_versions(self, conn: Connection, label: str, version: int) -> list[int]:
        """``version`` and the versions it revises: earlier ones sent back with "request
        changes", without a version of another outcome in between (newest first)."""
        rows = conn.execute(
            select(db.policies.c.version, db.policies.c.state)
            .where(db.policies.c.label == label, db.policies.c.version <= version)
            .order_by(db.policies.c.version.desc())
        ).all()
        out: list[int] = []
        for v, state in rows:
            if v == version:
                out.append(v)
            elif state == "returned":
                out.append(v)
            else:
                break
        return out

    def _reviewers(self, conn: Connection, label: str, version: int) -> list[str]:
        """Who reviews ``version``: the label's default reviewers and those assigned to it
        (or to the version it revises); empty means any reviewer."""
        names = set(self._settings(conn, label)["reviewers"])
        for v in self._thread_versions(conn, label, version):
            assigned = set(
                conn.execute(
                    select(assignments.c.reviewer).where(
                        assignments.c.label == label, assignments.c.version == v
                    )
                ).scalars()
            )
            if assigned:
                names |= assigned
                break
        return sorted(names)

    def review_state(self, label: str, version: int) -> dict[str, Any]:
        """Reviewers, approvals so far and approvals required for a version."""
        with self.engine.connect() as conn:
            row = self.policies.row(conn, label, version)
            return self._review_state(conn, row)

    def _review_state(self, conn: Connection, row: Any) -> dict[str, Any]:
        label, version = row["label"], row["version"]
        approved = list(
            conn.execute(
                select(approvals.c.reviewer)
                .where(approvals.c.label == label, approvals.c.version == version)
                .order_by(approvals.c.approved_at)
            ).scalars()
        )
        return {
            "label": label,
            "version": version,
            "state": row["state"],
            "author": row["author"],
            "reviewers": self._reviewers(conn, label, version),
            "approvals": approved,
            "required_approvals": self._settings(conn, label)["required_approvals"],
        }

    # ---- decisions ------------------------------------------------------------------------

    def _check_reviewer(self, conn: Connection, actor: Principal, row: Any) -> None:
        if row["author"] == actor.name:
            raise ApiError(403, "self_approval", "the author of a policy cannot review it")
        reviewers = self._reviewers(conn, row["label"], row["version"])
        if reviewers and actor.name not in reviewers:
            raise ApiError(403, "not_assigned", "you are not assigned to review this version")

    def approve(self, actor: Principal, label: str, version: int) -> dict[str, Any]:
        """Approve a version in review (see :meth:`approval_gate`)."""
        return self.policies.approve(actor, label, version)

    def approval_gate(
        self, conn: Connection, appended: list[dict[str, Any]], actor: Principal, row: Any
    ) -> bool:
        """Record ``actor``'s approval of ``row`` (in review, not theirs); True when it is
        the one that reaches the label's required number (the caller then activates)."""
        label, version = row["label"], row["version"]
        self._check_reviewer(conn, actor, row)
        done = set(
            conn.execute(
                select(approvals.c.reviewer).where(
                    approvals.c.label == label, approvals.c.version == version
                )
            ).scalars()
        )
        if actor.name in done:
            raise ApiError(409, "already_approved", "you have already approved this version")
        conn.execute(
            insert(approvals),
            {"label": label, "version": version, "reviewer": actor.name, "approved_at": db.now()},
        )
        required = int(self._settings(conn, label)["required_approvals"])
        count = len(done) + 1
        self.chain.record(
            conn,
            appended,
            actor,
            "policy.approval_recorded",
            label,
            version=version,
            approvals=count,
            required=required,
        )
        return count >= required

    def request_changes(
        self, actor: Principal, label: str, version: int, reason: str
    ) -> dict[str, Any]:
        """in_review -> returned ("changes requested"): back to the author, whose next
        version keeps the thread (the reason is also posted as a comment)."""
        reason = reason.strip()
        if not reason:
            raise ApiError(422, "reason_required", "say what should change")
        with self.chain.write() as (conn, appended):
            row = self.policies.in_state(conn, label, version, "in_review")
            self._check_reviewer(conn, actor, row)
            stamp = db.now()
            conn.execute(
                update(db.policies)
                .where(db.policies.c.id == row["id"])
                .values(
                    state="returned",
                    reviewed_by=actor.name,
                    reviewed_at=stamp,
                    reason=reason,
                )
            )
            conn.execute(
                insert(comments),
                {
                    "label": label,
                    "version": version,
                    "author": actor.name,
                    "role": actor.role,
                    "body": f"Changes requested: {reason}",
                    "created_at": stamp,
                },
            )
            self.chain.record(
                conn,
                appended,
                actor,
                "policy.changes_requested",
                label,
                version=version,
                reason=reason,
            )
        return self.policies.info(label, version)

    # ---- comments ---------------------------------------------------------------------------

    def comment(
        self,
        actor: Principal,
        label: str,
        version: int,
        body: str,
        *,
        rule: int | None = None,
        reply_to: int | None = None,
    ) -> dict[str, Any]:
        """Add a comment to a version's thread, optionally on rule ``rule`` (0-based) or as
        a reply to comment ``reply_to`` of the same thread."""
        body = body.strip()
        if not body:
            raise ApiError(422, "comment_empty", "a comment needs text")
        with self.chain.write() as (conn, appended):
            row = self.policies.row(conn, label, version)
            if rule is not None:
                n_rules = len(json.loads(row["document"]).get("rules", []))
                if not 0 <= rule < n_rules:
                    raise ApiError(
                        422, "unknown_rule", f"rule {rule} does not exist (version has {n_rules})"
                    )
            if reply_to is not None:
                parent = conn.execute(
                    select(comments.c.label, comments.c.version).where(comments.c.id == reply_to)
                ).first()
                thread = self._thread_versions(conn, label, version)
                if parent is None or parent[0] != label or parent[1] not in thread:
                    raise ApiError(
                        422, "unknown_comment", f"comment {reply_to} is not in this thread"
                    )
            result = conn.execute(
                insert(comments),
                {
                    "label": label,
                    "version": version,
                    "author": actor.name,
                    "role": actor.role,
                    "body": body,
                    "rule": rule,
                    "reply_to": reply_to,
                    "created_at": db.now(),
                },
            )
            key = result.inserted_primary_key
            assert key is not None  # an INSERT of one row always has one
            comment_id = int(key[0])
            self.chain.record(
                conn,
                appended,
                actor,
                "policy.commented",
                label,
                version=version,
                comment_id=comment_id,
                rule=rule,
                reply_to=reply_to,
            )
        return next(c for c in self.comments(label, version) if c["id"] == comment_id)

    def comments(self, label: str, version: int) -> list[dict[str, Any]]:
        """The thread of ``version``: its comments and those of the versions it revises,
        oldest first."""
        with self.engine.connect() as conn:
            self.policies.row(conn, label, version)
            thread = self._thread_versions(conn, label, version)
            rows = conn.execute(
                select(comments)
                .where(comments.c.label == label, comments.c.version.in_(thread))
                .order_by(comments.c.id)
            ).mappings()
            return [dict(r) for r in rows]

    # ---- what a reviewer needs ------------------------------------------------------------

    def review(self, label: str, version: int) -> dict[str, Any]:
        """Everything to decide on a version: its document, the diff against the active
        version (for the active version itself, against the one it replaced), the plan
        against the requested dataset's schema, who asked and why, the reviewers,
        approvals and the comment thread."""
        with self.engine.connect() as conn:
            row = self.policies.row(conn, label, version)
            state = self._review_state(conn, row)
            active = (
                conn.execute(
                    select(db.policies).where(
                        db.policies.c.label == label, db.policies.c.state == "active"
                    )
                )
                .mappings()
                .first()
            )
            base = active
            if active is not None and active["version"] == version:
                base = (
                    conn.execute(
                        select(db.policies)
                        .where(
                            db.policies.c.label == label,
                            db.policies.c.version < version,
                            db.policies.c.state == "superseded",
                        )
                        .order_by(db.policies.c.version.desc())
                    )
                    .mappings()
                    .first()
                )
        document = json.loads(row["document"])
        new_text = canonical_yaml(document)
        old_text = canonical_yaml(json.loads(base["document"])) if base else ""
        request = self.request_for_version(label, version)
        plan = plan_for_schema(document, request["schema"]) if request else None
        return {
            **state,
            "policy": self.policies.info(label, version),
            "document": document,
            "yaml": new_text,
            "active_version": active["version"] if active else None,
            "base_version": base["version"] if base else None,
            "diff": "".join(
                difflib.unified_diff(
                    old_text.splitlines(keepends=True),
                    new_text.splitlines(keepends=True),
                    fromfile=f"{label}@{base['version']}" if base else "(no earlier version)",
                    tofile=f"{label}@{version}",
                )
            ),
            "side_by_side": side_by_side(old_text, new_text),
            "request": request,
            "plan": plan,
            "coverage": self.coverage(label, document) if self.coverage else None,
            "comments": self.comments(label, version),
        }


def _check_label(label: str) -> None:
    if not LABEL_RE.fullmatch(label):
        raise ApiError(422, "invalid_label", "labels must match [a-z0-9][a-z0-9._-]{0,127}")


def _reviewer_names(names: Sequence[str]) -> list[str]:
    out = sorted({n.strip() for n in names if n.strip()})
    bad = [n for n in out if not PRINCIPAL_RE.fullmatch(n)]
    if bad:
        raise ApiError(
            422, "invalid_name", "reviewer names must match [A-Za-z0-9][A-Za-z0-9._@:-]*"
        )
    return out
