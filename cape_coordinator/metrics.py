"""Prometheus metrics for the coordinator: ``GET /metrics`` in the text exposition format.

Figures that live in the database (runs by engine, label and status, rows processed
and redacted, the audit chain's length and whether its head matches its signed
anchor) are computed at scrape time by a custom collector from a few cheap
aggregate queries, so every replica of one coordinator reports the same numbers.
Figures of one process (audit records accepted by its API, the ingest latency
histogram, the last full chain verification it ran) are ordinary
``prometheus_client`` metrics in a registry per app.

Other modules add their own figures with :func:`register_collector`: a function
taking the :class:`~cape_coordinator.coordinator.Coordinator` and returning metric
families, called at every scrape (an error in it is logged and counted in
``cape_metrics_collector_errors_total``, and never fails the scrape).

The endpoint is off unless protected: with ``metrics_token_sha256`` set (or the
``CAPE_COORDINATOR_METRICS_TOKEN`` environment variable) a scrape must carry
``Authorization: Bearer <metrics token>`` (a token distinct from the API's tokens,
compared in constant time); with ``metrics_bind`` set, ``/metrics`` is served only
on that separate address (see :func:`serve_metrics`) and the API's own port answers
404. See ``docs/monitoring/metrics.md``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select

from . import db
from .crypto import b64d, verify_signature
from .services.chain import anchor_message

if TYPE_CHECKING:
    from .coordinator import Coordinator

log = logging.getLogger("cape_coordinator.metrics")

METRICS_TOKEN_ENV = "CAPE_COORDINATOR_METRICS_TOKEN"  # noqa: S105 (a variable name)
RUN_STATUSES = ("running", "succeeded", "failed", "lost")
# Engine names come from pipelines' records: anything else is reported as "other", so a
# sender cannot blow up the number of series a scrape returns.
_ENGINE = re.compile(r"[a-z][a-z0-9_.-]{0,31}")
# Seconds: an audit batch is answered after its group commit (one fsync on SQLite).
INGEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

MetricSource = Callable[["Coordinator"], Iterable[Metric]]
_EXTRA: list[tuple[str, MetricSource]] = []
_EXTRA_LOCK = threading.Lock()


def register_collector(source: MetricSource, name: str | None = None) -> None:
    """Add ``source`` to every coordinator's ``/metrics``: called at each scrape with the
    coordinator, it returns (or yields) metric families, e.g. a
    ``GaugeMetricFamily("cape_audit_delivery_pending", ..., labels=["sink"])``. Registering
    the same function twice keeps one."""
    key = name or f"{source.__module__}.{getattr(source, '__qualname__', repr(source))}"
    with _EXTRA_LOCK:
        if all(k != key for k, _ in _EXTRA):
            _EXTRA.append((key, source))


def unregister_collector(source: MetricSource) -> None:
    """Remove ``source`` (tests; a module that stops providing its figures)."""
    with _EXTRA_LOCK:
        _EXTRA[:] = [(k, s) for k, s in _EXTRA if s is not source]


def _engine_label(value: str | None) -> str:
    if value is None:
        return "unknown"
    return value if _ENGINE.fullmatch(value) else "other"


class DatabaseCollector(Collector):
    """The figures kept in the database, read at scrape time (two small queries: the runs
    table grouped, the anchor and the chain's last row)."""

    def __init__(self, coordinator: Coordinator):
        self.coordinator = coordinator

    def collect(self) -> Iterator[Metric]:
        coord = self.coordinator
        cutoff = db.format_time(
            datetime.now(UTC) - timedelta(seconds=coord.settings.lost_after_seconds)
        )
        r = db.runs.c
        stale = case((r.last_seen < cutoff, 1), else_=0).label("stale")
        grouped = select(
            r.engine,
            r.label,
            r.status,
            stale,
            func.count(),
            func.coalesce(func.sum(r.rows_in), 0),
            func.coalesce(func.sum(r.rows_out), 0),
            func.coalesce(func.sum(r.rows_redacted), 0),
        ).group_by(r.engine, r.label, r.status, stale)
        with coord.engine.connect() as conn:
            rows = conn.execute(grouped).all()
            anchor_raw = conn.execute(
                select(db.settings.c.value).where(db.settings.c.name == "audit_anchor")
            ).scalar()
            last = conn.execute(
                select(db.audit.c.seq, db.audit.c.hash).order_by(db.audit.c.seq.desc()).limit(1)
            ).first()
        runs: dict[tuple[str, str, str], int] = {}
        rows_in: dict[tuple[str, str], int] = {}
        rows_out: dict[tuple[str, str], int] = {}
        redacted: dict[tuple[str, str], int] = {}
        for engine, label, status, is_stale, n, n_in, n_out, n_red in rows:
            key = (_engine_label(engine), label or "")
            if status == "running" and is_stale:
                status = "lost"
            runs[(*key, status)] = runs.get((*key, status), 0) + int(n)
            rows_in[key] = rows_in.get(key, 0) + int(n_in)
            rows_out[key] = rows_out.get(key, 0) + int(n_out)
            redacted[key] = redacted.get(key, 0) + int(n_red)
        g = GaugeMetricFamily(
            "cape_runs",
            "Runs known to the coordinator by engine, policy label and status "
            "(lost: running but silent longer than lost_after_seconds).",
            labels=["engine", "label", "status"],
        )
        for key3 in sorted({(e, lab) for e, lab, _ in runs}):
            # Every status of a known (engine, label) is reported, 0 included, so alerts
            # on a status see the series before its first run reaches it.
            for status in RUN_STATUSES:
                g.add_metric([*key3, status], runs.get((*key3, status), 0))
        yield g
        for name, doc, values in (
            ("cape_rows_processed", "Rows read by finished runs (run.completed).", rows_in),
            ("cape_rows_written", "Rows written by finished runs (run.completed).", rows_out),
            (
                "cape_rows_redacted",
                "Values redacted or dropped by finished runs (run.completed).",
                redacted,
            ),
        ):
            c = CounterMetricFamily(name, doc, labels=["engine", "label"])
            for key, value in sorted(values.items()):
                c.add_metric(list(key), value)
            yield c
        count, head_ok = _chain_head(coord, anchor_raw, last)
        yield GaugeMetricFamily(
            "cape_audit_chain_length", "Entries in the audit hash chain (signed anchor).", count
        )
        yield GaugeMetricFamily(
            "cape_audit_chain_head_ok",
            "1 if the chain's last entry matches the signed anchor and its signature "
            "verifies, else 0 (entries removed, added or edited at the end).",
            1 if head_ok else 0,
        )


def _chain_head(coord: Coordinator, anchor_raw: Any, last: Any) -> tuple[int, bool]:
    """(entries per the anchor, whether the anchor's signature verifies and names the last
    row); the full walk is ``cape audit verify`` (see ``cape_audit_chain_verify_ok``)."""
    try:
        anchor = json.loads(str(anchor_raw))
        count, last_hash = int(anchor["count"]), str(anchor["hash"])
        signed = verify_signature(
            coord.public_key, b64d(anchor["signature"]), anchor_message(count, last_hash)
        )
    except (TypeError, ValueError, KeyError):
        return 0, False
    if not signed:
        return count, False
    if last is None:
        return count, count == 0
    return count, int(last[0]) == count and str(last[1]) == last_hash


class _ExtraCollector(Collector):
    """The families of :func:`register_collector`'s sources, each isolated from the others."""

    def __init__(self, coordinator: Coordinator, errors: Counter):
        self.coordinator = coordinator
        self.errors = errors

    def collect(self) -> Iterator[Metric]:
        with _EXTRA_LOCK:
            sources = list(_EXTRA)
        for key, source in sources:
            try:
                families = list(source(self.coordinator))
            except Exception as exc:
                log.warning("metrics collector %s failed: %s", key, type(exc).__name__)
                self.errors.labels(key).inc()
                continue
            yield from families
        # After the sources, so a failure is counted in the same scrape that left it out.
        yield from self.errors.collect()


class _VerifyCollector(Collector):
    """The last full verification's outcome: absent until one has run in this process, so
    an alert on ``== 0`` does not fire on a fresh replica."""

    def __init__(self, metrics: CoordinatorMetrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        last = self.metrics.last_verify
        if last is None:
            return
        yield GaugeMetricFamily(
            "cape_audit_chain_verify_ok",
            "1 if the last full chain verification this process ran (GET /v1/audit/verify) "
            "found the chain intact, 0 if it found problems.",
            1 if last[0] else 0,
        )
        yield GaugeMetricFamily(
            "cape_audit_chain_verify_timestamp_seconds",
            "When this process last ran a full chain verification (Unix time).",
            last[1],
        )


class CoordinatorMetrics:
    """One app's registry: the database collector, the registered sources, and this
    process's own ingest figures."""

    def __init__(self, coordinator: Coordinator):
        self.coordinator = coordinator
        self.registry = CollectorRegistry(auto_describe=False)
        self.records_ingested = Counter(
            "cape_audit_records_ingested",
            "Run records accepted by this process's API (duplicates included); "
            "rate() of it is the ingest rate.",
            registry=self.registry,
        )
        self.batches_refused = Counter(
            "cape_audit_batches_refused",
            "Audit batches this process refused (bad record, wrong label or run, conflict).",
            ["code"],
            registry=self.registry,
        )
        self.ingest_seconds = Histogram(
            "cape_audit_ingest_seconds",
            "Seconds from reading a POST /v1/audit body to its commit, in this process.",
            buckets=INGEST_BUCKETS,
            registry=self.registry,
        )
        self.collector_errors = Counter(
            "cape_metrics_collector_errors",
            "Scrapes at which a registered collector failed (its figures were left out).",
            ["collector"],
            registry=None,  # collected by _ExtraCollector, after the sources it counts
        )
        self.registry.register(DatabaseCollector(coordinator))
        self.registry.register(_ExtraCollector(coordinator, self.collector_errors))
        self.registry.register(_VerifyCollector(self))
        # (intact, when) of the last full verification this process ran, if any.
        self.last_verify: tuple[bool, float] | None = None

    def observe_verify(self, intact: bool) -> None:
        """Record the outcome of a full chain verification run by this process."""
        self.last_verify = (intact, time.time())

    def render(self) -> bytes:
        """The exposition text of every metric, as a scrape returns it."""
        return generate_latest(self.registry)


CONTENT_TYPE = CONTENT_TYPE_LATEST


def metrics_token_hash(settings_hash: str | None) -> bytes | None:
    """The SHA-256 a scrape's token must hash to: from the environment variable (the token
    itself) or the ``metrics_token_sha256`` setting, or None when neither is set."""
    env = os.environ.get(METRICS_TOKEN_ENV, "")
    if env.strip():
        return hashlib.sha256(env.strip().encode("utf-8")).digest()
    if settings_hash:
        return bytes.fromhex(settings_hash)
    return None


def token_matches(header: str | None, expected: bytes) -> bool:
    """Whether an ``Authorization`` header carries the metrics token (constant time)."""
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return False
    try:
        given = hashlib.sha256(token.encode("utf-8")).digest()
    except UnicodeError:
        return False
    return hmac.compare_digest(given, expected)


def parse_bind(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (an IPv4 address or a host name) as (host, port); ValueError naming
    the problem."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or ":" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"metrics_bind must be HOST:PORT, got {value!r}")
    return host, int(port)


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds are not worth a log line each."""


def serve_metrics(
    metrics: CoordinatorMetrics, bind: str, token_hash: bytes | None
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``/metrics`` alone on ``bind`` (``HOST:PORT``) from a daemon thread; with
    ``token_hash`` a scrape needs the metrics token there too. Returns the server (call
    ``shutdown()``) and its thread."""
    host, port = parse_bind(bind)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ.get("PATH_INFO") != "/metrics" or environ.get("REQUEST_METHOD") != "GET":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        if token_hash is not None and not token_matches(
            environ.get("HTTP_AUTHORIZATION"), token_hash
        ):
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")],
            )
            return [b"send Authorization: Bearer <metrics token>\n"]
        body = metrics.render()
        start_response("200 OK", [("Content-Type", CONTENT_TYPE)])
        return [body]

    server = make_server(host, port, app, _ThreadingServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="cape-metrics", daemon=True)
    thread.start()
    return server, thread
