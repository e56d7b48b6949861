"""The hash-chained audit trail: write transactions that append to it, and its verification.

Every state change of the coordinator appends its own record to the chain in
the same transaction as the change, so an action and its record commit or roll
back together; run records from pipelines are appended by the ingest service
through the same :meth:`AuditChain.append_rows`. Appends are serialised by a
process lock and, across processes, by ``BEGIN IMMEDIATE`` (SQLite) or a row
lock on the chain anchor (other databases). After each commit the new entries
go to the configured copies (a JSONL file, stdout).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import operator
import os
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, Engine, func, insert, select, update

from cape_pipelines.policy import canonical_json

from .. import db
from ..crypto import b64d, b64e, verify_signature
from .base import Principal

log = logging.getLogger("cape_coordinator")

GENESIS = "0" * 64
# How often (at most) a SQLite coordinator truncates its WAL after a write.
CHECKPOINT_SECONDS = 60.0
_ANCHOR_DOMAIN = b"cape-audit-anchor\x00"
AUDIT_COLS = [c.name for c in db.audit.columns]
_AUDIT_VALUES = operator.itemgetter(*AUDIT_COLS)
# Rows per multi-row INSERT on SQLite, within its bound-parameter limit (999 before 3.32).
_SQLITE_ROWS_PER_INSERT = 256 if sqlite3.sqlite_version_info >= (3, 32, 0) else 90


@functools.lru_cache(maxsize=64)
def _sqlite_insert_audit(n_rows: int) -> str:
    """``INSERT INTO audit ... VALUES (...), ...`` for ``n_rows`` rows."""
    group = f"({', '.join('?' for _ in AUDIT_COLS)})"
    return (
        f"INSERT INTO audit ({', '.join(AUDIT_COLS)}) "  # noqa: S608 - our own column names
        f"VALUES {', '.join([group] * n_rows)}"
    )


def _pg_insert_audit() -> str:
    """``INSERT INTO audit (...) SELECT * FROM unnest(...)`` with one array parameter per
    column, each holding that column for every row. ``%(name)b`` asks psycopg for the
    binary format: its text format escapes every element of an array in Python, which
    for the bodies costs more than the whole insert."""
    arrays = ", ".join(
        f"CAST(%({c})b AS {'INTEGER[]' if c == 'seq' else 'TEXT[]'})" for c in AUDIT_COLS
    )
    return (
        f"INSERT INTO audit ({', '.join(AUDIT_COLS)}) "  # noqa: S608 - our own column names
        f"SELECT * FROM unnest({arrays})"
    )


_PG_INSERT_AUDIT = _pg_insert_audit()


@dataclass
class VerifyResult:
    """The outcome of checking the audit chain."""

    intact: bool
    count: int
    last_hash: str
    problems: list[str] = field(default_factory=list)


class Copies:
    """Optional copies of every committed chain entry: a JSONL file and/or stdout."""

    def __init__(self, jsonl: str | None, stdout: bool):
        self.jsonl = Path(jsonl) if jsonl else None
        self.stdout = stdout
        if self.jsonl:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows or not (self.jsonl or self.stdout):
            return
        # The last entry of each commit carries the signed anchor it moved the chain to, so
        # the copy is also an anchor record kept outside the database (`verify --anchor`).
        text = "".join(
            f'{{"seq":{r["seq"]},"prev_hash":"{r["prev_hash"]}","hash":"{r["hash"]}",'
            f'"entry":{r["body"]}'
            + (f',"anchor":{json.dumps(r["anchor"], sort_keys=True)}' if "anchor" in r else "")
            + "}\n"
            for r in rows
        )
        try:
            if self.jsonl:
                # 0600 from its creation: the copy holds the whole audit trail.
                fd = os.open(self.jsonl, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                with os.fdopen(fd, "a", encoding="utf-8") as fh:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())
            if self.stdout:
                sys.stdout.write(text)
                sys.stdout.flush()
        except OSError as exc:
            # The database is the record of truth; a failing copy must not fail the request.
            log.error("cannot write audit copy: %s", exc.strerror)


def chain_hash(prev_hash: str, body: bytes) -> str:
    """An entry's hash: sha256 over the previous hash's bytes and the canonical body."""
    return hashlib.sha256(bytes.fromhex(prev_hash) + body).hexdigest()


def anchor_message(count: int, last_hash: str) -> bytes:
    """The bytes the chain anchor's signature covers (domain-separated)."""
    return _ANCHOR_DOMAIN + f"{count}:{last_hash}".encode("ascii")


def run_label(rec: Mapping[str, Any]) -> str | None:
    """The policy label a run record names, if any."""
    policy = rec.get("policy")
    label = policy.get("label") if isinstance(policy, Mapping) else None
    return label if isinstance(label, str) else None


def record_label(entry: Mapping[str, Any]) -> str | None:
    """The label column of a chain entry (coordinator records carry it plainly)."""
    rec = entry["record"]
    if entry["kind"] == "coordinator":
        return cast("str | None", rec.get("label"))
    return run_label(rec)


def entry_row(entry: Mapping[str, Any]) -> dict[str, Any]:
    """An audit row for a chain entry, all but ``seq`` and the hashes (which need the chain's
    tail): the canonical body and the indexed columns derived from it. Costly enough (the
    canonical JSON) to be done before the chain is locked."""
    rec = entry["record"]
    return {
        "record_id": rec["record_id"],
        "kind": entry["kind"],
        "run_id": rec.get("run_id"),
        "event": rec["event"],
        "label": record_label(entry),
        "time": db.normalize_time(rec["time"]),
        "received_at": entry["received_at"],
        "body": canonical_json(entry).decode("utf-8"),
        "sender": entry.get("sender"),
    }


def own_record(
    actor: Principal, event: str, label: str | None = None, **details: Any
) -> dict[str, Any]:
    """A chain entry for one of the coordinator's own actions."""
    stamp = db.now()
    record: dict[str, Any] = {
        "record_id": str(uuid.uuid4()),
        "event": event,
        "time": stamp,
        "principal": actor.name,
        "role": actor.role,
    }
    if label is not None:
        record["label"] = label
    record.update(details)
    return {"kind": "coordinator", "source": actor.name, "received_at": stamp, "record": record}


class AuditChain:
    """Write transactions over the shared database that may extend the chain."""

    def __init__(self, engine: Engine, signer: Any, copies: Copies):
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        self._signer = signer
        self._copies = copies
        self._lock = threading.Lock()
        # (connection, count, last hash) of the open write transaction on PostgreSQL, read
        # under its row lock; set and cleared by write() while it holds the process lock.
        self._head: tuple[Connection, int, str] | None = None
        self._checkpointed = time.monotonic()
        # Called (without arguments, must not block) after a commit that appended entries:
        # the audit sinks' dispatchers wake up on it instead of waiting for their next poll.
        self.listeners: list[Callable[[], None]] = []

    @contextmanager
    def write(self) -> Iterator[tuple[Connection, list[dict[str, Any]]]]:
        """A write transaction that may append to the chain; copies go out after commit."""
        appended: list[dict[str, Any]] = []
        with self._lock:
            with self.engine.connect() as conn:
                conn.execution_options(cape_write=True)
                with conn.begin():
                    if not self.sqlite:
                        # One writer at a time across replicas (SQLite's BEGIN IMMEDIATE does
                        # this there): checks made in the transaction, such as the next
                        # activation number of a label, hold until it commits. The head read
                        # under the lock is kept for this transaction's appends (one round
                        # trip fewer each); only append_rows moves it, and it updates it.
                        self._head = (conn, *self.anchor(conn))
                    try:
                        yield conn, appended
                    finally:
                        self._head = None
            self._copies.write(appended)
            if appended:
                for listener in self.listeners:
                    try:
                        listener()
                    except Exception as exc:  # the write has committed: never fail it now
                        log.error("audit chain listener failed: %s", type(exc).__name__)
            if (
                self.sqlite
                and appended
                and time.monotonic() - self._checkpointed > CHECKPOINT_SECONDS
            ):
                self._checkpointed = time.monotonic()
                self.checkpoint()

    @property
    def write_lock(self) -> threading.Lock:
        """The process lock every chain write holds (other short writers may queue on it)."""
        return self._lock

    def anchor(self, conn: Connection) -> tuple[int, str]:
        """(count, last hash) of the chain; on PostgreSQL this takes the chain's row lock."""
        stmt = select(db.settings.c.value).where(db.settings.c.name == "audit_anchor")
        if not self.sqlite:
            stmt = stmt.with_for_update()
        data = json.loads(conn.execute(stmt).scalar_one())
        return int(data["count"]), str(data["hash"])

    def append(
        self, conn: Connection, appended: list[dict[str, Any]], entries: Sequence[dict[str, Any]]
    ) -> None:
        """Append chain entries (``{kind, source, received_at, record}``) and move the anchor."""
        self.append_rows(conn, appended, [entry_row(entry) for entry in entries])

    def record(
        self,
        conn: Connection,
        appended: list[dict[str, Any]],
        actor: Principal,
        event: str,
        label: str | None = None,
        **details: Any,
    ) -> None:
        """Append one coordinator record for ``actor``'s action ``event``."""
        self.append(conn, appended, [own_record(actor, event, label, **details)])

    def append_rows(
        self, conn: Connection, appended: list[dict[str, Any]], rows: Sequence[dict[str, Any]]
    ) -> None:
        """Chain rows made by :func:`entry_row` (seq and hashes filled here, in order) and
        move the signed anchor once for all of them."""
        if not rows:
            return
        head = self._head
        mine = head is not None and head[0] is conn
        if head is not None and mine:
            _, count, prev = head
        else:
            count, prev = self.anchor(conn)
        for row in rows:
            count += 1
            row["seq"] = count
            row["prev_hash"] = prev
            prev = row["hash"] = chain_hash(prev, row["body"].encode("utf-8"))
        if self.sqlite:
            # Multi-row INSERTs through the driver: SQLAlchemy's per-row parameter handling
            # costs more than the insert itself, and the driver's executemany gives up and
            # retakes the GIL for every row, which stalls behind the event loop under load.
            step = _SQLITE_ROWS_PER_INSERT
            for i in range(0, len(rows), step):
                chunk = rows[i : i + step]
                params = tuple(v for r in chunk for v in _AUDIT_VALUES(r))
                conn.exec_driver_sql(_sqlite_insert_audit(len(chunk)), params)
        elif self.engine.dialect.name == "postgresql":
            # One statement for all the rows, one array per column: the driver's executemany
            # sends (and the server plans and runs) one INSERT per row.
            conn.exec_driver_sql(_PG_INSERT_AUDIT, {c: [r[c] for r in rows] for c in AUDIT_COLS})
        else:
            conn.execute(insert(db.audit), [{c: r[c] for c in AUDIT_COLS} for r in rows])
        anchor = {
            "count": count,
            "hash": prev,
            "signature": b64e(self._signer.sign(anchor_message(count, prev))),
        }
        conn.execute(
            update(db.settings)
            .where(db.settings.c.name == "audit_anchor")
            .values(value=json.dumps(anchor))
        )
        if mine:
            self._head = (conn, count, prev)
        rows[-1]["anchor"] = anchor
        appended.extend(rows)

    def current_anchor(self) -> dict[str, Any]:
        """The signed anchor: ``{count, hash, signature}`` (for monitoring to record)."""
        with self.engine.connect() as conn:
            raw = conn.execute(
                select(db.settings.c.value).where(db.settings.c.name == "audit_anchor")
            ).scalar_one()
        data = json.loads(raw)
        return {"count": int(data["count"]), "hash": data["hash"], "signature": data["signature"]}

    def checkpoint(self) -> None:
        """SQLite: move the WAL into the database file and truncate it, so older anchors do
        not linger in the WAL (deleted content is zeroed in the file: secure_delete)."""
        if not self.sqlite:
            return
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        except Exception as exc:  # a busy reader: the next checkpoint will do it
            log.warning("WAL checkpoint skipped: %s", type(exc).__name__)

    def count(self) -> int:
        """How many entries the chain holds."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(db.audit)).scalar_one())

    def verify(self, public_key: Any, expect: tuple[int, str] | None = None) -> VerifyResult:
        """Walk the whole chain; see :func:`verify_chain`."""
        with self.engine.connect() as conn:
            return verify_chain(conn, public_key, expect)


def verify_chain(
    conn: Connection, public_key: Any, expect: tuple[int, str] | None = None
) -> VerifyResult:
    """Check every entry's hash and link, the stored columns against the hashed body,
    and the signed anchor (count and last hash) against the rows, so that an edited,
    inserted, deleted or truncated entry is found. ``expect`` = (seq, hash) kept
    outside the database proves the chain still extends that earlier point."""
    problems: list[str] = []
    prev = GENESIS
    expected_seq = 1
    last_seq = 0
    expect_seen = expect is None
    while True:
        rows = (
            conn.execute(
                select(db.audit)
                .where(db.audit.c.seq > last_seq)
                .order_by(db.audit.c.seq)
                .limit(5000)
            )
            .mappings()
            .all()
        )
        if not rows:
            break
        for r in rows:
            seq = r["seq"]
            last_seq = seq
            if seq != expected_seq:
                problems.append(
                    f"seq {seq}: expected seq {expected_seq} (entries missing or renumbered)"
                )
            expected_seq = seq + 1
            if r["prev_hash"] != prev:
                problems.append(f"seq {seq}: prev_hash does not match the previous entry's hash")
            try:
                actual = chain_hash(r["prev_hash"], r["body"].encode("utf-8"))
            except ValueError:
                actual = ""
            if actual != r["hash"]:
                problems.append(f"seq {seq}: hash does not match the entry (edited)")
            else:
                problems.extend(_column_problems(r))
            if expect is not None and seq == expect[0]:
                expect_seen = True
                if r["hash"] != expect[1]:
                    problems.append(f"seq {seq}: hash differs from the expected anchor")
            prev = r["hash"]
        if len(problems) > 100:
            problems.append("too many problems; stopped")
            break
    count = last_seq
    n_rows = conn.execute(select(func.count()).select_from(db.audit)).scalar_one()
    if n_rows != count:
        problems.append(f"{n_rows} entries but the last seq is {count}")
    if not expect_seen:
        problems.append(f"expected anchor seq {expect[0]} is missing")  # type: ignore[index]
    raw = conn.execute(
        select(db.settings.c.value).where(db.settings.c.name == "audit_anchor")
    ).scalar()
    try:
        anchor = json.loads(str(raw))
        a_count, a_hash = int(anchor["count"]), str(anchor["hash"])
        good = verify_signature(
            public_key, b64d(anchor["signature"]), anchor_message(a_count, a_hash)
        )
    except (TypeError, ValueError, KeyError):
        good, a_count, a_hash = False, -1, ""
    if not good:
        problems.append("the chain anchor's signature does not verify")
    elif a_count != count or a_hash != prev:
        problems.append(
            f"the signed anchor says {a_count} entries ending {a_hash[:12]}, the table has {count}"
            f" ending {prev[:12]} (entries added or removed at the end)"
        )
    problems.extend(policy_state_problems(conn))
    return VerifyResult(intact=not problems, count=count, last_hash=prev, problems=problems)


ACTIVATIONS = ("policy.approved", "policy.rolled_back")


def activations(conn: Connection, label: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """Per label, the chain's activation records (approvals that activated, rollbacks) in
    chain order, each with its ``seq``: the source of truth for which version is served."""
    stmt = (
        select(db.audit.c.seq, db.audit.c.body)
        .where(db.audit.c.kind == "coordinator", db.audit.c.event.in_(ACTIVATIONS))
        .order_by(db.audit.c.seq)
    )
    if label is not None:
        stmt = stmt.where(db.audit.c.label == label)
    out: dict[str, list[dict[str, Any]]] = {}
    for seq, body in conn.execute(stmt):
        try:
            rec = json.loads(body)["record"]
            out.setdefault(str(rec["label"]), []).append({**rec, "seq": seq})
        except (ValueError, KeyError, TypeError):
            continue
    return out


def policy_state_problems(conn: Connection) -> list[str]:
    """The policies table must say what the chain says: per label, the version last
    activated in the chain is the one row marked active, holding the hashed bytes."""
    problems = []
    derived = {label: acts[-1] for label, acts in activations(conn).items()}
    rows = conn.execute(
        select(db.policies.c.label, db.policies.c.version, db.policies.c.sha256).where(
            db.policies.c.state == "active"
        )
    ).all()
    marked: dict[str, list[tuple[int, str]]] = {}
    for label, version, sha in rows:
        marked.setdefault(label, []).append((version, sha))
    for label in sorted(set(derived) | set(marked)):
        want = derived.get(label)
        have = marked.get(label, [])
        if want is None:
            problems.append(f"policy {label}: marked active but never activated in the chain")
        elif [(v, s) for v, s in have] != [(want.get("version"), want.get("sha256"))]:
            shown = ", ".join(str(v) for v, _ in have) or "none"
            problems.append(
                f"policy {label}: the database marks version(s) {shown} active, the chain"
                f" activated version {want.get('version')} (state or document changed)"
            )
    return problems


def _column_problems(r: Mapping[Any, Any]) -> list[str]:
    """The indexed columns must say what the hashed body says."""
    try:
        entry = json.loads(r["body"])
        rec = entry["record"]
        want = {
            "record_id": rec["record_id"],
            "kind": entry["kind"],
            "run_id": rec.get("run_id"),
            "event": rec["event"],
            "label": record_label(entry),
            "time": db.normalize_time(rec["time"]),
            "received_at": entry["received_at"],
            "sender": entry.get("sender"),
        }
    except (ValueError, KeyError, TypeError):
        return [f"seq {r['seq']}: body is not a chain entry"]
    bad = sorted(k for k, v in want.items() if r[k] != v)
    return (
        [f"seq {r['seq']}: column(s) {', '.join(bad)} differ from the hashed entry"] if bad else []
    )
