"""Policies and their review: push a draft, submit, approve (activates and signs), reject,
and read versions, history, diffs and the active version a pipeline fetches.

A version's document is validated in full before it is stored (a policy that
validates must apply) and never holds key material inline. The workflow's one
state check is :meth:`PolicyService.in_state`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from sqlalchemy import Connection, func, insert, select, update

from cape_pipelines.errors import PolicyError
from cape_pipelines.policy import canonical_json, load_policy

from .. import db
from ..crypto import b64e
from ..errors import ApiError, not_found
from .base import Principal, check_label_access, refuse_control_chars
from .chain import AuditChain, activations

# What a policy envelope's signature covers: this prefix, then the envelope's bytes.
ENVELOPE_DOMAIN = b"cape.policy-envelope.v1\n"


@dataclass(frozen=True)
class ActivePolicy:
    """A label's active version as served: canonical bytes, their sha256, the version, the
    envelope's canonical JSON and the Ed25519 signature over ``ENVELOPE_DOMAIN`` + it."""

    body: bytes
    sha256: str
    version: int
    envelope: bytes
    signature: str


_INFO_FIELDS = (
    "label",
    "version",
    "state",
    "sha256",
    "author",
    "created_at",
    "submitted_at",
    "reviewed_by",
    "reviewed_at",
    "reason",
    "activated_at",
)


def _loc(path: Sequence[str | int]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "policy"


def inline_key_locations(document: Any) -> list[str]:
    """Locations of ``key`` fields that hold key material instead of ``{secret: NAME}``."""
    found: list[str] = []

    def walk(node: Any, path: list[str | int]) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                if k == "key" and not (
                    isinstance(v, Mapping) and set(v) == {"secret"} and isinstance(v["secret"], str)
                ):
                    found.append(_loc([*path, k]))
                else:
                    walk(v, [*path, str(k)])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, [*path, i])

    walk(document, [])
    return found


def canonical_yaml(document: Any) -> str:
    """The document as sorted, block-style YAML: what diffs are computed over."""
    return str(
        yaml.safe_dump(
            document, sort_keys=True, default_flow_style=False, allow_unicode=True, width=100
        )
    )


def policy_info(row: Mapping[Any, Any], with_document: bool) -> dict[str, Any]:
    """A version's metadata (and its document, on request)."""
    info = {k: row[k] for k in _INFO_FIELDS}
    if with_document:
        info["document"] = json.loads(row["document"])
    return info


class PolicyService:
    """Policy versions and their review workflow."""

    def __init__(self, chain: AuditChain, signer: Any):
        self.chain = chain
        self.engine = chain.engine
        self._signer = signer
        # The workflow's check before activation (assigned reviewers, approvals needed):
        # called in the approving transaction; False records the approval without activating.
        self.review_gate: Callable[[Connection, list[dict[str, Any]], Principal, Any], bool] | None
        self.review_gate = None

    def push(self, actor: Principal, document: Any) -> dict[str, Any]:
        """Store a new draft version of a policy after full validation; its version is assigned."""
        if not isinstance(document, Mapping):
            raise ApiError(
                422,
                "invalid_policy",
                "a policy must be a mapping",
                problems=[
                    {"loc": "policy", "msg": "a policy must be a mapping (label, rules, ...)"}
                ],
            )
        refuse_control_chars(dict(document), "document")
        doc = json.loads(canonical_json(document))
        try:
            load_policy(doc)
        except PolicyError as exc:
            raise ApiError(
                422,
                "invalid_policy",
                f"invalid policy ({len(exc.problems)} problem(s))",
                problems=[{"loc": loc, "msg": msg} for loc, msg in exc.problems],
            ) from None
        inline = inline_key_locations(doc)
        if inline:
            raise ApiError(
                422,
                "inline_key",
                "policy holds key material; reference keys as {secret: NAME}",
                problems=[{"loc": loc, "msg": "key material inline"} for loc in inline],
            )
        label = doc["label"]
        with self.chain.write() as (conn, appended):
            latest = conn.execute(
                select(func.max(db.policies.c.version)).where(db.policies.c.label == label)
            ).scalar()
            version = (latest or 0) + 1
            doc["version"] = version
            body = canonical_json(doc)
            sha = hashlib.sha256(body).hexdigest()
            stamp = db.now()
            conn.execute(
                insert(db.policies),
                {
                    "label": label,
                    "version": version,
                    "state": "draft",
                    "document": body.decode("utf-8"),
                    "sha256": sha,
                    "author": actor.name,
                    "created_at": stamp,
                },
            )
            self.chain.record(
                conn, appended, actor, "policy.pushed", label, version=version, sha256=sha
            )
        return self.info(label, version)

    def row(self, conn: Connection, label: str, version: int) -> Mapping[Any, Any]:
        """A version's row, or 404."""
        row = (
            conn.execute(
                select(db.policies).where(
                    db.policies.c.label == label, db.policies.c.version == version
                )
            )
            .mappings()
            .first()
        )
        if row is None:
            raise not_found(f"policy {label} version {version}")
        return row

    def in_state(self, conn: Connection, label: str, version: int, state: str) -> Any:
        """The version's row, or a 409 if it is not in ``state`` (the workflow's one check)."""
        row = self.row(conn, label, version)
        if row["state"] != state:
            message = f"version {version} is {row['state']}, not {state}"
            raise ApiError(409, "invalid_state", message)
        return row

    def submit(self, actor: Principal, label: str, version: int) -> dict[str, Any]:
        """draft -> in_review; the version is immutable from here on."""
        with self.chain.write() as (conn, appended):
            row = self.in_state(conn, label, version, "draft")
            if row["author"] != actor.name:
                raise ApiError(403, "not_author", "only the author of a draft can submit it")
            conn.execute(
                update(db.policies)
                .where(db.policies.c.id == row["id"])
                .values(state="in_review", submitted_at=db.now())
            )
            self.chain.record(conn, appended, actor, "policy.submitted", label, version=version)
        return self.info(label, version)

    def approve(self, actor: Principal, label: str, version: int) -> dict[str, Any]:
        """in_review -> active (approving activates; the previous active is superseded).
        A version older than one already activated is refused: going back is a rollback."""
        with self.chain.write() as (conn, appended):
            row = self.in_state(conn, label, version, "in_review")
            if row["author"] == actor.name:
                raise ApiError(403, "self_approval", "the author of a policy cannot approve it")
            acts = activations(conn, label).get(label, [])
            newest = max((int(a.get("version", 0)) for a in acts), default=0)
            if newest > version:
                raise ApiError(
                    409,
                    "stale_version",
                    f"version {version} is older than version {newest}, already activated;"
                    " re-activating an older version is an explicit rollback",
                )
            if self.review_gate is None or self.review_gate(conn, appended, actor, row):
                self._activate(conn, appended, actor, row, len(acts) + 1)
        return self.info(label, version)

    def _activate(
        self,
        conn: Connection,
        appended: list[dict[str, Any]],
        actor: Principal,
        row: Any,
        activation_seq: int,
    ) -> None:
        """in_review -> active: sign the version and supersede the previous active one."""
        label, version = row["label"], row["version"]
        signature = b64e(self._signer.sign(row["document"].encode("utf-8")))
        stamp = db.now()
        conn.execute(
            update(db.policies)
            .where(db.policies.c.label == label, db.policies.c.state == "active")
            .values(state="superseded")
        )
        conn.execute(
            update(db.policies)
            .where(db.policies.c.id == row["id"])
            .values(
                state="active",
                reviewed_by=actor.name,
                reviewed_at=stamp,
                activated_at=stamp,
                signature=signature,
            )
        )
        self.chain.record(
            conn,
            appended,
            actor,
            "policy.approved",
            label,
            version=version,
            sha256=row["sha256"],
            activation_seq=activation_seq,
        )

    def rollback(self, actor: Principal, label: str, version: int, reason: str) -> dict[str, Any]:
        """Re-activate a superseded version: an explicit reviewer action with a reason, audited
        as ``policy.rolled_back`` with the next activation number of the label."""
        reason = reason.strip()
        if not reason:
            raise ApiError(422, "reason_required", "a rollback needs a reason")
        refuse_control_chars(reason, "reason")
        with self.chain.write() as (conn, appended):
            row = self.in_state(conn, label, version, "superseded")
            acts = activations(conn, label).get(label, [])
            previous = acts[-1].get("version") if acts else None
            stamp = db.now()
            conn.execute(
                update(db.policies)
                .where(db.policies.c.label == label, db.policies.c.state == "active")
                .values(state="superseded")
            )
            conn.execute(
                update(db.policies)
                .where(db.policies.c.id == row["id"])
                .values(state="active", activated_at=stamp)
            )
            self.chain.record(
                conn,
                appended,
                actor,
                "policy.rolled_back",
                label,
                version=version,
                sha256=row["sha256"],
                activation_seq=len(acts) + 1,
                from_version=previous,
                reason=reason,
            )
        return self.info(label, version)

    def reject(self, actor: Principal, label: str, version: int, reason: str) -> dict[str, Any]:
        """in_review -> rejected, with the reviewer's reason."""
        reason = reason.strip()
        if not reason:
            raise ApiError(422, "reason_required", "a rejection needs a reason")
        refuse_control_chars(reason, "reason")
        with self.chain.write() as (conn, appended):
            row = self.in_state(conn, label, version, "in_review")
            conn.execute(
                update(db.policies)
                .where(db.policies.c.id == row["id"])
                .values(
                    state="rejected", reviewed_by=actor.name, reviewed_at=db.now(), reason=reason
                )
            )
            self.chain.record(
                conn, appended, actor, "policy.rejected", label, version=version, reason=reason
            )
        return self.info(label, version)

    def info(self, label: str, version: int, *, with_document: bool = False) -> dict[str, Any]:
        """One version's metadata (and document, on request)."""
        with self.engine.connect() as conn:
            row = self.row(conn, label, version)
        return policy_info(row, with_document)

    def history(self, label: str) -> list[dict[str, Any]]:
        """Every version of a label, oldest first (404 for an unknown label)."""
        with self.engine.connect() as conn:
            rows = (
                conn.execute(
                    select(db.policies)
                    .where(db.policies.c.label == label)
                    .order_by(db.policies.c.version)
                )
                .mappings()
                .all()
            )
        if not rows:
            raise not_found(f"policy {label}")
        return [policy_info(r, False) for r in rows]

    def labels(self) -> list[dict[str, Any]]:
        """Each label with its latest and active versions."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(db.policies.c.label, db.policies.c.version, db.policies.c.state).order_by(
                    db.policies.c.label, db.policies.c.version
                )
            ).all()
        out: dict[str, dict[str, Any]] = {}
        for label, version, state in rows:
            item = out.setdefault(label, {"label": label, "latest": 0, "active": None})
            item["latest"] = version
            if state == "active":
                item["active"] = version
        return list(out.values())

    def diff(self, label: str, old: int, new: int) -> str:
        """A unified diff between two versions' canonical YAML."""
        with self.engine.connect() as conn:
            a = self.row(conn, label, old)
            b = self.row(conn, label, new)
        lines = difflib.unified_diff(
            canonical_yaml(json.loads(a["document"])).splitlines(keepends=True),
            canonical_yaml(json.loads(b["document"])).splitlines(keepends=True),
            fromfile=f"{label}@{old}",
            tofile=f"{label}@{new}",
        )
        return "".join(lines)

    def active(self, actor: Principal, label: str) -> ActivePolicy:
        """The label's active version as served: derived from the audit chain's last
        activation record of the label (not from the table's state column), its bytes
        checked against the hash that record holds, and a signed envelope for it."""
        check_label_access(actor, label)
        with self.engine.connect() as conn:
            acts = activations(conn, label).get(label, [])
            if not acts:
                raise not_found(f"active policy for {label}")
            last = acts[-1]
            row = self.row(conn, label, int(last["version"]))
        body = row["document"].encode("utf-8")
        sha = hashlib.sha256(body).hexdigest()
        if sha != last.get("sha256") or sha != row["sha256"]:
            # Someone changed the stored document behind the chain's back: serve nothing.
            raise ApiError(
                503,
                "policy_integrity",
                f"the stored policy {label} does not match its audited activation;"
                " run `cape audit verify`",
            )
        envelope = {
            "label": label,
            "version": int(last["version"]),
            "activation_seq": len(acts),
            "activated_at": db.normalize_time(str(last["time"])),
            "sha256": sha,
        }
        envelope_bytes = json.dumps(
            envelope, sort_keys=True, separators=(",", ":"), ensure_ascii=True
        ).encode("ascii")
        signature = b64e(self._signer.sign(ENVELOPE_DOMAIN + envelope_bytes))
        return ActivePolicy(body, sha, int(last["version"]), envelope_bytes, signature)
