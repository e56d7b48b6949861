"""The governance catalog: datasets, their columns' Arrow types, and tags on columns.

A dataset is a name, an owner and a schema (column -> Arrow type name); its
columns carry tags from a taxonomy (the built-ins of :data:`BUILTIN_TAGS` and
the ``quasi_identifier.*`` family, extended by the operator). Tags reach a
column only by a person's act: set directly (``catalog.tagged``) or by
accepting a scanner's proposal (``catalog.proposal_accepted``); a proposal
itself changes no tag. Every change is a chain record naming who and when, so
the audit trail answers "who said this column is an e-mail address". Policies
matching ``{tag: ...}`` resolve through :meth:`CatalogService.column_tags` at
plan time, and :meth:`CatalogService.coverage_gate` refuses the approval of a
version that leaves a tagged column uncovered when the label's catalog setting
asks for it.

Why one module over 500 lines: :class:`CatalogService` is one service whose
every method is one transaction that changes the catalog and writes its chain
record; datasets, tags, proposals and the coverage gate share its tables and
its checks.
"""

from __future__ import annotations

import builtins
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    String,
    Table,
    Text,
    delete,
    insert,
    select,
    update,
)

from cape_pipelines.coverage import coverage_report
from cape_pipelines.errors import CapeError, PolicyError
from cape_pipelines.policy.models import LABEL_RE

from .. import db
from ..errors import ApiError, not_found
from .base import NAME_RE, PRINCIPAL_RE, Principal
from .chain import AuditChain

# ---- tables (created by migration 0004) ----------------------------------------------------

datasets = Table(
    "catalog_datasets",
    db.metadata,
    Column("name", String(128), primary_key=True),
    Column("owner", String(128), nullable=False),
    Column("schema", Text, nullable=False),
    Column("created_by", String(128), nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("updated_at", String(32), nullable=False),
)

column_tags = Table(
    "catalog_column_tags",
    db.metadata,
    Column("dataset", String(128), primary_key=True),
    Column("column", String(128), primary_key=True),
    Column("tag", String(128), primary_key=True),
    Column("tagged_by", String(128), nullable=False),
    Column("tagged_at", String(32), nullable=False),
    Column("source", String(32), nullable=False),
)

taxonomy = Table(
    "catalog_taxonomy",
    db.metadata,
    Column("tag", String(128), primary_key=True),
    Column("description", Text, nullable=False),
    Column("created_by", String(128), nullable=False),
    Column("created_at", String(32), nullable=False),
)

proposals = Table(
    "catalog_proposals",
    db.metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("dataset", String(128), nullable=False),
    Column("column", String(128), nullable=False),
    Column("tag", String(128), nullable=False),
    Column("confidence", Float, nullable=False),
    Column("evidence", Integer, nullable=False),
    Column("sampled", Integer, nullable=False),
    Column("detector", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("proposed_by", String(128), nullable=False),
    Column("proposed_at", String(32), nullable=False),
    Column("decided_by", String(128)),
    Column("decided_at", String(32)),
    Column("reason", Text),
    Index("ix_catalog_proposals_dataset_state", "dataset", "state"),
)

label_settings = Table(
    "catalog_label_settings",
    db.metadata,
    Column("label", String(128), primary_key=True),
    Column("dataset", String(128), nullable=False),
    Column("require_coverage", Boolean, nullable=False),
    Column("updated_by", String(128), nullable=False),
    Column("updated_at", String(32), nullable=False),
)

CATALOG_TABLES = [datasets, column_tags, taxonomy, proposals, label_settings]

BUILTIN_TAGS: dict[str, str] = {
    "pii.email": "an e-mail address",
    "pii.phone": "a telephone number",
    "pii.name": "a person's name",
    "pii.ssn": "a US social security number",
    "pii.birth_date": "a date of birth",
    "pii.address": "a postal address",
    "pii.ip": "an IPv4 or IPv6 address",
    "financial.card_number": "a payment card number",
    "financial.iban": "an international bank account number",
    "quasi_identifier.*": "a quasi-identifier (age, postcode, gender ...): any tag below it",
    "pii.national_id.*": (
        "a national identity number (pii.national_id.fr_nir, .es_dni ...): any tag below it"
    ),
}
TAG_RE = re.compile(r"[a-z][a-z0-9_]{0,63}(?:\.[a-z0-9_]{1,63}){1,3}")
FAMILY_RE = re.compile(r"[a-z][a-z0-9_]{0,63}(?:\.[a-z0-9_]{1,63}){0,2}\.\*")
COLUMN_RE = re.compile(r"[^\x00-\x1f\x7f]{1,128}")
TYPE_RE = re.compile(r"[a-z][A-Za-z0-9_\[\](), =:/+.<>-]{0,127}")
MAX_COLUMNS = 2000
PROPOSAL_STATES = ("pending", "accepted", "rejected")


def _check_dataset_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise ApiError(
            422, "invalid_dataset", "dataset names must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}"
        )


class CatalogService:
    """Datasets, tags, the taxonomy, scanner proposals and per-label coverage settings."""

    def __init__(self, chain: AuditChain):
        self.chain = chain
        self.engine = chain.engine

    # ---- taxonomy -----------------------------------------------------------------------

    def taxonomy(self) -> list[dict[str, Any]]:
        """The built-in tags and the operator's, each with who added it (None: built in)."""
        out = [
            {"tag": t, "description": d, "builtin": True, "created_by": None}
            for t, d in BUILTIN_TAGS.items()
        ]
        with self.engine.connect() as conn:
            rows = conn.execute(select(taxonomy).order_by(taxonomy.c.tag)).mappings().all()
        out += [
            {
                "tag": r["tag"],
                "description": r["description"],
                "builtin": False,
                "created_by": r["created_by"],
            }
            for r in rows
        ]
        return out

    def add_tag(self, actor: Principal, tag: str, description: str) -> dict[str, Any]:
        """Extend the taxonomy with ``tag`` (or a family ``prefix.*``)."""
        if not (TAG_RE.fullmatch(tag) or FAMILY_RE.fullmatch(tag)):
            raise ApiError(
                422,
                "invalid_tag",
                "tags are dotted lower-case names (pii.email) or a family (pii.health.*)",
            )
        with self.chain.write() as (conn, appended):
            if (
                tag in BUILTIN_TAGS
                or conn.execute(select(taxonomy.c.tag).where(taxonomy.c.tag == tag)).first()
            ):
                raise ApiError(409, "tag_exists", f"tag {tag} is already in the taxonomy")
            conn.execute(
                insert(taxonomy),
                {
                    "tag": tag,
                    "description": description,
                    "created_by": actor.name,
                    "created_at": db.now(),
                },
            )
            self.chain.record(conn, appended, actor, "catalog.tag_defined", tag=tag)
        return {"tag": tag, "description": description, "builtin": False, "created_by": actor.name}

    def _known(self, conn: Connection, tag: str) -> bool:
        if not TAG_RE.fullmatch(tag):
            return False
        extra = set(conn.execute(select(taxonomy.c.tag)).scalars())
        names = set(BUILTIN_TAGS) | extra
        if tag in names:
            return True
        parts = tag.split(".")
        return any(".".join(parts[:i]) + ".*" in names for i in range(1, len(parts)))

    def _check_tag(self, conn: Connection, tag: str) -> None:
        if not self._known(conn, tag):
            raise ApiError(
                422, "unknown_tag", f"tag {tag} is not in the taxonomy (see GET /v1/catalog/tags)"
            )

    # ---- datasets -------------------------------------------------------------------------

    def register(
        self, actor: Principal, name: str, owner: str, schema: Mapping[str, str]
    ) -> dict[str, Any]:
        """Create a dataset, or replace its schema (its tags on columns kept stay; tags on
        columns the new schema lacks are removed, each removal audited)."""
        _check_dataset_name(name)
        if not PRINCIPAL_RE.fullmatch(owner):
            raise ApiError(422, "invalid_owner", "owner must be a name like ann@example.com")
        if not schema or len(schema) > MAX_COLUMNS:
            raise ApiError(422, "invalid_schema", f"give 1 to {MAX_COLUMNS} columns")
        for col, kind in schema.items():
            if not COLUMN_RE.fullmatch(col):
                raise ApiError(422, "invalid_schema", "a column name is empty or has controls")
            if not TYPE_RE.fullmatch(kind):
                raise ApiError(
                    422, "invalid_schema", f"column {col!r}: {kind!r} is not an Arrow type name"
                )
        stamp = db.now()
        text = json.dumps(dict(schema))
        with self.chain.write() as (conn, appended):
            row = conn.execute(select(datasets).where(datasets.c.name == name)).mappings().first()
            if row is None:
                conn.execute(
                    insert(datasets),
                    {
                        "name": name,
                        "owner": owner,
                        "schema": text,
                        "created_by": actor.name,
                        "created_at": stamp,
                        "updated_at": stamp,
                    },
                )
                event = "catalog.dataset_registered"
            else:
                conn.execute(
                    update(datasets)
                    .where(datasets.c.name == name)
                    .values(owner=owner, schema=text, updated_at=stamp)
                )
                event = "catalog.dataset_updated"
                gone = [
                    (r["column"], r["tag"])
                    for r in conn.execute(
                        select(column_tags).where(column_tags.c.dataset == name)
                    ).mappings()
                    if r["column"] not in schema
                ]
                for col, tag in gone:
                    conn.execute(
                        delete(column_tags).where(
                            column_tags.c.dataset == name,
                            column_tags.c.column == col,
                            column_tags.c.tag == tag,
                        )
                    )
                    self.chain.record(
                        conn,
                        appended,
                        actor,
                        "catalog.untagged",
                        dataset=name,
                        column=col,
                        tag=tag,
                        why="column left the schema",
                    )
            self.chain.record(
                conn, appended, actor, event, dataset=name, owner=owner, columns=len(schema)
            )
        return self.get(name)

    def list(self) -> list[dict[str, Any]]:
        """Every dataset with its tags."""
        with self.engine.connect() as conn:
            names = list(conn.execute(select(datasets.c.name).order_by(datasets.c.name)).scalars())
            return [self._info(conn, n) for n in names]

    def get(self, name: str) -> dict[str, Any]:
        """A dataset: owner, schema, and each column's tags with who tagged it and when."""
        with self.engine.connect() as conn:
            return self._info(conn, name)

    def _info(self, conn: Connection, name: str) -> dict[str, Any]:
        row = conn.execute(select(datasets).where(datasets.c.name == name)).mappings().first()
        if row is None:
            raise not_found(f"dataset {name}")
        schema = json.loads(row["schema"])
        tags: dict[str, list[dict[str, Any]]] = {c: [] for c in schema}
        for r in conn.execute(
            select(column_tags)
            .where(column_tags.c.dataset == name)
            .order_by(column_tags.c.column, column_tags.c.tag)
        ).mappings():
            tags.setdefault(r["column"], []).append(
                {
                    "tag": r["tag"],
                    "tagged_by": r["tagged_by"],
                    "tagged_at": r["tagged_at"],
                    "source": r["source"],
                }
            )
        return {
            "name": name,
            "owner": row["owner"],
            "created_by": row["created_by"],
            "created_at": row["created_at"],
            "updated_at": row["updated_at"],
            "columns": [{"name": c, "type": t, "tags": tags.get(c, [])} for c, t in schema.items()],
        }

    def column_tags(self, name: str) -> dict[str, builtins.list[str]]:
        """{column: [tag, ...]} of a dataset: what ``column_tags=`` takes at plan time."""
        info = self.get(name)
        return {c["name"]: [t["tag"] for t in c["tags"]] for c in info["columns"] if c["tags"]}

    # ---- tags -------------------------------------------------------------------------------

    def tag(
        self, actor: Principal, name: str, column: str, tag: str, *, source: str = "manual"
    ) -> dict[str, Any]:
        """Put ``tag`` on a column (a person's act, audited)."""
        with self.chain.write() as (conn, appended):
            self._tag(conn, appended, actor, name, column, tag, source)
        return self.get(name)

    def _tag(
        self,
        conn: Connection,
        appended: builtins.list[dict[str, Any]],
        actor: Principal,
        name: str,
        column: str,
        tag: str,
        source: str,
    ) -> None:
        row = conn.execute(select(datasets.c.schema).where(datasets.c.name == name)).first()
        if row is None:
            raise not_found(f"dataset {name}")
        if column not in json.loads(row[0]):
            raise ApiError(404, "not_found", f"dataset {name} has no column {column!r}")
        self._check_tag(conn, tag)
        exists = conn.execute(
            select(column_tags.c.tag).where(
                column_tags.c.dataset == name,
                column_tags.c.column == column,
                column_tags.c.tag == tag,
            )
        ).first()
        if exists:
            raise ApiError(409, "already_tagged", f"column {column!r} already has tag {tag}")
        conn.execute(
            insert(column_tags),
            {
                "dataset": name,
                "column": column,
                "tag": tag,
                "tagged_by": actor.name,
                "tagged_at": db.now(),
                "source": source,
            },
        )
        self.chain.record(
            conn,
            appended,
            actor,
            "catalog.tagged",
            dataset=name,
            column=column,
            tag=tag,
            source=source,
        )

    def untag(self, actor: Principal, name: str, column: str, tag: str) -> dict[str, Any]:
        """Take ``tag`` off a column (audited)."""
        with self.chain.write() as (conn, appended):
            gone = conn.execute(
                delete(column_tags).where(
                    column_tags.c.dataset == name,
                    column_tags.c.column == column,
                    column_tags.c.tag == tag,
                )
            ).rowcount
            if not gone:
                raise not_found(f"tag {tag} on {name}.{column}")
            self.chain.record(
                conn, appended, actor, "catalog.untagged", dataset=name, column=column, tag=tag
            )
        return self.get(name)

    # ---- scanner proposals -------------------------------------------------------------------

    def propose(
        self, actor: Principal, name: str, items: Sequence[Mapping[str, Any]]
    ) -> builtins.list[dict[str, Any]]:
        """Store a scan's proposals as pending (no tag changes); a pending proposal for the
        same column and tag is replaced by the newer evidence."""
        stamp = db.now()
        with self.chain.write() as (conn, appended):
            row = conn.execute(select(datasets.c.schema).where(datasets.c.name == name)).first()
            if row is None:
                raise not_found(f"dataset {name}")
            schema = json.loads(row[0])
            for i, item in enumerate(items):
                if item["column"] not in schema:
                    raise ApiError(
                        422,
                        "unknown_column",
                        f"proposals[{i}]: dataset {name} has no column {item['column']!r}",
                    )
                if not self._known(conn, item["tag"]):
                    raise ApiError(
                        422, "unknown_tag", f"proposals[{i}]: tag {item['tag']} is not known"
                    )
            ids = []
            for item in items:
                conn.execute(
                    delete(proposals).where(
                        proposals.c.dataset == name,
                        proposals.c.column == item["column"],
                        proposals.c.tag == item["tag"],
                        proposals.c.state == "pending",
                    )
                )
                res = conn.execute(
                    insert(proposals),
                    {
                        "dataset": name,
                        "column": item["column"],
                        "tag": item["tag"],
                        "confidence": float(item["confidence"]),
                        "evidence": int(item["evidence"]),
                        "sampled": int(item["sampled"]),
                        "detector": item["detector"],
                        "state": "pending",
                        "proposed_by": actor.name,
                        "proposed_at": stamp,
                    },
                )
                key = res.inserted_primary_key
                assert key is not None  # an insert into a table with a primary key has one
                ids.append(int(key[0]))
            self.chain.record(
                conn, appended, actor, "catalog.proposals_made", dataset=name, count=len(ids)
            )
        return [self._proposal(i) for i in ids]

    def _proposal(self, pid: int, conn: Connection | None = None) -> dict[str, Any]:
        stmt = select(proposals).where(proposals.c.id == pid)
        if conn is None:
            with self.engine.connect() as c:
                row = c.execute(stmt).mappings().first()
        else:
            row = conn.execute(stmt).mappings().first()
        if row is None:
            raise not_found(f"proposal {pid}")
        return dict(row)

    def proposals(
        self, name: str | None = None, state: str | None = None
    ) -> builtins.list[dict[str, Any]]:
        """Proposals, oldest first, of one dataset and/or one state."""
        stmt = select(proposals).order_by(proposals.c.id)
        if name is not None:
            stmt = stmt.where(proposals.c.dataset == name)
        if state is not None:
            stmt = stmt.where(proposals.c.state == state)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(stmt.limit(5000)).mappings()]

    def decide(
        self, actor: Principal, pid: int, accept: bool, reason: str | None = None
    ) -> dict[str, Any]:
        """Accept (the tag goes on the column, by ``actor``) or reject a pending proposal."""
        with self.chain.write() as (conn, appended):
            row = self._proposal(pid, conn)
            if row["state"] != "pending":
                raise ApiError(409, "already_decided", f"proposal {pid} is {row['state']}")
            if accept:
                already = conn.execute(
                    select(column_tags.c.tag).where(
                        column_tags.c.dataset == row["dataset"],
                        column_tags.c.column == row["column"],
                        column_tags.c.tag == row["tag"],
                    )
                ).first()
                if not already:
                    self._tag(
                        conn, appended, actor, row["dataset"], row["column"], row["tag"], "scan"
                    )
            conn.execute(
                update(proposals)
                .where(proposals.c.id == pid)
                .values(
                    state="accepted" if accept else "rejected",
                    decided_by=actor.name,
                    decided_at=db.now(),
                    reason=reason,
                )
            )
            self.chain.record(
                conn,
                appended,
                actor,
                "catalog.proposal_accepted" if accept else "catalog.proposal_rejected",
                dataset=row["dataset"],
                column=row["column"],
                tag=row["tag"],
                proposal=pid,
            )
            return self._proposal(pid, conn)

    # ---- coverage -------------------------------------------------------------------------------

    def set_label_settings(
        self, actor: Principal, label: str, dataset: str, require_coverage: bool
    ) -> dict[str, Any]:
        """Tie ``label`` to the dataset its policies are written for; with
        ``require_coverage`` an approval that leaves a tagged column uncovered is refused."""
        if not LABEL_RE.fullmatch(label):
            raise ApiError(422, "invalid_label", "labels must match [a-z0-9][a-z0-9._-]{0,127}")
        _check_dataset_name(dataset)
        values = {
            "dataset": dataset,
            "require_coverage": require_coverage,
            "updated_by": actor.name,
            "updated_at": db.now(),
        }
        with self.chain.write() as (conn, appended):
            if (
                conn.execute(select(datasets.c.name).where(datasets.c.name == dataset)).first()
                is None
            ):
                raise not_found(f"dataset {dataset}")
            if conn.execute(
                select(label_settings.c.label).where(label_settings.c.label == label)
            ).first():
                conn.execute(
                    update(label_settings).where(label_settings.c.label == label).values(values)
                )
            else:
                conn.execute(insert(label_settings), {"label": label, **values})
            self.chain.record(
                conn,
                appended,
                actor,
                "catalog.coverage_settings_changed",
                label,
                dataset=dataset,
                require_coverage=require_coverage,
            )
        return self.label_settings(label) or {}

    def label_settings(self, label: str, conn: Connection | None = None) -> dict[str, Any] | None:
        """The label's dataset and coverage rule, None when it has none."""
        stmt = select(label_settings).where(label_settings.c.label == label)
        if conn is None:
            with self.engine.connect() as c:
                row = c.execute(stmt).mappings().first()
        else:
            row = conn.execute(stmt).mappings().first()
        if row is None:
            return None
        return {
            "label": label,
            "dataset": row["dataset"],
            "require_coverage": bool(row["require_coverage"]),
        }

    def coverage(
        self, document: Mapping[str, Any], dataset: str, conn: Connection | None = None
    ) -> dict[str, Any]:
        """The coverage report of a policy document against a dataset's tagged columns."""
        if conn is None:
            with self.engine.connect() as c:
                info = self._info(c, dataset)
        else:
            info = self._info(conn, dataset)
        cols = [c["name"] for c in info["columns"]]
        tags = {c["name"]: [t["tag"] for t in c["tags"]] for c in info["columns"]}
        try:
            report = coverage_report(dict(document), cols, tags).to_dict()
        except (CapeError, PolicyError) as exc:
            raise ApiError(422, "invalid_policy", str(exc)) from None
        return {"dataset": dataset, **report}

    def label_coverage(
        self, label: str, document: Mapping[str, Any], conn: Connection | None = None
    ) -> dict[str, Any] | None:
        """The coverage of a version of ``label`` against the label's dataset (None when the
        label has no catalog setting), with whether the setting makes it blocking."""
        settings = self.label_settings(label, conn)
        if settings is None:
            return None
        report = self.coverage(document, settings["dataset"], conn)
        return {**report, "required": settings["require_coverage"]}

    def coverage_gate(self, conn: Connection, label: str, document: Mapping[str, Any]) -> None:
        """409 ``coverage_incomplete`` when the label requires coverage and the version leaves
        a tagged column uncovered (called inside the approval's transaction)."""
        report = self.label_coverage(label, document, conn)
        if report is None or not report["required"] or report["complete"]:
            return
        missing = ", ".join(f"{u['column']} ({', '.join(u['tags'])})" for u in report["uncovered"])
        raise ApiError(
            409,
            "coverage_incomplete",
            f"label {label} requires every tagged column of dataset {report['dataset']} to be"
            f" covered; no rule covers: {missing}",
            uncovered=report["uncovered"],
        )
