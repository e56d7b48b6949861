"""Named secrets (random 32-byte keys): create, rotate, list, and hand to pipelines.

Key material is sealed by the master key at rest and leaves the coordinator
only in :meth:`SecretService.for_label`, to a pipeline token of that label;
every such read is an audit record.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, func, insert, select

from cape_pipelines.policy.models import LABEL_RE

from .. import db
from ..crypto import MasterKey, b64e
from ..errors import ApiError, not_found
from .base import NAME_RE, Principal, check_label_access
from .chain import AuditChain


class SecretService:
    """Keys for keyed transformations, sealed in the database."""

    def __init__(self, chain: AuditChain, master: MasterKey):
        self.chain = chain
        self.engine = chain.engine
        self._master = master

    def __repr__(self) -> str:
        return "SecretService(<master key hidden>)"

    def create(self, actor: Principal, name: str, labels: Sequence[str]) -> dict[str, Any]:
        """Make a named random 32-byte key, usable by pipelines of ``labels``."""
        if not NAME_RE.fullmatch(name):
            raise ApiError(
                422, "invalid_name", "key name must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}"
            )
        labels = sorted(set(labels))
        if not labels or any(not LABEL_RE.fullmatch(lab) for lab in labels):
            raise ApiError(
                422, "invalid_label", "give one or more labels matching [a-z0-9][a-z0-9._-]*"
            )
        with self.chain.write() as (conn, appended):
            exists = conn.execute(
                select(func.count()).select_from(db.secrets).where(db.secrets.c.name == name)
            ).scalar()
            if exists:
                raise ApiError(409, "key_exists", f"key {name} already exists; rotate it instead")
            self._new_version(conn, actor, name, 1)
            conn.execute(insert(db.secret_labels), [{"name": name, "label": lab} for lab in labels])
            self.chain.record(
                conn, appended, actor, "key.created", name=name, labels=labels, version=1
            )
        return self.info(name)

    def rotate(self, actor: Principal, name: str) -> dict[str, Any]:
        """Add a new current version of a key; older versions stay readable for reversal."""
        with self.chain.write() as (conn, appended):
            latest = conn.execute(
                select(func.max(db.secrets.c.version)).where(db.secrets.c.name == name)
            ).scalar()
            if latest is None:
                raise not_found(f"key {name}")
            self._new_version(conn, actor, name, latest + 1)
            self.chain.record(conn, appended, actor, "key.rotated", name=name, version=latest + 1)
        return self.info(name)

    def _new_version(self, conn: Connection, actor: Principal, name: str, version: int) -> None:
        material = os.urandom(32)
        conn.execute(
            insert(db.secrets),
            {
                "name": name,
                "version": version,
                "sealed": self._master.seal(material, f"secret:{name}:{version}"),
                "created_at": db.now(),
                "created_by": actor.name,
            },
        )

    def info(self, name: str) -> dict[str, Any]:
        """A key's name, labels and versions (never its material)."""
        infos = [k for k in self.list() if k["name"] == name]
        if not infos:
            raise not_found(f"key {name}")
        return infos[0]

    def list(self) -> list[dict[str, Any]]:
        """Every key's name, labels and versions (never material)."""
        with self.engine.connect() as conn:
            versions = conn.execute(
                select(db.secrets.c.name, db.secrets.c.version, db.secrets.c.created_at).order_by(
                    db.secrets.c.name, db.secrets.c.version
                )
            ).all()
            labels = conn.execute(select(db.secret_labels.c.name, db.secret_labels.c.label)).all()
        out: dict[str, dict[str, Any]] = {}
        for name, version, created in versions:
            item = out.setdefault(name, {"name": name, "labels": [], "current": 0, "versions": []})
            item["versions"].append({"version": version, "created_at": created})
            item["current"] = version
        for name, label in labels:
            if name in out:
                out[name]["labels"].append(label)
        for item in out.values():
            item["labels"].sort()
        return list(out.values())

    def for_label(self, actor: Principal, label: str) -> dict[str, dict[str, Any]]:
        """Every version of every key allowed for ``label`` (pipeline tokens of that label)."""
        check_label_access(actor, label)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(db.secrets.c.name, db.secrets.c.version, db.secrets.c.sealed)
                .join(db.secret_labels, db.secret_labels.c.name == db.secrets.c.name)
                .where(db.secret_labels.c.label == label)
                .order_by(db.secrets.c.name, db.secrets.c.version)
            ).all()
        keys: dict[str, dict[str, Any]] = {}
        for name, version, sealed in rows:
            item = keys.setdefault(name, {"current": 0, "versions": {}})
            item["versions"][str(version)] = b64e(
                self._master.open(sealed, f"secret:{name}:{version}")
            )
            item["current"] = version
        with self.chain.write() as (conn, appended):
            self.chain.record(
                conn,
                appended,
                actor,
                "key.read",
                label,
                keys={n: sorted(int(v) for v in k["versions"]) for n, k in keys.items()},
            )
        return keys
