"""The coordinator's tables (SQLAlchemy 2 Core) and engine set-up.

Times are stored as RFC 3339 UTC strings with microseconds (``...Z``), which
sort and compare the same on SQLite and PostgreSQL. SQLite runs in WAL mode
with ``synchronous=FULL`` by default, so every acknowledged commit survives a
power loss (``NORMAL``, configurable, survives a process crash but may lose the
last commits on power loss); writes that extend the audit chain open
``BEGIN IMMEDIATE`` so two processes can never fork it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Column,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)

metadata = MetaData()

settings = Table(
    "settings",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("role", String(16), nullable=False),
    Column("secret_hash", String(64), nullable=False),
    Column("labels", Text, nullable=False, default="[]"),
    Column("created_at", String(32), nullable=False),
    Column("created_by", String(128), nullable=False),
    Column("expires_at", String(32)),
    Column("revoked_at", String(32)),
)

policies = Table(
    "policies",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("label", String(128), nullable=False),
    Column("version", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("document", Text, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("author", String(128), nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("submitted_at", String(32)),
    Column("reviewed_by", String(128)),
    Column("reviewed_at", String(32)),
    Column("reason", Text),
    Column("activated_at", String(32)),
    Column("signature", String(128)),
    UniqueConstraint("label", "version", name="uq_policy_label_version"),
    Index("ix_policy_label_state", "label", "state"),
)

secrets = Table(
    "secrets",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False),
    Column("version", Integer, nullable=False),
    Column("sealed", LargeBinary, nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("created_by", String(128), nullable=False),
    UniqueConstraint("name", "version", name="uq_secret_name_version"),
)

secret_labels = Table(
    "secret_labels",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("label", String(128), primary_key=True),
)

audit = Table(
    "audit",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("record_id", String(128), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("run_id", String(128)),
    Column("event", String(64), nullable=False),
    Column("label", String(128)),
    Column("time", String(32), nullable=False),
    Column("received_at", String(32), nullable=False),
    Column("body", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    # The token id that posted a run record (None for the coordinator's own records).
    Column("sender", String(32)),
    # Record ids are unique per sender (issue 9.2): another token's id cannot collide.
    Index("uq_audit_sender_record", "sender", "record_id", unique=True),
    Index("ix_audit_run", "run_id"),
    Index("ix_audit_label_time", "label", "time"),
    Index("ix_audit_event_time", "event", "time"),
    Index("ix_audit_time", "time"),
    Index("ix_audit_received_at", "received_at"),
)

runs = Table(
    "runs",
    metadata,
    Column("run_id", String(128), primary_key=True),
    Column("engine", String(64)),
    Column("engine_version", String(64)),
    Column("label", String(128)),
    Column("version", Integer),
    Column("principal", String(128)),
    Column("status", String(16), nullable=False),
    Column("started_at", String(32)),
    Column("ended_at", String(32)),
    Column("last_seen", String(32), nullable=False),
    Column("rows_in", Integer),
    Column("rows_out", Integer),
    Column("rows_redacted", Integer),
    Column("error_type", String(128)),
    Column("records", Integer, nullable=False, default=0),
    # The token of the run's first record: later records from another token are refused.
    Column("sender", String(32)),
    # The pipeline's own times (started_at/ended_at are the coordinator's receipt times).
    Column("client_started_at", String(32)),
    Column("client_ended_at", String(32)),
    Index("ix_runs_last_seen", "last_seen"),
)


def now() -> str:
    """The current UTC time as stored: RFC 3339 with microseconds and ``Z``."""
    return format_time(datetime.now(UTC))


def format_time(moment: datetime) -> str:
    """A datetime as stored (naive datetimes are taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_STORED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def normalize_time(text: str) -> str:
    """An RFC 3339 time as stored; times already in that form (as run records are) pass as is."""
    if _STORED.fullmatch(text):
        return text
    return format_time(parse_time(text))


def parse_time(text: str) -> datetime:
    """Parse RFC 3339 / ISO 8601 (``Z`` allowed); raises ValueError."""
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


SYNCHRONOUS = ("FULL", "EXTRA", "NORMAL")


def make_engine(url: str, *, sqlite_synchronous: str = "FULL", **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout, ``BEGIN IMMEDIATE`` writes and
    ``PRAGMA synchronous=sqlite_synchronous`` (FULL: a commit is on disk when it returns)."""
    if sqlite_synchronous not in SYNCHRONOUS:
        raise ValueError(f"sqlite_synchronous must be one of {', '.join(SYNCHRONOUS)}")
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, **kwargs)
    engine = create_engine(
        url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=8, **kwargs
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin (see _on_begin).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={sqlite_synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        # Deleted content (old anchors, removed rows) is overwritten, not left in free pages.
        cur.execute("PRAGMA secure_delete=ON")
        # The audit table's indexes (random record ids) outgrow SQLite's 2 MiB default
        # page cache quickly; re-reading their pages costs the writer more than the inserts.
        cur.execute("PRAGMA cache_size=-32768")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        write = conn.get_execution_options().get("cape_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine
