"""The coordinator's service layer: tokens, policies, secrets, the audit chain and runs.

Everything the HTTP API and the offline CLI do goes through :class:`Coordinator`.
Every write that changes state also appends the coordinator's own audit record
to the hash chain in the same transaction, so an action and its record commit
or roll back together. Appends to the chain are serialised by a process lock
and, across processes, by ``BEGIN IMMEDIATE`` (SQLite) or a row lock on the
chain anchor (other databases).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import operator
import os
import queue
import re
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import Connection, Engine, bindparam, func, insert, inspect, select, update

from cape_pipelines.errors import PolicyError
from cape_pipelines.policy import canonical_json, load_policy
from cape_pipelines.policy.models import LABEL_RE

from . import db
from .config import Paths, Settings, save_settings
from .crypto import (
    CoordinatorSetupError,
    MasterKey,
    b64d,
    b64e,
    create_master_key_file,
    load_master_key,
    new_signing_key,
    new_token,
    public_key_text,
    secret_matches,
    signing_key_from_raw,
    split_token,
    verify_signature,
)
from .errors import ApiError, not_found

log = logging.getLogger("cape_coordinator")

ROLES = ("admin", "author", "reviewer", "pipeline", "auditor", "requester")
RUN_EVENTS = ("run.started", "policy.fetched", "run.completed", "run.failed")
GENESIS = "0" * 64
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PRINCIPAL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")
SCHEMA_VERSION = "1"
_ANCHOR_DOMAIN = b"cape-audit-anchor\x00"
_AUDIT_COLS = [c.name for c in db.audit.columns]
_AUDIT_VALUES = operator.itemgetter(*_AUDIT_COLS)
# Rows per multi-row INSERT on SQLite, within its bound-parameter limit (999 before 3.32).
_SQLITE_ROWS_PER_INSERT = 256 if sqlite3.sqlite_version_info >= (3, 32, 0) else 90


@functools.lru_cache(maxsize=64)
def _sqlite_insert_audit(n_rows: int) -> str:
    """``INSERT INTO audit ... VALUES (...), ...`` for ``n_rows`` rows."""
    group = f"({', '.join('?' for _ in _AUDIT_COLS)})"
    return (
        f"INSERT INTO audit ({', '.join(_AUDIT_COLS)}) "  # noqa: S608 - our own column names
        f"VALUES {', '.join([group] * n_rows)}"
    )


_KNOWN_IDS = select(db.audit.c.record_id).where(
    db.audit.c.record_id.in_(bindparam("ids", expanding=True))
)
_UPDATE_RUN = update(db.runs).where(db.runs.c.run_id == bindparam("key"))
# A verified token is trusted this long without asking the database again, so a
# revocation made elsewhere (another serving process, or the database directly)
# takes effect within this time; one made through this process takes effect at once.
TOKEN_CACHE_SECONDS = 1.0
_TOKEN_CACHE_MAX = 4096
# The most run records one group commit carries (several callers' batches).
GROUP_MAX_RECORDS = 5000


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's id, name (the person or job), role and allowed labels."""

    token_id: str
    name: str
    role: str
    labels: tuple[str, ...] = ()


@dataclass
class VerifyResult:
    """The outcome of checking the audit chain."""

    intact: bool
    count: int
    last_hash: str
    problems: list[str] = field(default_factory=list)


_CANON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _run_rows(source: str, stamp: str, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`_entry_row` for many run records of one request: the entry's other keys are
    encoded once, and the bodies are byte for byte what ``canonical_json`` makes."""
    head = f'{{"kind":"run","received_at":{_CANON.encode(stamp)},"record":'
    tail = f',"source":{_CANON.encode(source)}}}'
    rows = []
    for rec in records:
        rows.append(
            {
                "record_id": rec["record_id"],
                "kind": "run",
                "run_id": rec.get("run_id"),
                "event": rec["event"],
                "label": _run_label(rec),
                "time": db.normalize_time(rec["time"]),
                "received_at": stamp,
                "body": head + _CANON.encode(rec) + tail,
            }
        )
    return rows


@functools.lru_cache(maxsize=16)
def _sqlite_known_ids(n_ids: int) -> str:
    """``SELECT record_id FROM audit WHERE record_id IN (?, ...)`` for ``n_ids`` ids."""
    marks = ", ".join("?" for _ in range(n_ids))
    return f"SELECT record_id FROM audit WHERE record_id IN ({marks})"  # noqa: S608


class _Copies:
    """Optional copies of every committed chain entry: a JSONL file and/or stdout."""

    def __init__(self, jsonl: str | None, stdout: bool):
        self.jsonl = Path(jsonl) if jsonl else None
        self.stdout = stdout
        if self.jsonl:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows or not (self.jsonl or self.stdout):
            return
        text = "".join(
            f'{{"seq":{r["seq"]},"prev_hash":"{r["prev_hash"]}","hash":"{r["hash"]}",'
            f'"entry":{r["body"]}}}\n'
            for r in rows
        )
        try:
            if self.jsonl:
                with open(self.jsonl, "a", encoding="utf-8") as fh:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())
            if self.stdout:
                sys.stdout.write(text)
                sys.stdout.flush()
        except OSError as exc:
            # The database is the record of truth; a failing copy must not fail the request.
            log.error("cannot write audit copy: %s", exc.strerror)


def _canon(value: Any) -> bytes:
    return canonical_json(value)


def _chain_hash(prev_hash: str, body: bytes) -> str:
    return hashlib.sha256(bytes.fromhex(prev_hash) + body).hexdigest()


def _anchor_message(count: int, last_hash: str) -> bytes:
    return _ANCHOR_DOMAIN + f"{count}:{last_hash}".encode("ascii")


def _entry_row(entry: Mapping[str, Any]) -> dict[str, Any]:
    """An audit row for a chain entry, all but ``seq`` and the hashes (which need the chain's
    tail): the canonical body and the indexed columns derived from it. Costly enough (the
    canonical JSON) to be done before the chain is locked."""
    rec = entry["record"]
    return {
        "record_id": rec["record_id"],
        "kind": entry["kind"],
        "run_id": rec.get("run_id"),
        "event": rec["event"],
        "label": _record_label(entry),
        "time": db.normalize_time(rec["time"]),
        "received_at": entry["received_at"],
        "body": _canon(entry).decode("utf-8"),
    }


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
    return yaml.safe_dump(
        document, sort_keys=True, default_flow_style=False, allow_unicode=True, width=100
    )


@dataclass
class _PendingBatch:
    """A caller's audit batch waiting for the writer: prepared rows, their records, and
    how many records the caller sent (in-batch repeats count as duplicates)."""

    rows: list[dict[str, Any]]
    records: list[dict[str, Any]]
    sent: int
    future: Future[dict[str, int]] = field(default_factory=Future)


class _GroupWriter:
    """One thread committing queued audit batches, all that are waiting in one transaction.

    Callers wait on their batch's future, which is resolved only after the commit that
    holds it. Batches queue while a commit is in progress, so under load each commit
    (one fsync, one anchor signature) carries many batches, and at low load a batch is
    committed at once, never held back to wait for company.
    """

    def __init__(self, commit: Callable[[Sequence[_PendingBatch]], list[dict[str, int]]]):
        self._commit = commit
        self._queue: queue.SimpleQueue[_PendingBatch | None] = queue.SimpleQueue()
        self._gate = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="cape-audit-writer", daemon=True)
        self._thread.start()

    def submit(self, batch: _PendingBatch) -> None:
        with self._gate:
            if self._stopped:
                raise ApiError(503, "shutting_down", "the coordinator is shutting down")
            self._queue.put(batch)

    def stop(self, timeout: float = 60.0) -> None:
        """Commit what is queued, then end the thread."""
        with self._gate:
            if self._stopped:
                return
            self._stopped = True
            self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group, size, stopping = [first], len(first.rows), False
            while size < GROUP_MAX_RECORDS:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                group.append(nxt)
                size += len(nxt.rows)
            try:
                self._flush(group)
            except Exception as exc:
                # A fault here must neither strand the callers nor end the writer.
                log.error("audit writer fault: %s", type(exc).__name__)
                for batch in group:
                    if not batch.future.done():
                        batch.future.set_exception(exc)
            if stopping:
                return

    def _flush(self, group: list[_PendingBatch]) -> None:
        live = [b for b in group if b.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = self._commit(live)
        except Exception as exc:
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            # The whole group rolled back; alone, only a faulty batch fails again.
            for batch in live:
                try:
                    batch.future.set_result(self._commit([batch])[0])
                except Exception as one:
                    batch.future.set_exception(one)
            return
        for batch, result in zip(live, results, strict=True):
            batch.future.set_result(result)


class Coordinator:
    """The coordinator's state behind one database, with its keys unsealed in memory."""

    def __init__(self, engine: Engine, master: MasterKey, settings: Settings):
        self.engine = engine
        self.settings = settings
        self._master = master
        self._lock = threading.Lock()
        self._sqlite = engine.dialect.name == "sqlite"
        self._writer: _GroupWriter | None = None
        self._writer_lock = threading.Lock()
        self._closed = False
        self._token_cache: dict[str, tuple[float, str, Principal, float | None]] = {}
        self._token_cache_lock = threading.Lock()
        self._revocations = 0
        self._copies = _Copies(settings.audit_jsonl, settings.audit_stdout)
        with engine.connect() as conn:
            values = dict(conn.execute(select(db.settings.c.name, db.settings.c.value)).all())
        if values.get("schema_version") != SCHEMA_VERSION or "signing_key" not in values:
            raise CoordinatorSetupError("database is not an initialised Cape coordinator")
        raw = master.open(b64d(values["signing_key"]), "signing-key:1")
        self._signer = signing_key_from_raw(raw)
        self.public_key = self._signer.public_key()
        self.public_key_text = public_key_text(self.public_key)

    def __repr__(self) -> str:
        return f"Coordinator({self.engine.url.render_as_string(hide_password=True)!r})"

    # ---- set-up -------------------------------------------------------------------------

    @classmethod
    def open(cls, paths: Paths, settings: Settings, **engine_kwargs: Any) -> Coordinator:
        """Open an initialised coordinator database."""
        if paths.sqlite_file is not None and not paths.sqlite_file.exists():
            raise CoordinatorSetupError(
                f"no coordinator database at {paths.sqlite_file}; run `cape coordinator init`"
            )
        master = load_master_key(paths.key_file)
        sync = str(settings.sqlite_synchronous).upper()
        if sync not in db.SYNCHRONOUS:
            raise CoordinatorSetupError(
                f"sqlite_synchronous must be one of {', '.join(db.SYNCHRONOUS)}"
            )
        engine = db.make_engine(paths.url, sqlite_synchronous=sync, **engine_kwargs)
        if not inspect(engine).has_table("settings"):
            raise CoordinatorSetupError("database is not an initialised Cape coordinator")
        return cls(engine, master, settings)

    @classmethod
    def initialize(cls, paths: Paths, settings: Settings) -> tuple[Coordinator, str]:
        """Create tables, master key, signing key and config; return the first admin token."""
        if paths.sqlite_file is not None:
            paths.sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        engine = db.make_engine(paths.url)
        if inspect(engine).has_table("settings"):
            raise CoordinatorSetupError("database is already initialised; refusing to overwrite")
        if os.environ.get("CAPE_COORDINATOR_MASTER_KEY"):
            master = load_master_key(None)
        else:
            if paths.key_file is None:
                raise CoordinatorSetupError(
                    "a database URL needs --key-file or CAPE_COORDINATOR_MASTER_KEY"
                )
            master = MasterKey(create_master_key_file(paths.key_file))
        db.metadata.create_all(engine)
        if paths.sqlite_file is not None:
            # Sealed secrets and the audit trail: nobody else needs to read the file.
            os.chmod(paths.sqlite_file, 0o600)
        signer, raw = new_signing_key()
        anchor = {
            "count": 0,
            "hash": GENESIS,
            "signature": b64e(signer.sign(_anchor_message(0, GENESIS))),
        }
        with engine.begin() as conn:
            conn.execute(
                insert(db.settings),
                [
                    {"name": "schema_version", "value": SCHEMA_VERSION},
                    {"name": "signing_key", "value": b64e(master.seal(raw, "signing-key:1"))},
                    {"name": "public_key", "value": public_key_text(signer)},
                    {"name": "audit_anchor", "value": json.dumps(anchor)},
                ],
            )
        if paths.config_file is not None:
            save_settings(paths.config_file, settings)
        coord = cls(engine, master, settings)
        system = Principal(token_id="-", name="coordinator-init", role="admin")  # noqa: S106
        _, token = coord.create_token(system, name="admin", role="admin")
        return coord, token

    def close(self) -> None:
        """Commit queued audit batches, stop the audit writer and release connections."""
        with self._writer_lock:
            self._closed = True
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.stop()
        self.engine.dispose()

    # ---- transactions and the chain -----------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[tuple[Connection, list[dict[str, Any]]]]:
        """A write transaction that may append to the chain; copies go out after commit."""
        appended: list[dict[str, Any]] = []
        with self._lock:
            with self.engine.connect() as conn:
                conn.execution_options(cape_write=True)
                with conn.begin():
                    yield conn, appended
            self._copies.write(appended)

    def _anchor(self, conn: Connection) -> tuple[int, str]:
        stmt = select(db.settings.c.value).where(db.settings.c.name == "audit_anchor")
        if not self._sqlite:
            stmt = stmt.with_for_update()
        data = json.loads(conn.execute(stmt).scalar_one())
        return int(data["count"]), str(data["hash"])

    def _append(
        self,
        conn: Connection,
        appended: list[dict[str, Any]],
        entries: Sequence[dict[str, Any]],
    ) -> None:
        """Append chain entries (``{kind, source, received_at, record}``) and move the anchor."""
        self._append_rows(conn, appended, [_entry_row(entry) for entry in entries])

    def _append_rows(
        self,
        conn: Connection,
        appended: list[dict[str, Any]],
        rows: Sequence[dict[str, Any]],
    ) -> None:
        """Chain rows made by :func:`_entry_row` (seq and hashes filled here, in order) and
        move the signed anchor once for all of them."""
        if not rows:
            return
        count, prev = self._anchor(conn)
        for row in rows:
            count += 1
            row["seq"] = count
            row["prev_hash"] = prev
            prev = row["hash"] = _chain_hash(prev, row["body"].encode("utf-8"))
        if self._sqlite:
            # Multi-row INSERTs through the driver: SQLAlchemy's per-row parameter handling
            # costs more than the insert itself, and the driver's executemany gives up and
            # retakes the GIL for every row, which stalls behind the event loop under load.
            step = _SQLITE_ROWS_PER_INSERT
            for i in range(0, len(rows), step):
                chunk = rows[i : i + step]
                params = tuple(v for r in chunk for v in _AUDIT_VALUES(r))
                conn.exec_driver_sql(_sqlite_insert_audit(len(chunk)), params)
        else:
            conn.execute(insert(db.audit), [{c: r[c] for c in _AUDIT_COLS} for r in rows])
        anchor = {
            "count": count,
            "hash": prev,
            "signature": b64e(self._signer.sign(_anchor_message(count, prev))),
        }
        conn.execute(
            update(db.settings)
            .where(db.settings.c.name == "audit_anchor")
            .values(value=json.dumps(anchor))
        )
        appended.extend(rows)

    def _own_record(
        self, actor: Principal, event: str, label: str | None = None, **details: Any
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

    # ---- tokens -------------------------------------------------------------------------

    def create_token(
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
        with self._write() as (conn, appended):
            conn.execute(
                insert(db.tokens),
                {**info, "labels": json.dumps(labels), "secret_hash": digest},
            )
            self._append(
                conn,
                appended,
                [
                    self._own_record(
                        actor,
                        "token.created",
                        token_id=token_id,
                        name=name,
                        token_role=role,
                        labels=labels,
                        expires_at=expires_at,
                    )
                ],
            )
        return info, token

    def revoke_token(self, actor: Principal, token_id: str) -> dict[str, Any]:
        """Revoke a token by id (refused if unknown or already revoked)."""
        with self._write() as (conn, appended):
            row = (
                conn.execute(select(db.tokens).where(db.tokens.c.id == token_id)).mappings().first()
            )
            if row is None:
                raise not_found("token")
            if row["revoked_at"] is not None:
                raise ApiError(409, "already_revoked", "token is already revoked")
            stamp = db.now()
            conn.execute(
                update(db.tokens).where(db.tokens.c.id == token_id).values(revoked_at=stamp)
            )
            self._append(
                conn,
                appended,
                [self._own_record(actor, "token.revoked", token_id=token_id, name=row["name"])],
            )
        with self._token_cache_lock:
            self._revocations += 1
            self._token_cache.pop(token_id, None)
        return {**_token_info(row), "revoked_at": stamp}

    def list_tokens(self) -> list[dict[str, Any]]:
        """Every token's description (never a secret or its hash)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(db.tokens).order_by(db.tokens.c.created_at)).mappings()
            return [_token_info(r) for r in rows]

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
        with self._token_cache_lock:
            # A revocation committed while this row was read must not be cached over.
            if self._revocations == revocations:
                if len(self._token_cache) >= _TOKEN_CACHE_MAX:
                    self._token_cache.clear()
                self._token_cache[token_id] = (read_at, stored, principal, expires)
        return principal

    def cached_principal(self, token: str) -> Principal | None:
        """The principal of a token verified against the database less than
        ``TOKEN_CACHE_SECONDS`` ago and not expired since, else None (ask the database).
        Saves a database read per request; revocation through this process evicts at once."""
        parts = split_token(token)
        if parts is None:
            return None
        hit = self._token_cache.get(parts[0])
        if hit is None:
            return None
        verified_at, stored, principal, expires = hit
        if time.monotonic() - verified_at > TOKEN_CACHE_SECONDS:
            self._token_cache.pop(parts[0], None)
            return None
        if not secret_matches(parts[1], stored):
            return None
        if expires is not None and expires <= time.time():
            return None
        return principal

    # ---- policies -----------------------------------------------------------------------

    def push_policy(self, actor: Principal, document: Any) -> dict[str, Any]:
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
        doc = json.loads(_canon(document))
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
        with self._write() as (conn, appended):
            latest = conn.execute(
                select(func.max(db.policies.c.version)).where(db.policies.c.label == label)
            ).scalar()
            version = (latest or 0) + 1
            doc["version"] = version
            body = _canon(doc)
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
            self._append(
                conn,
                appended,
                [self._own_record(actor, "policy.pushed", label, version=version, sha256=sha)],
            )
        return self.policy_info(label, version)

    def _policy_row(self, conn: Connection, label: str, version: int) -> Mapping[str, Any]:
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

    def _policy_in_state(self, conn: Any, label: str, version: int, state: str) -> Any:
        """The version's row, or a 409 if it is not in ``state`` (the workflow's one check)."""
        row = self._policy_row(conn, label, version)
        if row["state"] != state:
            message = f"version {version} is {row['state']}, not {state}"
            raise ApiError(409, "invalid_state", message)
        return row

    def submit_policy(self, actor: Principal, label: str, version: int) -> dict[str, Any]:
        """draft -> in_review; the version is immutable from here on."""
        with self._write() as (conn, appended):
            row = self._policy_in_state(conn, label, version, "draft")
            conn.execute(
                update(db.policies)
                .where(db.policies.c.id == row["id"])
                .values(state="in_review", submitted_at=db.now())
            )
            self._append(
                conn,
                appended,
                [self._own_record(actor, "policy.submitted", label, version=version)],
            )
        return self.policy_info(label, version)

    def approve_policy(self, actor: Principal, label: str, version: int) -> dict[str, Any]:
        """in_review -> active (approving activates; the previous active is superseded)."""
        with self._write() as (conn, appended):
            row = self._policy_in_state(conn, label, version, "in_review")
            if row["author"] == actor.name:
                raise ApiError(403, "self_approval", "the author of a policy cannot approve it")
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
            self._append(
                conn,
                appended,
                [
                    self._own_record(
                        actor, "policy.approved", label, version=version, sha256=row["sha256"]
                    )
                ],
            )
        return self.policy_info(label, version)

    def reject_policy(
        self, actor: Principal, label: str, version: int, reason: str
    ) -> dict[str, Any]:
        """in_review -> rejected, with the reviewer's reason."""
        reason = reason.strip()
        if not reason:
            raise ApiError(422, "reason_required", "a rejection needs a reason")
        with self._write() as (conn, appended):
            row = self._policy_in_state(conn, label, version, "in_review")
            conn.execute(
                update(db.policies)
                .where(db.policies.c.id == row["id"])
                .values(
                    state="rejected", reviewed_by=actor.name, reviewed_at=db.now(), reason=reason
                )
            )
            self._append(
                conn,
                appended,
                [self._own_record(actor, "policy.rejected", label, version=version, reason=reason)],
            )
        return self.policy_info(label, version)

    def policy_info(
        self, label: str, version: int, *, with_document: bool = False
    ) -> dict[str, Any]:
        """One version's metadata (and document, on request)."""
        with self.engine.connect() as conn:
            row = self._policy_row(conn, label, version)
        return _policy_info(row, with_document)

    def policy_history(self, label: str) -> list[dict[str, Any]]:
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
        return [_policy_info(r, False) for r in rows]

    def list_labels(self) -> list[dict[str, Any]]:
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

    def diff_policy(self, label: str, old: int, new: int) -> str:
        """A unified diff between two versions' canonical YAML."""
        with self.engine.connect() as conn:
            a = self._policy_row(conn, label, old)
            b = self._policy_row(conn, label, new)
        lines = difflib.unified_diff(
            canonical_yaml(json.loads(a["document"])).splitlines(keepends=True),
            canonical_yaml(json.loads(b["document"])).splitlines(keepends=True),
            fromfile=f"{label}@{old}",
            tofile=f"{label}@{new}",
        )
        return "".join(lines)

    def active_policy(self, actor: Principal, label: str) -> tuple[bytes, str, str, int]:
        """(canonical bytes, sha256, signature, version) of the label's active version."""
        _check_label_access(actor, label)
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    select(db.policies).where(
                        db.policies.c.label == label, db.policies.c.state == "active"
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            raise not_found(f"active policy for {label}")
        return row["document"].encode("utf-8"), row["sha256"], row["signature"], row["version"]

    # ---- secrets ------------------------------------------------------------------------

    def create_key(self, actor: Principal, name: str, labels: Sequence[str]) -> dict[str, Any]:
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
        with self._write() as (conn, appended):
            exists = conn.execute(
                select(func.count()).select_from(db.secrets).where(db.secrets.c.name == name)
            ).scalar()
            if exists:
                raise ApiError(409, "key_exists", f"key {name} already exists; rotate it instead")
            self._new_key_version(conn, actor, name, 1)
            conn.execute(insert(db.secret_labels), [{"name": name, "label": lab} for lab in labels])
            self._append(
                conn,
                appended,
                [self._own_record(actor, "key.created", name=name, labels=labels, version=1)],
            )
        return self.key_info(name)

    def rotate_key(self, actor: Principal, name: str) -> dict[str, Any]:
        """Add a new current version of a key; older versions stay readable for reversal."""
        with self._write() as (conn, appended):
            latest = conn.execute(
                select(func.max(db.secrets.c.version)).where(db.secrets.c.name == name)
            ).scalar()
            if latest is None:
                raise not_found(f"key {name}")
            self._new_key_version(conn, actor, name, latest + 1)
            self._append(
                conn,
                appended,
                [self._own_record(actor, "key.rotated", name=name, version=latest + 1)],
            )
        return self.key_info(name)

    def _new_key_version(self, conn: Connection, actor: Principal, name: str, version: int) -> None:
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

    def key_info(self, name: str) -> dict[str, Any]:
        """A key's name, labels and versions (never its material)."""
        infos = [k for k in self.list_keys() if k["name"] == name]
        if not infos:
            raise not_found(f"key {name}")
        return infos[0]

    def list_keys(self) -> list[dict[str, Any]]:
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

    def keys_for_label(self, actor: Principal, label: str) -> dict[str, dict[str, Any]]:
        """Every version of every key allowed for ``label`` (pipeline tokens of that label)."""
        _check_label_access(actor, label)
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
        with self._write() as (conn, appended):
            self._append(
                conn,
                appended,
                [
                    self._own_record(
                        actor,
                        "key.read",
                        label,
                        keys={n: sorted(int(v) for v in k["versions"]) for n, k in keys.items()},
                    )
                ],
            )
        return keys

    # ---- audit --------------------------------------------------------------------------

    def post_audit(self, actor: Principal, records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
        """Append a batch of run records; a record id already stored is skipped (idempotent).
        Returns once the transaction holding the batch has committed."""
        return self.submit_audit(actor, records).result()

    def submit_audit(
        self, actor: Principal, records: Sequence[Mapping[str, Any]]
    ) -> Future[dict[str, int]]:
        """Queue a batch of run records for the audit writer; the future holds
        ``{accepted, duplicates}`` once the batch is committed (group commit: one
        transaction may carry several callers' batches, each chained in arrival order)."""
        unique: dict[str, dict[str, Any]] = {}
        for rec in records:
            unique.setdefault(rec["record_id"], dict(rec))
        for rec in unique.values():
            label = _run_label(rec)
            if label is not None and actor.labels and label not in actor.labels:
                raise ApiError(403, "label_forbidden", "token is not allowed for this policy label")
        rows = _run_rows(actor.name, db.now(), unique.values())
        pending = _PendingBatch(rows, list(unique.values()), len(records))
        self._audit_writer().submit(pending)
        return pending.future

    def _audit_writer(self) -> _GroupWriter:
        with self._writer_lock:
            if self._writer is None:
                if self._closed:
                    raise ApiError(503, "shutting_down", "the coordinator is shutting down")
                self._writer = _GroupWriter(self._commit_audit_group)
            return self._writer

    def _commit_audit_group(self, group: Sequence[_PendingBatch]) -> list[dict[str, int]]:
        """One transaction for several batches: duplicates are checked against the database
        and against earlier batches of the group, then every fresh record is chained."""
        with self._write() as (conn, appended):
            if not self._sqlite:
                # Take the chain's row lock before the duplicate check, so two servers
                # given the same record cannot both decide it is new.
                self._anchor(conn)
            ids = [row["record_id"] for batch in group for row in batch.rows]
            seen = self._known_ids(conn, ids)
            results = []
            fresh_rows: list[dict[str, Any]] = []
            fresh_records: list[tuple[dict[str, Any], str]] = []
            for batch in group:
                accepted = 0
                for row, rec in zip(batch.rows, batch.records, strict=True):
                    if row["record_id"] in seen:
                        continue
                    seen.add(row["record_id"])
                    fresh_rows.append(row)
                    fresh_records.append((rec, row["received_at"]))
                    accepted += 1
                results.append({"accepted": accepted, "duplicates": batch.sent - accepted})
            self._append_rows(conn, appended, fresh_rows)
            self._update_runs(conn, fresh_records)
        return results

    def _known_ids(self, conn: Connection, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` the chain already holds."""
        seen: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            if self._sqlite:
                # Plain SQL: compiling SQLAlchemy's expanding IN costs more than the lookups.
                rows = conn.exec_driver_sql(_sqlite_known_ids(len(chunk)), tuple(chunk))
                seen.update(r[0] for r in rows)
            else:
                seen.update(conn.execute(_KNOWN_IDS, {"ids": chunk}).scalars())
        return seen

    def _update_runs(self, conn: Connection, records: Sequence[tuple[dict[str, Any], str]]) -> None:
        """Fold (record, received_at) pairs into the runs' summary rows."""
        by_run: dict[str, list[tuple[dict[str, Any], str]]] = {}
        for rec, stamp in records:
            by_run.setdefault(rec["run_id"], []).append((rec, stamp))
        if not by_run:
            return
        existing = {
            r["run_id"]: dict(r)
            for r in conn.execute(
                select(db.runs).where(db.runs.c.run_id.in_(list(by_run)))
            ).mappings()
        }
        inserts, updates = [], []
        for run_id, recs in by_run.items():
            run = existing.get(run_id)
            if run is None:
                run = {c.name: None for c in db.runs.columns}
                run.update(run_id=run_id, status="running", records=0)
                inserts.append(run)
            else:
                updates.append(run)
            for rec, _ in recs:
                _merge_run(run, rec)
            run["last_seen"] = max(stamp for _, stamp in recs)
        if inserts:
            conn.execute(insert(db.runs), inserts)
        if updates:
            conn.execute(_UPDATE_RUN, [{"key": r["run_id"], **r} for r in updates])

    def list_audit(
        self,
        *,
        run_id: str | None = None,
        label: str | None = None,
        event: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after_seq: int = 0,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Chain entries in order, filtered by run, label, event and record time."""
        stmt = select(db.audit).where(db.audit.c.seq > after_seq)
        if run_id is not None:
            stmt = stmt.where(db.audit.c.run_id == run_id)
        if label is not None:
            stmt = stmt.where(db.audit.c.label == label)
        if event is not None:
            stmt = stmt.where(db.audit.c.event == event)
        if since is not None:
            stmt = stmt.where(db.audit.c.time >= db.format_time(since))
        if until is not None:
            stmt = stmt.where(db.audit.c.time < db.format_time(until))
        stmt = stmt.order_by(db.audit.c.seq).limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).mappings().all()
        return [
            {
                "seq": r["seq"],
                "prev_hash": r["prev_hash"],
                "hash": r["hash"],
                **json.loads(r["body"]),
            }
            for r in rows
        ]

    def audit_count(self) -> int:
        """How many entries the chain holds."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(db.audit)).scalar_one())

    def verify_audit(self, expect: tuple[int, str] | None = None) -> VerifyResult:
        """Walk the whole chain; see :func:`verify_chain`."""
        with self.engine.connect() as conn:
            return verify_chain(conn, self.public_key, expect)

    # ---- runs ---------------------------------------------------------------------------

    def list_runs(
        self,
        *,
        status: str | None = None,
        label: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Runs, newest activity first; ``running`` runs silent too long show as ``lost``."""
        cutoff = db.format_time(
            datetime.now(UTC) - timedelta(seconds=self.settings.lost_after_seconds)
        )
        stmt = select(db.runs)
        if label is not None:
            stmt = stmt.where(db.runs.c.label == label)
        if status == "lost":
            stmt = stmt.where(db.runs.c.status == "running", db.runs.c.last_seen < cutoff)
        elif status == "running":
            stmt = stmt.where(db.runs.c.status == "running", db.runs.c.last_seen >= cutoff)
        elif status is not None:
            stmt = stmt.where(db.runs.c.status == status)
        stmt = stmt.order_by(db.runs.c.last_seen.desc()).limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).mappings().all()
        out = []
        for r in rows:
            item = dict(r)
            if item["status"] == "running" and item["last_seen"] < cutoff:
                item["status"] = "lost"
            out.append(item)
        return out


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
                actual = _chain_hash(r["prev_hash"], r["body"].encode("utf-8"))
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
        anchor = json.loads(raw)
        a_count, a_hash = int(anchor["count"]), str(anchor["hash"])
        good = verify_signature(
            public_key, b64d(anchor["signature"]), _anchor_message(a_count, a_hash)
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
    return VerifyResult(intact=not problems, count=count, last_hash=prev, problems=problems)


def _column_problems(r: Mapping[str, Any]) -> list[str]:
    """The indexed columns must say what the hashed body says."""
    try:
        entry = json.loads(r["body"])
        rec = entry["record"]
        want = {
            "record_id": rec["record_id"],
            "kind": entry["kind"],
            "run_id": rec.get("run_id"),
            "event": rec["event"],
            "label": _record_label(entry),
            "time": db.normalize_time(rec["time"]),
            "received_at": entry["received_at"],
        }
    except (ValueError, KeyError, TypeError):
        return [f"seq {r['seq']}: body is not a chain entry"]
    bad = sorted(k for k, v in want.items() if r[k] != v)
    return (
        [f"seq {r['seq']}: column(s) {', '.join(bad)} differ from the hashed entry"] if bad else []
    )


def _record_label(entry: Mapping[str, Any]) -> str | None:
    rec = entry["record"]
    if entry["kind"] == "coordinator":
        return rec.get("label")
    return _run_label(rec)


def _run_label(rec: Mapping[str, Any]) -> str | None:
    policy = rec.get("policy")
    if isinstance(policy, Mapping) and isinstance(policy.get("label"), str):
        return policy["label"]
    return None


def _merge_run(run: dict[str, Any], rec: Mapping[str, Any]) -> None:
    """Fold one run record into the run's summary row."""
    run["records"] = (run["records"] or 0) + 1
    t = db.normalize_time(rec["time"])
    for col in ("engine", "engine_version", "principal"):
        if run[col] is None and isinstance(rec.get(col), str):
            run[col] = rec[col][: 64 if col != "principal" else 128]
    policy = rec.get("policy")
    if isinstance(policy, Mapping) and run["label"] is None:
        if isinstance(policy.get("label"), str):
            run["label"] = policy["label"]
        if isinstance(policy.get("version"), int):
            run["version"] = policy["version"]
    if run["started_at"] is None or t < run["started_at"]:
        run["started_at"] = t
    event = rec["event"]
    if event in ("run.completed", "run.failed") and run["status"] == "running":
        run["status"] = "succeeded" if event == "run.completed" else "failed"
        run["ended_at"] = t
        for col in ("rows_in", "rows_out", "rows_redacted"):
            if isinstance(rec.get(col), int):
                run[col] = rec[col]
        error = rec.get("error")
        if isinstance(error, Mapping) and isinstance(error.get("type"), str):
            run["error_type"] = error["type"][:128]


def _check_label_access(actor: Principal, label: str) -> None:
    if actor.role == "pipeline" and label not in actor.labels:
        raise ApiError(403, "label_forbidden", "token is not allowed for this policy label")


def _token_info(row: Mapping[str, Any]) -> dict[str, Any]:
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


def _policy_info(row: Mapping[str, Any], with_document: bool) -> dict[str, Any]:
    info = {
        k: row[k]
        for k in (
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
    }
    if with_document:
        info["document"] = json.loads(row["document"])
    return info
