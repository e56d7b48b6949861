"""API tokens: making, revoking and listing them, and authenticating a bearer token.

Tokens are stored hashed; a verified token is remembered for
``TOKEN_CACHE_SECONDS`` so most requests cost no database read, and a
revocation through this process evicts it at once.

Every run by label mints a worker (or audit-writer) token, so their rows would
pile up; a mint also deletes, in a bounded pass at most once a minute per
process, the minted tokens that expired more than
``MINTED_TOKEN_GRACE_SECONDS`` ago. Only those: admin and user tokens are
never deleted, and the chain's ``token.created`` record of a pruned token
still says it existed, who minted it and until when.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, insert, or_, select, update

from cape_pipelines.policy.models import LABEL_RE

from .. import db
from ..crypto import new_token, secret_matches, split_token
from ..errors import ApiError, not_found
from .base import (
    AUDIT_WRITER_ROLE,
    PRINCIPAL_RE,
    ROLES,
    WORKER_ROLE,
    Principal,
    check_label_access,
)
from .chain import AuditChain

# A verified token is trusted this long without asking the database again, so a
# revocation made elsewhere (another serving process, or the database directly)
# takes effect within this time; one made through this process takes effect at once.
TOKEN_CACHE_SECONDS = 1.0
_TOKEN_CACHE_MAX = 4096
# A worker (or audit-writer) token lives at most this long (and never past the pipeline token
# that made it): it travels in job graphs, which may be stored with the job.
WORKER_TOKEN_MAX_SECONDS = 24 * 3600
# The names of the tokens a pipeline token mints, by role: revoking it revokes them.
_MINTED_PREFIX = {WORKER_ROLE: "worker-of", AUDIT_WRITER_ROLE: "audit-of"}
# A minted token's row is deleted this long after it expired: until then a job that comes
# back late still gets a clear 401 token_expired rather than "invalid token".
MINTED_TOKEN_GRACE_SECONDS = 24 * 3600
# One pruning pass deletes at most this many rows, so a mint never waits on a long delete;
# a full pass lets the next mint prune again at once (a backlog drains a batch per mint).
MINTED_PRUNE_BATCH = 1000
# Otherwise a process prunes at most this often: a pass scans the token table.
MINTED_PRUNE_INTERVAL_SECONDS = 60.0

log = logging.getLogger("cape_coordinator.tokens")


def token_info(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A token's public description (never its secret or hash)."""
    return {
        "id": row["id"],
        "name": row["name"],
        "role": row["role"],
        "labels": json.loads(row["labels"]),
        "created_at": row["created_at"],
        "created_by": row["created_by"],
        "expires_at": row["expires_at"],
        "revoked_at": row["revoked_at"],
    }


def _minted_name(role: str, token_id: str) -> str:
    """The name of the ``role`` tokens pipeline token ``token_id`` mints."""
    return f"{_MINTED_PREFIX[role]}:{token_id}"


class TokenService:
    """Tokens and authentication."""

    def __init__(self, chain: AuditChain):
        self.chain = chain
        self.engine = chain.engine
        self._cache: dict[str, tuple[float, str, Principal, float | None]] = {}
        self._cache_lock = threading.Lock()
        self._revocations = 0
        self._prune_lock = threading.Lock()
        # When this process last began a pruning pass (monotonic; None: prune at the next mint).
        self._pruned_at: float | None = None

    def create(
        self,
        actor: Principal,
        *,
        name: str,
        role: str,
        labels: Sequence[str] = (),
        expires_in: int | None = None,
    ) -> tuple[dict[str, Any], str]:
        """Make a token; returns (its public description, the token itself, shown once)."""
        if role not in ROLES:
            raise ApiError(422, "invalid_role", f"role must be one of {', '.join(ROLES)}")
        if not PRINCIPAL_RE.fullmatch(name):
            raise ApiError(
                422, "invalid_name", "name must match [A-Za-z0-9][A-Za-z0-9._@:-]{0,127}"
            )
        labels = sorted(set(labels))
        bad = [lab for lab in labels if not LABEL_RE.fullmatch(lab)]
        if bad:
            raise ApiError(422, "invalid_label", "labels must match [a-z0-9][a-z0-9._-]{0,127}")
        if labels and role != "pipeline":
            raise ApiError(422, "labels_not_allowed", "only pipeline tokens take labels")
        if role == "pipeline" and not labels:
            raise ApiError(422, "labels_required", "a pipeline token needs at least one label")
        expires_at = None
        if expires_in is not None:
            if expires_in <= 0 or expires_in > 10 * 365 * 86400:
                raise ApiError(422, "invalid_expiry", "expires_in must be 1 s to 10 years")
            expires_at = db.format_time(datetime.now(UTC) + timedelta(seconds=expires_in))
        token_id, token, digest = new_token()
        info = {
            "id": token_id,
            "name": name,
            "role": role,
            "labels": labels,
            "created_at": db.now(),
            "created_by": actor.name,
            "expires_at": expires_at,
            "revoked_at": None,
        }
        with self.chain.write() as (conn, appended):
            conn.execute(
                insert(db.tokens),
                {**info, "labels": json.dumps(labels), "secret_hash": digest},
            )
            self.chain.record(
                conn,
                appended,
                actor,
                "token.created",
                token_id=token_id,
                name=name,
                token_role=role,
                labels=labels,
                expires_at=expires_at,
            )
        return info, token

    def mint_worker(
        self, actor: Principal, label: str, expires_in: int
    ) -> tuple[dict[str, Any], str]:
        """A worker token for ``label``, made by a pipeline token of that label.

        It may read that label's keys and nothing else (its role is
        ``worker``), expires after ``expires_in`` seconds and never after the
        pipeline token that made it, and is revoked with it. Returns (its
        public description, the token itself, shown once).
        """
        return self._mint(actor, label, expires_in, WORKER_ROLE)

    def mint_audit_writer(
        self, actor: Principal, label: str, expires_in: int
    ) -> tuple[dict[str, Any], str]:
        """An audit-writer token for ``label``, made by a pipeline token of that label.

        It may post run records for that label and nothing else (no keys, no
        policies; its runs are its own: ingest binds a run to the token that
        sent its first record), expires like a worker token and is revoked
        with the pipeline token that made it. Beam ships it to the workers
        that write a run's records. Returns (description, token, shown once).
        """
        return self._mint(actor, label, expires_in, AUDIT_WRITER_ROLE)

    def _mint(
        self, actor: Principal, label: str, expires_in: int, role: str
    ) -> tuple[dict[str, Any], str]:
        if actor.role != "pipeline":
            raise ApiError(403, "forbidden", f"role {actor.role} may not mint {role} tokens")
        check_label_access(actor, label)
        if not 1 <= expires_in <= WORKER_TOKEN_MAX_SECONDS:
            raise ApiError(
                422,
                "invalid_expiry",
                f"expires_in must be 1 s to {WORKER_TOKEN_MAX_SECONDS} s",
            )
        expires = datetime.now(UTC) + timedelta(seconds=expires_in)
        token_id, token, digest = new_token()
        with self.chain.write() as (conn, appended):
            parent = (
                conn.execute(select(db.tokens).where(db.tokens.c.id == actor.token_id))
                .mappings()
                .first()
            )
            if parent is None or parent["revoked_at"] is not None:
                raise ApiError(401, "token_revoked", "token has been revoked")
            expires_at = db.format_time(expires)
            if parent["expires_at"] is not None and parent["expires_at"] < expires_at:
                expires_at = parent["expires_at"]
            info = {
                "id": token_id,
                # Names the pipeline token it came from: revoking that revokes this.
                "name": _minted_name(role, actor.token_id),
                "role": role,
                "labels": [label],
                "created_at": db.now(),
                "created_by": actor.name,
                "expires_at": expires_at,
                "revoked_at": None,
            }
            conn.execute(
                insert(db.tokens),
                {**info, "labels": json.dumps([label]), "secret_hash": digest},
            )
            self.chain.record(
                conn,
                appended,
                actor,
                "token.created",
                label,
                token_id=token_id,
                name=info["name"],
                token_role=role,
                labels=[label],
                expires_at=expires_at,
            )
        self._prune_if_due()
        return info, token

    def _prune_if_due(self) -> None:
        """Run a pruning pass if this process's interval has passed (after a mint committed:
        a failing pass is logged and never fails the mint)."""
        with self._prune_lock:
            now = time.monotonic()
            last = self._pruned_at
            if last is not None and now - last < MINTED_PRUNE_INTERVAL_SECONDS:
                return
            # Claimed before the pass, so concurrent mints skip rather than queue behind it.
            self._pruned_at = now
        try:
            pruned = self.prune_expired()
        except Exception as exc:
            log.error("pruning expired minted tokens failed: %s", type(exc).__name__)
            return
        if pruned >= MINTED_PRUNE_BATCH:
            with self._prune_lock:
                self._pruned_at = None

    def prune_expired(self) -> int:
        """Delete up to ``MINTED_PRUNE_BATCH`` worker and audit-writer token rows that expired
        more than ``MINTED_TOKEN_GRACE_SECONDS`` ago; returns how many.

        No other token is ever deleted (an admin or user token stays however long it has
        expired), nor any audit record: each pruned token's ``token.created`` stays in the
        chain. Safe on several replicas at once (a row two passes pick is deleted once).
        """
        cutoff = db.format_time(datetime.now(UTC) - timedelta(seconds=MINTED_TOKEN_GRACE_SECONDS))
        prunable = and_(
            db.tokens.c.role.in_(tuple(_MINTED_PREFIX)),
            db.tokens.c.expires_at.is_not(None),
            db.tokens.c.expires_at < cutoff,
        )
        # Queued behind this process's other writers; SQLite's BEGIN IMMEDIATE, as for them.
        with self.chain.write_lock, self.engine.connect() as conn:
            conn.execution_options(cape_write=True)
            with conn.begin():
                ids = [
                    r[0]
                    for r in conn.execute(
                        select(db.tokens.c.id).where(prunable).limit(MINTED_PRUNE_BATCH)
                    )
                ]
                if ids:
                    conn.execute(delete(db.tokens).where(db.tokens.c.id.in_(ids), prunable))
        if ids:
            with self._cache_lock:
                for gone in ids:
                    self._cache.pop(gone, None)
            log.info("pruned %d expired worker/audit-writer token(s)", len(ids))
        return len(ids)

    def revoke(self, actor: Principal, token_id: str) -> dict[str, Any]:
        """Revoke a token by id (refused if unknown or already revoked), and the worker and
        audit-writer tokens it minted."""
        with self.chain.write() as (conn, appended):
            row = (
                conn.execute(select(db.tokens).where(db.tokens.c.id == token_id)).mappings().first()
            )
            if row is None:
                raise not_found("token")
            if row["revoked_at"] is not None:
                raise ApiError(409, "already_revoked", "token is already revoked")
            stamp = db.now()
            if row["role"] == "admin" and not self._other_admins(conn, token_id, stamp):
                raise ApiError(
                    409,
                    "last_admin",
                    "this is the last valid admin token; make another admin first"
                    " (or recover offline with `cape coordinator admin-token --db`)",
                )
            conn.execute(
                update(db.tokens).where(db.tokens.c.id == token_id).values(revoked_at=stamp)
            )
            self.chain.record(
                conn, appended, actor, "token.revoked", token_id=token_id, name=row["name"]
            )
            minted = [
                r[0]
                for r in conn.execute(
                    select(db.tokens.c.id).where(
                        or_(
                            *(
                                (db.tokens.c.role == role)
                                & (db.tokens.c.name == _minted_name(role, token_id))
                                for role in _MINTED_PREFIX
                            )
                        ),
                        db.tokens.c.revoked_at.is_(None),
                    )
                ).all()
            ]
            if minted:
                conn.execute(
                    update(db.tokens).where(db.tokens.c.id.in_(minted)).values(revoked_at=stamp)
                )
        with self._cache_lock:
            self._revocations += 1
            for gone in [token_id, *minted]:
                self._cache.pop(gone, None)
        return {**token_info(row), "revoked_at": stamp}

    @staticmethod
    def _other_admins(conn: Any, token_id: str, stamp: str) -> int:
        """How many admin tokens other than ``token_id`` are neither revoked nor expired."""
        rows = conn.execute(
            select(db.tokens.c.expires_at).where(
                db.tokens.c.role == "admin",
                db.tokens.c.id != token_id,
                db.tokens.c.revoked_at.is_(None),
            )
        ).all()
        return sum(1 for (expires,) in rows if expires is None or expires > stamp)

    def list(self) -> list[dict[str, Any]]:
        """Every token's description (never a secret or its hash)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(db.tokens).order_by(db.tokens.c.created_at)).mappings()
            return [token_info(r) for r in rows]

    def authenticate(self, token: str) -> Principal:
        """The principal a bearer token stands for, or 401 (see :meth:`cached_principal`)."""
        cached = self.cached_principal(token)
        if cached is not None:
            return cached
        parts = split_token(token)
        if parts is None:
            raise ApiError(401, "unauthenticated", "invalid token")
        token_id, secret = parts
        revocations, read_at = self._revocations, time.monotonic()
        with self.engine.connect() as conn:
            row = (
                conn.execute(select(db.tokens).where(db.tokens.c.id == token_id)).mappings().first()
            )
        # Compare against a dummy hash when the id is unknown so both paths cost the same.
        stored = row["secret_hash"] if row is not None else "0" * 64
        if not secret_matches(secret, stored) or row is None:
            raise ApiError(401, "unauthenticated", "invalid token")
        if row["revoked_at"] is not None:
            raise ApiError(401, "token_revoked", "token has been revoked")
        if row["expires_at"] is not None and row["expires_at"] <= db.now():
            raise ApiError(401, "token_expired", "token has expired")
        principal = Principal(
            token_id=row["id"],
            name=row["name"],
            role=row["role"],
            labels=tuple(json.loads(row["labels"])),
        )
        expires = None
        if row["expires_at"] is not None:
            expires = db.parse_time(row["expires_at"]).timestamp()
        with self._cache_lock:
            # A revocation committed while this row was read must not be cached over.
            if self._revocations == revocations:
                if len(self._cache) >= _TOKEN_CACHE_MAX:
                    self._cache.clear()
                self._cache[token_id] = (read_at, stored, principal, expires)
        return principal

    def cached_principal(self, token: str) -> Principal | None:
        """The principal of a token verified against the database less than
        ``TOKEN_CACHE_SECONDS`` ago and not expired since, else None (ask the database).
        Saves a database read per request; revocation through this process evicts at once."""
        parts = split_token(token)
        if parts is None:
            return None
        hit = self._cache.get(parts[0])
        if hit is None:
            return None
        verified_at, stored, principal, expires = hit
        if time.monotonic() - verified_at > TOKEN_CACHE_SECONDS:
            self._cache.pop(parts[0], None)
            return None
        if not secret_matches(parts[1], stored):
            return None
        if expires is not None and expires <= time.time():
            return None
        return principal
