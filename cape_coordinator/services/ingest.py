"""Audit ingest: run records posted by pipelines, committed by one group-commit writer,
and reading the chain back (filtered listing).

Callers hand a batch to :meth:`AuditIngest.submit` and wait on its future; one
writer thread commits every batch waiting at that moment in one transaction
(one fsync, one anchor signature), so throughput grows with load while a lone
batch is never held back.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, select

from .. import db
from ..errors import ApiError
from .base import Principal
from .chain import AuditChain, run_label
from .runs import RunService

log = logging.getLogger("cape_coordinator")

# The most run records one group commit carries (several callers' batches).
GROUP_MAX_RECORDS = 5000
_KNOWN_IDS = select(db.audit.c.record_id).where(
    db.audit.c.record_id.in_(bindparam("ids", expanding=True))
)
_CANON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def run_rows(source: str, stamp: str, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`~.chain.entry_row` for many run records of one request: the entry's other keys
    are encoded once, and the bodies are byte for byte what ``canonical_json`` makes."""
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
                "label": run_label(rec),
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


@dataclass
class PendingBatch:
    """A caller's audit batch waiting for the writer: prepared rows, their records, and
    how many records the caller sent (in-batch repeats count as duplicates)."""

    rows: list[dict[str, Any]]
    records: list[dict[str, Any]]
    sent: int
    future: Future[dict[str, int]] = field(default_factory=Future)


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
                    batch.future.set_result(self._commit([batch])[0])
                except Exception as one:
                    batch.future.set_exception(one)
            return
        for batch, result in zip(live, results, strict=True):
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
        """Append a batch of run records; a record id already stored is skipped (idempotent).
        Returns once the transaction holding the batch has committed."""
        return self.submit(actor, records).result()

    def submit(
        self, actor: Principal, records: Sequence[Mapping[str, Any]]
    ) -> Future[dict[str, int]]:
        """Queue a batch of run records for the audit writer; the future holds
        ``{accepted, duplicates}`` once the batch is committed (group commit: one
        transaction may carry several callers' batches, each chained in arrival order)."""
        unique: dict[str, dict[str, Any]] = {}
        for rec in records:
            unique.setdefault(rec["record_id"], dict(rec))
        for rec in unique.values():
            label = run_label(rec)
            if label is not None and actor.labels and label not in actor.labels:
                raise ApiError(403, "label_forbidden", "token is not allowed for this policy label")
        rows = run_rows(actor.name, db.now(), unique.values())
        pending = PendingBatch(rows, list(unique.values()), len(records))
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
        with self.chain.write() as (conn, appended):
            if not self.chain.sqlite:
                # Take the chain's row lock before the duplicate check, so two servers
                # given the same record cannot both decide it is new.
                self.chain.anchor(conn)
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
            self.chain.append_rows(conn, appended, fresh_rows)
            self.runs.fold(conn, fresh_records)
        return results

    def _known_ids(self, conn: Connection, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` the chain already holds."""
        seen: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            if self.chain.sqlite:
                # Plain SQL: compiling SQLAlchemy's expanding IN costs more than the lookups.
                rows = conn.exec_driver_sql(_sqlite_known_ids(len(chunk)), tuple(chunk))
                seen.update(r[0] for r in rows)
            else:
                seen.update(conn.execute(_KNOWN_IDS, {"ids": chunk}).scalars())
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
