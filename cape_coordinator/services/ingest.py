"""Audit ingest: run records posted by pipelines, checked, committed by one group-commit
writer, and reading the chain back (filtered listing).

A record is stored only if it can be (bounded depth, no NUL or control characters,
the API's fields, a policy label: else 422 ``record_invalid``), names a label its
token holds (403 ``label_not_allowed``), belongs to a run bound to the same token
and label by the run's first record (403 ``run_not_yours``), and does not reuse an
id its own sender stored with other content (409 ``record_conflict``). Record ids
are namespaced by sender: the same id from another token is that token's own
record, so a pipeline that predicts another's ids cannot silence its records. A
refused batch stores nothing; every refusal names the record's position and id.

Callers hand a batch to :meth:`AuditIngest.submit` and wait on its future; one
writer thread commits every batch waiting at that moment in one transaction
(one fsync, one anchor signature), so throughput grows with load while a lone
batch is never held back.

Why one module of about 500 lines: the checks, the group-commit writer and the
read-back share one notion of what a stored record is (its per-sender id, its
run binding), which the writer re-checks inside its transaction; keeping them
together keeps the check and the commit from drifting apart.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Connection, bindparam, select

from .. import db
from ..errors import ApiError
from ..schemas import RunRecord
from .base import CONTROL_RE, Principal
from .chain import AuditChain, run_label
from .runs import RunService

log = logging.getLogger("cape_coordinator")

# The most run records one group commit carries (several callers' batches).
GROUP_MAX_RECORDS = 5000
_KNOWN_IDS = select(db.audit.c.record_id, db.audit.c.body).where(
    db.audit.c.sender == bindparam("sender"),
    db.audit.c.record_id.in_(bindparam("ids", expanding=True)),
)
# PostgreSQL: one unique-index probe per id. With ``record_id IN (...)`` the planner,
# lacking statistics on a young table (or misjudging how many records one sender has),
# scanned every record of the sender and filtered them against the list: a cost growing
# with the sender's whole history, paid inside the chain's lock by every group. The
# LIMIT keeps the lateral subquery from being flattened into a join the planner could
# turn back into that scan; (sender, record_id) is unique, so it drops nothing.
_PG_KNOWN_IDS = (
    "SELECT a.record_id, a.body FROM unnest(CAST(%(ids)b AS TEXT[])) AS i(rid) CROSS JOIN"
    " LATERAL (SELECT record_id, body FROM audit WHERE sender = %(sender)s"
    " AND record_id = i.rid LIMIT 1) AS a"
)
_CANON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def run_rows(
    actor: Principal, stamp: str, records: Iterable[dict[str, Any]]
) -> list[dict[str, Any]]:
    """:func:`~.chain.entry_row` for many run records of one request: the entry's other keys
    are encoded once, and the bodies are byte for byte what ``canonical_json`` makes. The
    entry names the sending token (``sender``) beside its name (``source``)."""
    head = f'{{"kind":"run","received_at":{_CANON.encode(stamp)},"record":'
    tail = f',"sender":{_CANON.encode(actor.token_id)},"source":{_CANON.encode(actor.name)}}}'
    rows = []
    for rec in records:
        rows.append(
            {
                "record_id": rec["record_id"],
                "kind": "run",
                "run_id": rec.get("run_id"),
                "event": rec["event"],
                "label": run_label(rec),
                "time": db.normalize_time(rec["time"]),
                "received_at": stamp,
                "body": head + _CANON.encode(rec) + tail,
                "sender": actor.token_id,
            }
        )
    return rows


# Deeper records are refused (422): nothing a pipeline sends nests this far, and the
# limit keeps every later encoding and comparison of the record cheap and bounded.
MAX_RECORD_DEPTH = 16
# Records per request the API takes at all (the max_batch_records setting may lower it).
MAX_BATCH = 1000
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_BAD_CHARS = CONTROL_RE


def _record_problem(value: Any, depth: int = 0) -> str | None:
    """Why a record's value cannot be stored (too deep, a control character), or None."""
    if depth > MAX_RECORD_DEPTH:
        return f"record nests deeper than {MAX_RECORD_DEPTH} levels"
    if isinstance(value, str):
        return "text holds a NUL or control character" if _BAD_CHARS.search(value) else None
    if isinstance(value, Mapping):
        for k, v in value.items():
            problem = _record_problem(k, depth + 1) or _record_problem(v, depth + 1)
            if problem:
                return problem
    elif isinstance(value, list):
        for v in value:
            problem = _record_problem(v, depth + 1)
            if problem:
                return problem
    return None


def _readable_id(raw: Any) -> str | None:
    rid = raw.get("record_id") if isinstance(raw, Mapping) else None
    return rid if isinstance(rid, str) and _ID.fullmatch(rid) else None


def check_records(raw: Any, max_records: int) -> list[dict[str, Any]]:
    """The records of a ``POST /v1/audit`` body, each checked; the first record that cannot
    be stored is a 422 ``record_invalid`` naming its index (and id, if readable)."""
    if (
        not isinstance(raw, Mapping)
        or set(raw) != {"records"}
        or not isinstance(raw["records"], list)
    ):
        raise _shape_error('the body must be {"records": [...]}')
    items = raw["records"]
    if not items:
        raise _shape_error("give at least one record")
    if len(items) > MAX_BATCH:
        raise _shape_error(f"at most {MAX_BATCH} records per request")
    if len(items) > max_records:
        raise ApiError(413, "batch_too_large", f"at most {max_records} records")
    out = []
    for index, item in enumerate(items):
        problem = _record_problem(item)
        if problem is None:
            try:
                model = RunRecord.model_validate(item)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err.get("loc", ())) or "record"
                problem = f"{where}: {str(err.get('msg', 'invalid'))[:200]}"
            else:
                out.append(model.model_dump(mode="json", exclude_unset=True))
                continue
        raise ApiError(
            422,
            "record_invalid",
            f"record {index} cannot be stored: {problem}",
            index=index,
            record_id=_readable_id(item),
            problems=[{"loc": f"records.{index}", "msg": problem}],
        )
    return out


def _shape_error(message: str) -> ApiError:
    return ApiError(
        422,
        "invalid_request",
        "request does not match the API",
        problems=[{"loc": "body", "msg": message}],
    )


@functools.lru_cache(maxsize=16)
def _sqlite_known_ids(n_ids: int) -> str:
    """``SELECT record_id, body FROM audit WHERE sender = ? AND record_id IN (?, ...)``."""
    marks = ", ".join("?" for _ in range(n_ids))
    return (
        "SELECT record_id, body FROM audit"  # noqa: S608
        f" WHERE sender = ? AND record_id IN ({marks})"
    )


@dataclass
class PendingBatch:
    """A caller's audit batch waiting for the writer: prepared rows, their records, and
    how many records the caller sent (in-batch repeats count as duplicates); ``actor``
    is the sender (None only in tests of the writer itself)."""

    rows: list[dict[str, Any]]
    records: list[dict[str, Any]]
    sent: int
    future: Future[dict[str, int]] = field(default_factory=Future)
    actor: Principal | None = None
    # Each record's position in the batch as sent (refusals name it).
    positions: list[int] | None = None


def _refusal(status: int, code: str, message: str, index: int, rec: Mapping[str, Any]) -> ApiError:
    return ApiError(status, code, message, index=index, record_id=rec.get("record_id"))


class GroupWriter:
    """One thread committing queued audit batches, all that are waiting in one transaction.

    Callers wait on their batch's future, which is resolved only after the commit that
    holds it. Batches queue while a commit is in progress, so under load each commit
    (one fsync, one anchor signature) carries many batches, and at low load a batch is
    committed at once, never held back to wait for company.
    """

    def __init__(self, commit: Callable[[Sequence[PendingBatch]], list[dict[str, int]]]):
        self._commit = commit
        self._queue: queue.SimpleQueue[PendingBatch | None] = queue.SimpleQueue()
        self._gate = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="cape-audit-writer", daemon=True)
        self._thread.start()

    def submit(self, batch: PendingBatch) -> None:
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

    def _flush(self, group: list[PendingBatch]) -> None:
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
                    _resolve(batch, self._commit([batch])[0])
                except Exception as one:
                    batch.future.set_exception(one)
            return
        for batch, result in zip(live, results, strict=True):
            _resolve(batch, result)


def _resolve(batch: PendingBatch, result: dict[str, int] | BaseException) -> None:
    """A batch's outcome: its counts, or the refusal of the whole batch."""
    if isinstance(result, BaseException):
        batch.future.set_exception(result)
    else:
        batch.future.set_result(result)


class AuditIngest:
    """Run records into the chain (group commit), and the chain read back."""

    def __init__(self, chain: AuditChain, runs: RunService):
        self.chain = chain
        self.engine = chain.engine
        self.runs = runs
        self._writer: GroupWriter | None = None
        self._writer_lock = threading.Lock()
        self._closed = False

    def post(self, actor: Principal, records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
        """Append a batch of run records, all or none; an identical resend by the same token
        is counted as duplicates. Returns once the transaction holding it has committed."""
        return self.submit(actor, records).result()

    def submit(
        self, actor: Principal, records: Sequence[Mapping[str, Any]]
    ) -> Future[dict[str, int]]:
        """Queue a batch of run records for the audit writer; the future holds
        ``{accepted, duplicates}`` once the batch is committed (group commit: one
        transaction may carry several callers' batches, each chained in arrival order),
        or the batch's refusal (:class:`ApiError` naming the record): a label the token
        does not hold (here, at once), another sender's run or a conflicting id (checked
        by the writer against the database)."""
        unique: dict[str, dict[str, Any]] = {}
        positions: dict[str, int] = {}
        for index, rec in enumerate(records):
            label = run_label(rec)
            if label is None:
                # A record must say whose run it is: one naming no label could otherwise
                # be slipped into a run whose label its token does not hold.
                raise ApiError(
                    422,
                    "record_invalid",
                    f"record {index} cannot be stored: it names no policy label",
                    index=index,
                    record_id=rec.get("record_id"),
                    problems=[
                        {"loc": f"records.{index}.policy.label", "msg": "a label is required"}
                    ],
                )
            if label not in actor.labels:
                raise _refusal(
                    403,
                    "label_not_allowed",
                    f"record {index} names a policy label this token does not hold",
                    index,
                    rec,
                )
            positions.setdefault(rec["record_id"], index)
            first = unique.setdefault(rec["record_id"], dict(rec))
            if first != rec:
                raise _refusal(
                    409,
                    "record_conflict",
                    f"record {index} repeats an id of this batch with other content",
                    index,
                    rec,
                )
        rows = run_rows(actor, db.now(), unique.values())
        pending = PendingBatch(
            rows,
            list(unique.values()),
            len(records),
            actor=actor,
            positions=[positions[rid] for rid in unique],
        )
        self._audit_writer().submit(pending)
        return pending.future

    def close(self) -> None:
        """Commit queued batches and stop the writer; later submissions get a 503."""
        with self._writer_lock:
            self._closed = True
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.stop()

    def _audit_writer(self) -> GroupWriter:
        with self._writer_lock:
            if self._writer is None:
                if self._closed:
                    raise ApiError(503, "shutting_down", "the coordinator is shutting down")
                self._writer = GroupWriter(self._commit_group)
            return self._writer

    def _commit_group(self, group: Sequence[PendingBatch]) -> list[dict[str, int]]:
        """One transaction for several batches: duplicates are checked against the database
        and against earlier batches of the group, then every fresh record is chained."""
        # chain.write() takes the chain's row lock (PostgreSQL) or BEGIN IMMEDIATE (SQLite)
        # before the duplicate check, so two servers given the same record cannot both
        # decide it is new.
        with self.chain.write() as (conn, appended):
            ids = [(row["sender"], row["record_id"]) for batch in group for row in batch.rows]
            known = self._known_ids(conn, ids)
            run_ids = {rec["run_id"] for batch in group for rec in batch.records}
            stored = self.runs.stored(conn, run_ids)
            bound = {k: (r["sender"], r["label"]) for k, r in stored.items()}
            results: list[dict[str, int] | ApiError] = []
            fresh_rows: list[dict[str, Any]] = []
            fresh_records: list[tuple[dict[str, Any], str]] = []
            for batch in group:
                try:
                    rows, records = self._admit(batch, known, bound)
                except ApiError as refused:
                    # This batch stores nothing; the others of the group go on.
                    results.append(refused)
                    continue
                for row, rec in zip(rows, records, strict=True):
                    known[(row["sender"], row["record_id"])] = row["body"]
                    label = bound.get(rec["run_id"], (None, None))[1] or row["label"]
                    bound[rec["run_id"]] = (row["sender"], label)
                    fresh_rows.append(row)
                    fresh_records.append((rec, row["received_at"]))
                results.append({"accepted": len(rows), "duplicates": batch.sent - len(rows)})
            self.chain.append_rows(conn, appended, fresh_rows)
            self.runs.fold(
                conn,
                fresh_records,
                senders={r["run_id"]: r["sender"] for r in fresh_rows},
                stored=stored,
            )
        return results  # type: ignore[return-value]

    @staticmethod
    def _admit(
        batch: PendingBatch,
        known: dict[tuple[str | None, str], str],
        bound: dict[str, tuple[str | None, str | None]],
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The batch's rows to store, or the refusal of the whole batch: a record id its
        sender stored with other content (409), a run bound to another sender or label
        (403). An identical resend by its sender is a duplicate, not stored again; the
        same id from another sender is another record (``known`` is keyed by sender)."""
        rows, records = [], []
        actor = batch.actor
        # Runs this batch starts are bound by its first record for them, like stored ones.
        local: dict[str, tuple[str | None, str | None]] = {}
        for i, (row, rec) in enumerate(zip(batch.rows, batch.records, strict=True)):
            index = batch.positions[i] if batch.positions else i
            if actor is not None:
                run = bound.get(rec["run_id"]) or local.get(rec["run_id"])
                if run is None:
                    local[rec["run_id"]] = (actor.token_id, row["label"])
                elif run[1] is None and row["label"] is not None:
                    local[rec["run_id"]] = (run[0], row["label"])
                if run is not None:
                    sender, label = run
                    if (sender is not None and sender != actor.token_id) or (
                        label is not None and row["label"] is not None and label != row["label"]
                    ):
                        raise _refusal(
                            403,
                            "run_not_yours",
                            f"record {index}: run belongs to another sender or label",
                            index,
                            rec,
                        )
            body = known.get((row["sender"], row["record_id"]))
            if body is not None:
                if actor is not None and json.loads(body)["record"] != rec:
                    raise _refusal(
                        409,
                        "record_conflict",
                        f"record {index}: its id is already stored from this sender with"
                        " other content",
                        index,
                        rec,
                    )
                continue
            rows.append(row)
            records.append(rec)
        return rows, records

    def _known_ids(
        self, conn: Connection, ids: Sequence[tuple[str | None, str]]
    ) -> dict[tuple[str | None, str], str]:
        """Which of ``ids`` (sender, record id) the chain already holds, with their bodies."""
        by_sender: dict[str | None, list[str]] = {}
        for sender, rid in ids:
            by_sender.setdefault(sender, []).append(rid)
        seen: dict[tuple[str | None, str], str] = {}
        for sender, rids in by_sender.items():
            if sender is None:
                # Only the coordinator's own records have no sender; none is posted.
                continue
            for i in range(0, len(rids), 500):
                chunk = rids[i : i + 500]
                if self.chain.sqlite:
                    # Plain SQL: compiling SQLAlchemy's expanding IN costs more than the lookups.
                    rows = conn.exec_driver_sql(_sqlite_known_ids(len(chunk)), (sender, *chunk))
                elif self.engine.dialect.name == "postgresql":
                    # Binary array (%b): the text format escapes each element in Python.
                    rows = conn.exec_driver_sql(_PG_KNOWN_IDS, {"sender": sender, "ids": chunk})
                else:
                    rows = conn.execute(_KNOWN_IDS, {"sender": sender, "ids": chunk})
                seen.update(((sender, r[0]), r[1]) for r in rows)
        return seen

    def list(
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
        """Chain entries in order, filtered by run, label, event and receipt time."""
        stmt = select(db.audit).where(db.audit.c.seq > after_seq)
        if run_id is not None:
            stmt = stmt.where(db.audit.c.run_id == run_id)
        if label is not None:
            stmt = stmt.where(db.audit.c.label == label)
        if event is not None:
            stmt = stmt.where(db.audit.c.event == event)
        # The coordinator's receipt time, not the time a pipeline wrote into its record.
        if since is not None:
            stmt = stmt.where(db.audit.c.received_at >= db.format_time(since))
        if until is not None:
            stmt = stmt.where(db.audit.c.received_at < db.format_time(until))
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
