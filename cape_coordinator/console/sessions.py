"""Server-side console sessions: a token is exchanged once for a random session id.

The browser holds only the session id, in an HttpOnly, SameSite=Strict cookie
(Secure when served over TLS); the database holds its SHA-256, the token's id
(never the token), a per-session CSRF token and the times that bound it. A
session ends on sign-out, after ``idle_seconds`` without a request, after
``absolute_seconds`` in all, and at once when its token is revoked or expires:
every request re-reads the token's row, so a revocation made anywhere ends the
session on its next request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Column, Connection, String, Table, Text, delete, insert, select, update

from .. import db
from ..coordinator import Coordinator
from ..services.base import Principal

sessions_table = Table(
    "console_sessions",
    db.metadata,
    Column("id_hash", String(64), primary_key=True),
    Column("token_id", String(32), nullable=False, index=True),
    Column("created_at", String(32), nullable=False),
    Column("last_seen", String(32), nullable=False),
    Column("csrf", String(64), nullable=False),
    Column("flash", Text),
)

COOKIE = "cape_session"
ENDED = {
    "gone": "Your session has ended. Sign in again.",
    "revoked": "Your token was revoked, so your session has ended.",
    "expired": "Your token has expired, so your session has ended.",
    "idle": "Your session ended after a time without activity. Sign in again.",
    "absolute": "Your session reached its time limit. Sign in again.",
}
SIGNIN_COOKIE = "cape_signin"


@dataclass(frozen=True)
class Session:
    """A live console session: who it is for and its CSRF token."""

    id_hash: str
    principal: Principal
    csrf: str
    flash: str | None


class SessionEnded(Exception):
    """The session is gone; ``reason`` is a key of :data:`ENDED` (empty: never signed in)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()


class SessionStore:
    """Sessions in the coordinator's database."""

    def __init__(self, coord: Coordinator, idle_seconds: int, absolute_seconds: int):
        self.coord = coord
        self.idle = timedelta(seconds=idle_seconds)
        self.absolute = timedelta(seconds=absolute_seconds)

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction that takes SQLite's write lock at BEGIN: one begun deferred
        that reads the session and then updates it fails ("database is locked") whenever
        ingest or the orchestrator poller commits in between, instead of waiting."""
        with self.coord.engine.connect() as conn:
            conn.execution_options(cape_write=True)
            with conn.begin():
                yield conn

    def create(self, principal: Principal) -> str:
        """A new session for ``principal``; returns the id for the cookie (shown only here)."""
        session_id = secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        stamp = db.format_time(now)
        with self._write() as conn:
            # Sessions that can no longer be used are dropped here, so the table stays small.
            conn.execute(
                delete(sessions_table).where(
                    (sessions_table.c.last_seen < db.format_time(now - self.idle))
                    | (sessions_table.c.created_at < db.format_time(now - self.absolute))
                )
            )
            conn.execute(
                insert(sessions_table),
                {
                    "id_hash": _hash(session_id),
                    "token_id": principal.token_id,
                    "created_at": stamp,
                    "last_seen": stamp,
                    "csrf": secrets.token_urlsafe(32),
                },
            )
        return session_id

    def load(self, session_id: str | None) -> Session:
        """The live session for a cookie value, touching its idle clock; raises SessionEnded."""
        if not session_id:
            raise SessionEnded("")
        id_hash = _hash(session_id)
        with self._write() as conn:
            row = (
                conn.execute(
                    select(sessions_table, db.tokens)
                    .join(db.tokens, db.tokens.c.id == sessions_table.c.token_id)
                    .where(sessions_table.c.id_hash == id_hash)
                )
                .mappings()
                .first()
            )
            if row is None:
                raise SessionEnded("gone")
            now = datetime.now(UTC)
            reason = self._ended(row, now)
            if reason:
                conn.execute(delete(sessions_table).where(sessions_table.c.id_hash == id_hash))
                raise SessionEnded(reason)
            conn.execute(
                update(sessions_table)
                .where(sessions_table.c.id_hash == id_hash)
                .values(last_seen=db.format_time(now), flash=None)
            )
        principal = Principal(
            token_id=row["token_id"],
            name=row["name"],
            role=row["role"],
            labels=tuple(json.loads(row["labels"])),
        )
        return Session(id_hash=id_hash, principal=principal, csrf=row["csrf"], flash=row["flash"])

    def _ended(self, row: Any, now: datetime) -> str:
        if row["revoked_at"] is not None:
            return "revoked"
        if row["expires_at"] is not None and db.parse_time(row["expires_at"]) <= now:
            return "expired"
        if db.parse_time(row["last_seen"]) + self.idle <= now:
            return "idle"
        if db.parse_time(row["created_at"]) + self.absolute <= now:
            return "absolute"
        return ""

    def flash(self, session: Session, message: str) -> None:
        """A message shown once, on the next page."""
        with self._write() as conn:
            conn.execute(
                update(sessions_table)
                .where(sessions_table.c.id_hash == session.id_hash)
                .values(flash=message[:2000])
            )

    def end(self, session: Session) -> None:
        """Sign out: the session id is worthless from now on."""
        with self._write() as conn:
            conn.execute(delete(sessions_table).where(sessions_table.c.id_hash == session.id_hash))


def csrf_ok(session: Session, sent: str | None) -> bool:
    """Whether a form's CSRF field is this session's token (constant-time)."""
    return bool(sent) and hmac.compare_digest(session.csrf.encode(), str(sent).encode())
