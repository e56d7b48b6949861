"""Audit delivery: one dispatcher per configured sink, at-least-once, never in ingest's way.

Each sink has a cursor row (``audit_delivery``, migration 0006): the chain ``seq``
of the last record the sink acknowledged. Its dispatcher, a daemon thread started
with the app, reads the records after the cursor in chain order, keeps those its
event filter matches, hands them to the sink as one batch, and moves the cursor
past the batch only once the sink has taken it, so a crash or a receiver outage
repeats records and never skips one (receivers drop repeats by ``seq``). Records
the filter skips move the cursor too. A failed batch is retried whole, with
exponential backoff and full jitter; after ``max_attempts`` it goes to the sink's
dead-letter file when one is configured (and the cursor moves on), else it is
retried until it is delivered.

Ingest never waits for a sink: a commit only sets each dispatcher's wake-up event
(:attr:`AuditChain.listeners`), and the dispatchers read the committed chain on
their own connections. The chain's ``seq`` grows in commit order (appends are
serialised by the chain's lock), so a record can never appear behind a cursor.

With several coordinator replicas on one database, one replica delivers for a
sink at a time: the cursor row carries a lease (owner and expiry) taken and renewed
with a conditional UPDATE, which works the same on SQLite and PostgreSQL. A replica
that stalls past its lease loses it; if it then still delivers its batch, that
batch arrives twice, which at-least-once allows. Replicas' clocks should agree to
within a small part of the lease (30 s).
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Integer,
    String,
    Table,
    Text,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from .. import db
from ..crypto import CoordinatorSetupError
from ..metrics import register_collector
from ..sinks.base import DeliveryError, Sink, open_sink, record_document
from ..sinks.config import SinkBase, WebhookSink

if TYPE_CHECKING:
    from ..coordinator import Coordinator

log = logging.getLogger("cape_coordinator.delivery")

audit_delivery = Table(
    "audit_delivery",
    db.metadata,
    Column("sink", String(64), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("delivered", Integer, nullable=False),
    Column("dead_lettered", Integer, nullable=False),
    Column("failures", Integer, nullable=False),
    Column("last_error", Text),
    Column("last_delivered_at", String(32)),
    Column("lease_owner", String(64)),
    Column("lease_until", String(32)),
    Column("created_at", String(32), nullable=False),
)

LEASE_SECONDS = 30.0
# How often (at most) a sink's failed attempts during an outage are added to its row.
FAILURE_RECORD_SECONDS = 5.0
# How many chain entries one look at the chain scans for records a filter matches.
_SCAN_ROWS = 2000


def _later(seconds: float) -> str:
    return db.format_time(datetime.now(UTC) + timedelta(seconds=seconds))


class _Dispatcher:
    """One sink's delivery loop (a daemon thread)."""

    def __init__(self, service: DeliveryService, config: Any):
        self.service = service
        self.config = config
        self.name: str = config.name
        self.wake = threading.Event()
        self.thread = threading.Thread(
            target=self._run, name=f"cape-audit-sink-{self.name}", daemon=True
        )
        self.sink: Sink | None = None
        self.attempts = 0
        self.lingering = False
        self.lease_renewed = 0.0
        # The batch that failed last, kept for its retry: (cursor, documents, reach).
        self.retry: tuple[int, list[dict[str, Any]], int] | None = None
        # Failed attempts not yet added to the cursor row, and when the row last got some.
        self.unrecorded_failures = 0
        self.failures_recorded_at = 0.0
        self.counters = {"delivered": 0, "failed": 0, "dead_lettered": 0}

    # ---- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        stop = self.service._stop
        while not stop.is_set():
            try:
                wait = self._step()
            except Exception as exc:  # the database or the sink failed unexpectedly
                log.error("audit sink %s: %s", self.name, type(exc).__name__)
                wait = self._backoff(max(self.attempts, 1))
            if wait > 0 and (self.attempts or self.lingering):
                # Backing off, or lingering for a fuller batch: new commits must not cut
                # the wait short (under load they would turn it into a retry, or a small
                # batch and a cursor commit, per ingest commit); only stop() does.
                stop.wait(wait)
            elif wait > 0:
                self.wake.wait(wait)
                self.wake.clear()
        if self.sink is not None:
            try:
                self.sink.close()
            except Exception as exc:
                log.warning("audit sink %s: close failed: %s", self.name, type(exc).__name__)

    def _step(self) -> float:
        """One look at the chain; returns how long to wait before the next."""
        svc = self.service
        self.lingering = False
        if not svc._hold_lease(self):
            return min(svc.lease_seconds / 3, 5.0)
        retry, self.retry = self.retry, None
        if retry is not None and svc._position(self.name) == retry[0]:
            # Retrying: the batch that failed, not read and parsed again for every attempt.
            position, docs, scanned_to = retry
        else:
            position, rows, scanned_to = svc._pending(self.config)
            if scanned_to == position:
                return float(self.config.poll_seconds)
            if not rows:
                svc._advance(self, scanned_to, delivered=0)
                return 0.0
            docs = [record_document(r) for r in rows]
        try:
            if self.sink is None:
                self.sink = open_sink(self.config)
            self.sink.deliver(docs)
        except Exception as exc:
            self.attempts += 1
            self.counters["failed"] += 1
            # Our own errors' messages are written to be shown (no secret, no record);
            # anything else is named by its type only, as its text may quote either.
            safe = isinstance(exc, DeliveryError | CoordinatorSetupError)
            reason = str(exc) if safe else type(exc).__name__
            if self.sink is not None and not isinstance(exc, DeliveryError):
                # An unexpected error may leave the sink in any state: open it afresh.
                self._close_sink()
            dead = self.config.dead_letter
            if dead and self.attempts >= self.config.max_attempts:
                svc._dead_letter(self, Path(dead), docs, reason, scanned_to)
                self.attempts = 0
                return 0.0
            self.retry = (position, docs, scanned_to)
            svc._failed(self, reason)
            log.warning(
                "audit sink %s: delivery of seq %s-%s failed (attempt %d): %s",
                self.name,
                docs[0]["seq"],
                docs[-1]["seq"],
                self.attempts,
                reason,
            )
            return self._backoff(self.attempts)
        self.attempts = 0
        svc._advance(self, scanned_to, delivered=len(docs))
        if len(docs) < self.config.batch_size:
            # Caught up: let the next records gather into one batch (and one cursor commit).
            self.lingering = True
            return float(self.config.linger_seconds)
        return 0.0

    def _backoff(self, attempt: int) -> float:
        """Full jitter over an exponentially growing, capped window."""
        cfg = self.config
        window = min(cfg.retry_max_seconds, cfg.retry_base_seconds * 2 ** min(attempt - 1, 30))
        return random.uniform(0, window)

    def _close_sink(self) -> None:
        sink, self.sink = self.sink, None
        if sink is not None:
            try:
                sink.close()
            except Exception as exc:
                log.warning("audit sink %s: close failed: %s", self.name, type(exc).__name__)


class DeliveryService:
    """The configured sinks' cursors and dispatchers."""

    def __init__(
        self,
        engine: Engine,
        sinks: Sequence[Any],
        *,
        lease_seconds: float = LEASE_SECONDS,
        write_lock: threading.Lock | None = None,
    ):
        self.engine = engine
        # The chain's process lock: in one process the dispatchers' short cursor updates
        # queue behind ingest's commits on it, instead of meeting SQLite's write lock and
        # its busy handler, which sleeps in steps of up to 100 ms, in ingest's way.
        self._write_lock = write_lock if write_lock is not None else threading.Lock()
        self.sqlite = engine.dialect.name == "sqlite"
        self.configs: list[SinkBase] = list(sinks)
        self.lease_seconds = lease_seconds
        self.failure_record_seconds = FAILURE_RECORD_SECONDS
        # Unique per process and start: a replica restarted on the same host is another owner.
        self.owner = f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._dispatchers: dict[str, _Dispatcher] = {}
        self._started = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DeliveryService(sinks={[c.name for c in self.configs]!r})"

    # ---- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Create missing cursors and start one dispatcher per sink (idempotent)."""
        with self._lock:
            if self._started or not self.configs:
                return
            for config in self.configs:
                if isinstance(config, WebhookSink):
                    config.secret_bytes()  # fail at start-up, naming the sink, not later
            self.ensure_cursors()
            self._stop.clear()
            # Assigned whole: notify() runs on ingest's thread and reads it without the lock.
            self._dispatchers = {c.name: _Dispatcher(self, c) for c in self.configs}
            for dispatcher in self._dispatchers.values():
                dispatcher.thread.start()
            self._started = True

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the dispatchers (a delivery under way finishes or times out) and give up
        the leases, so another replica can take over at once."""
        with self._lock:
            if not self._started:
                return
            self._stop.set()
            for dispatcher in self._dispatchers.values():
                dispatcher.wake.set()
            for dispatcher in self._dispatchers.values():
                dispatcher.thread.join(timeout)
            try:
                with self._write() as conn:
                    conn.execute(
                        update(audit_delivery)
                        .where(audit_delivery.c.lease_owner == self.owner)
                        .values(lease_owner=None, lease_until=None)
                    )
            except Exception as exc:
                log.warning("audit delivery: cannot release leases: %s", type(exc).__name__)
            self._dispatchers = {}
            self._started = False

    def notify(self) -> None:
        """Wake every dispatcher (called after each chain commit; never blocks)."""
        for dispatcher in tuple(self._dispatchers.values()):
            dispatcher.wake.set()

    def ensure_cursors(self) -> None:
        """A cursor row for each configured sink that has none yet: before the first chain
        entry, or (``start_at: latest``) at the chain's end now."""
        for config in self.configs:
            with self.engine.connect() as conn:
                exists = conn.execute(
                    select(audit_delivery.c.sink).where(audit_delivery.c.sink == config.name)
                ).first()
            if exists:
                continue
            try:
                with self._write() as conn:
                    start = 0
                    if config.start_at == "latest":
                        start = int(conn.execute(select(func.max(db.audit.c.seq))).scalar() or 0)
                    conn.execute(
                        insert(audit_delivery).values(
                            sink=config.name,
                            position=start,
                            delivered=0,
                            dead_lettered=0,
                            failures=0,
                            created_at=db.now(),
                        )
                    )
            except IntegrityError:
                pass  # another replica made it first

    # ---- what monitoring reads ---------------------------------------------------------------

    def backlog(self) -> dict[str, int]:
        """Per sink, how many chain records its filter matches that it has not yet taken
        (the ``cape_audit_delivery_pending`` gauge)."""
        out: dict[str, int] = {}
        with self.engine.connect() as conn:
            positions = dict(
                conn.execute(select(audit_delivery.c.sink, audit_delivery.c.position)).all()
            )
            for config in self.configs:
                position = int(positions.get(config.name, 0))
                counts = conn.execute(
                    select(db.audit.c.event, func.count())
                    .where(db.audit.c.seq > position)
                    .group_by(db.audit.c.event)
                ).all()
                out[config.name] = sum(int(n) for event, n in counts if config.matches(event))
        return out

    def status(self) -> list[dict[str, Any]]:
        """Each sink's cursor, totals, last error and backlog (no secrets, no records)."""
        backlog = self.backlog()
        with self.engine.connect() as conn:
            rows = {r["sink"]: dict(r) for r in conn.execute(select(audit_delivery)).mappings()}
        out = []
        for config in self.configs:
            row = rows.get(config.name, {})
            out.append(
                {
                    "sink": config.name,
                    "kind": getattr(config, "kind", "?"),
                    "position": row.get("position"),
                    "delivered": row.get("delivered", 0),
                    "dead_lettered": row.get("dead_lettered", 0),
                    "failures": row.get("failures", 0),
                    "last_error": row.get("last_error"),
                    "last_delivered_at": row.get("last_delivered_at"),
                    "backlog": backlog.get(config.name, 0),
                }
            )
        return out

    def counters(self) -> dict[str, dict[str, int]]:
        """Per sink, this process's delivered records, failed attempts and dead-lettered
        records since it started (for the metrics counters)."""
        return {name: dict(d.counters) for name, d in self._dispatchers.items()}

    # ---- the dispatchers' database work ------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One short write transaction (SQLite: BEGIN IMMEDIATE, like every other writer)."""
        with self._write_lock, self.engine.connect() as conn:
            conn.execution_options(cape_write=True)
            with conn.begin():
                yield conn

    def _hold_lease(self, d: _Dispatcher) -> bool:
        """Take or renew this replica's lease on the sink; False when another holds it."""
        now = time.monotonic()
        if d.lease_renewed and now - d.lease_renewed < self.lease_seconds / 3:
            return True
        stamp = db.now()
        with self._write() as conn:
            taken = conn.execute(
                update(audit_delivery)
                .where(
                    audit_delivery.c.sink == d.name,
                    (audit_delivery.c.lease_owner == self.owner)
                    | audit_delivery.c.lease_owner.is_(None)
                    | (audit_delivery.c.lease_until < stamp),
                )
                .values(lease_owner=self.owner, lease_until=_later(self.lease_seconds))
            ).rowcount
        d.lease_renewed = now if taken else 0.0
        return bool(taken)

    def _pending(self, config: Any) -> tuple[int, list[Mapping[str, Any]], int]:
        """(cursor, the next batch of matching rows in chain order, the seq the batch
        reaches: the cursor's next value once it is delivered)."""
        with self.engine.connect() as conn:
            position = int(
                conn.execute(
                    select(audit_delivery.c.position).where(audit_delivery.c.sink == config.name)
                ).scalar_one()
            )
            heads = conn.execute(
                select(db.audit.c.seq, db.audit.c.event)
                .where(db.audit.c.seq > position)
                .order_by(db.audit.c.seq)
                .limit(_SCAN_ROWS)
            ).all()
            if not heads:
                return position, [], position
            wanted: list[int] = []
            reached = position
            for seq, event in heads:
                if config.matches(event):
                    if len(wanted) == config.batch_size:
                        break
                    wanted.append(int(seq))
                reached = int(seq)
            rows = _rows(conn, wanted) if wanted else []
        return position, rows, reached

    def _position(self, sink: str) -> int:
        """The sink's cursor as stored."""
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    select(audit_delivery.c.position).where(audit_delivery.c.sink == sink)
                ).scalar_one()
            )

    def _advance(self, d: _Dispatcher, to: int, *, delivered: int) -> None:
        values: dict[str, Any] = {
            "position": to,
            "delivered": audit_delivery.c.delivered + delivered,
            "failures": audit_delivery.c.failures + d.unrecorded_failures,
        }
        if delivered:
            values["last_delivered_at"] = db.now()
            values["last_error"] = None
        with self._write() as conn:
            moved = conn.execute(
                update(audit_delivery)
                .where(
                    audit_delivery.c.sink == d.name,
                    audit_delivery.c.lease_owner == self.owner,
                    audit_delivery.c.position < to,
                )
                .values(**values)
            ).rowcount
        if not moved:
            d.lease_renewed = 0.0  # lost the lease (or another replica moved on): recheck
        else:
            d.unrecorded_failures = 0
            d.failures_recorded_at = 0.0
        d.counters["delivered"] += delivered

    def _failed(self, d: _Dispatcher, reason: str) -> None:
        """Count a failed attempt; the first of an outage is recorded at once, later ones
        at most every ``failure_record_seconds`` (fast retries would otherwise commit, and
        on SQLite fsync, once per attempt beside ingest's commits)."""
        d.unrecorded_failures += 1
        now = time.monotonic()
        if d.failures_recorded_at and now - d.failures_recorded_at < self.failure_record_seconds:
            return
        with self._write() as conn:
            conn.execute(
                update(audit_delivery)
                .where(audit_delivery.c.sink == d.name)
                .values(
                    failures=audit_delivery.c.failures + d.unrecorded_failures,
                    last_error=reason[:500],
                )
            )
        d.unrecorded_failures = 0
        d.failures_recorded_at = now

    def _dead_letter(
        self, d: _Dispatcher, path: Path, docs: Sequence[Mapping[str, Any]], reason: str, to: int
    ) -> None:
        """Append the batch to the dead-letter file (fsynced) and only then move the cursor;
        a dead-letter file that cannot be written leaves the batch to be retried."""
        line = json.dumps(
            {
                "sink": d.name,
                "dead_lettered_at": db.now(),
                "error": reason,
                "attempts": d.attempts,
                "first_seq": docs[0]["seq"],
                "last_seq": docs[-1]["seq"],
                "records": list(docs),
            },
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview((line + "\n").encode("utf-8"))
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        log.error(
            "audit sink %s: seq %s-%s dead-lettered after %d attempts: %s",
            d.name,
            docs[0]["seq"],
            docs[-1]["seq"],
            d.attempts,
            reason,
        )
        with self._write() as conn:
            conn.execute(
                update(audit_delivery)
                .where(audit_delivery.c.sink == d.name, audit_delivery.c.position < to)
                .values(
                    position=to,
                    dead_lettered=audit_delivery.c.dead_lettered + len(docs),
                    failures=audit_delivery.c.failures + d.unrecorded_failures + 1,
                    last_error=reason[:500],
                )
            )
        d.unrecorded_failures = 0
        d.failures_recorded_at = 0.0
        d.counters["dead_lettered"] += len(docs)


def _rows(conn: Connection, seqs: list[int]) -> list[Mapping[str, Any]]:
    stmt = select(db.audit).where(db.audit.c.seq.in_(seqs)).order_by(db.audit.c.seq)
    return [dict(row) for row in conn.execute(stmt).mappings()]


def delivery_metrics(coordinator: Coordinator) -> Iterator[Metric]:
    """The sinks' figures for ``GET /metrics``, from the database (the same on every
    replica): records pending per sink, and the cursor rows' running totals of delivered
    and dead-lettered records and of failed attempts."""
    pending = GaugeMetricFamily(
        "cape_audit_delivery_pending",
        "Audit records the sink's filter matches that it has not yet acknowledged.",
        labels=["sink"],
    )
    delivered = CounterMetricFamily(
        "cape_audit_delivered",
        "Audit records delivered to the sink and acknowledged (all replicas).",
        labels=["sink"],
    )
    failures = CounterMetricFamily(
        "cape_audit_delivery_failures",
        "Failed delivery attempts of a batch to the sink (each retry counts).",
        labels=["sink"],
    )
    dead = CounterMetricFamily(
        "cape_audit_dead_lettered",
        "Audit records written to the sink's dead-letter file after max_attempts.",
        labels=["sink"],
    )
    for row in coordinator.delivery.status():
        name = [row["sink"]]
        pending.add_metric(name, row["backlog"])
        delivered.add_metric(name, row["delivered"] or 0)
        failures.add_metric(name, row["failures"] or 0)
        dead.add_metric(name, row["dead_lettered"] or 0)
    yield from (pending, delivered, failures, dead)


register_collector(delivery_metrics, "cape_coordinator.services.delivery")
