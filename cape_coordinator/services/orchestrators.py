"""Orchestrator links: which Spark, YARN or Airflow job each run is, and runs whose job ended.

A run's ``run.started`` may carry the identity of the job that runs it
(:mod:`cape_pipelines.orchestrator`). When the record is stored, that identity
becomes the run's *claims* (``run_claims``), bound to the run's sending token
and label. The coordinator polls the orchestrators an operator configured
(``orchestrators`` in the settings; one :class:`~.orchestrator_apis.Endpoint`
each; reading them is :mod:`.orchestrator_apis`). Each poll stores the
applications it sees (``orchestrator_apps``) and links each to the runs that
claim it (``run_links``), so the runs view can say "running on Spark app X
(RUNNING, 2m 03s, 2 executors)".

What links a run to an application is decided here, not by the pipeline: the
application id the *orchestrator* reports must equal the run's claim exactly;
for Spark the master URL the cluster reports must equal the one the driver
saw (standalone app ids are timestamps, so two clusters can hand out the same
one); an endpoint configured with ``labels`` links only runs of those labels.
So a pipeline can only ever link (and get failed) its own runs, and an
application on another cluster cannot end a run it does not run.

An application that ended (FINISHED, FAILED, KILLED; Airflow: success,
failed, upstream_failed, skipped, removed) while a linked run is still
``running`` turns the run ``failed`` once the endpoint's ``grace_seconds``
have passed since the poller first saw it ended (a driver's spool may still
be delivering ``run.completed``): one transaction updates the run and appends
a coordinator ``run.failed`` record with reason ``orchestrator_app_ended`` to
the chain. A ``run.completed`` that arrives later still counts (see
:func:`~.runs.merge_run`).

The poller is one daemon thread started with the app (bounded timeouts and
response sizes; an unreachable endpoint, a 401, garbage or a timeout is
recorded as that endpoint's last error and never stops the others). On
PostgreSQL only one replica polls at a time (a session advisory lock taken
per cycle, skipped when another replica holds it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    String,
    Table,
    and_,
    bindparam,
    func,
    insert,
    select,
    text,
    update,
)

from .. import db
from .base import Principal
from .chain import AuditChain
from .orchestrator_apis import (
    MAX_APPS,
    App,
    Endpoint,
    Http,
    PollError,
    _int,
    _text,
    airflow_app_id,
    poll_airflow,
    poll_spark_driver,
    poll_spark_standalone,
    poll_yarn,
)

log = logging.getLogger("cape_coordinator.orchestrators")

apps = Table(
    "orchestrator_apps",
    db.metadata,
    Column("endpoint", String(128), primary_key=True),
    Column("app_id", String(256), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("cluster", String(256)),
    Column("name", String(256)),
    Column("state", String(32), nullable=False),
    Column("ended", Boolean, nullable=False),
    Column("final_status", String(32)),
    Column("user", String(128)),
    Column("started_at", String(32)),
    Column("ended_at", String(32)),
    Column("duration_ms", BigInteger),
    Column("executors", Integer),
    Column("cores", Integer),
    Column("try_number", Integer),
    Column("first_seen", String(32), nullable=False),
    Column("last_seen", String(32), nullable=False),
    # When a poll first saw the application ended (the grace period counts from here).
    Column("ended_seen", String(32)),
)

claims = Table(
    "run_claims",
    db.metadata,
    Column("run_id", String(128), primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("app_id", String(256), nullable=False),
    Column("cluster", String(256)),
    Column("try_number", Integer),
    Column("label", String(128)),
    Column("sender", String(32)),
    Index("ix_run_claims_app", "kind", "app_id"),
)

links = Table(
    "run_links",
    db.metadata,
    Column("run_id", String(128), primary_key=True),
    Column("endpoint", String(128), primary_key=True),
    Column("app_id", String(256), nullable=False),
    Column("linked_at", String(32), nullable=False),
    Index("ix_run_links_app", "endpoint", "app_id"),
)

APP_ENDED = "orchestrator_app_ended"
# Which claim of a run each endpoint kind can match.
CLAIM_KIND = {
    "spark-standalone": "spark",
    "spark-driver": "spark",
    "yarn": "yarn",
    "airflow": "airflow",
}
_SYSTEM = Principal(token_id="-", name="coordinator:orchestrators", role="coordinator")  # noqa: S106
# Names the poll lock on PostgreSQL (any constant; the migration lock uses another).
_PG_POLL_LOCK = 0x43415046


@dataclass
class EndpointStatus:
    """What the last poll of one endpoint did (shown by ``GET /v1/orchestrators``)."""

    last_poll: str | None = None
    last_ok: str | None = None
    last_error: str | None = None
    apps: int = 0
    # Runs linked to this endpoint's applications, in all.
    linked: int = 0
    failed_runs: int = 0


# ---- claims: what a run says about its orchestrator --------------------------------------


def run_claims(rec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The claims in one ``run.started`` record's ``orchestrator`` object (none if absent
    or malformed: identity is optional and never makes a record unstorable)."""
    ident = rec.get("orchestrator")
    if rec.get("event") != "run.started" or not isinstance(ident, Mapping):
        return []
    out = []
    spark = ident.get("spark")
    if isinstance(spark, Mapping) and _text(spark.get("app_id")):
        out.append(
            {
                "kind": "spark",
                "app_id": spark["app_id"][:256],
                "cluster": _text(spark.get("master")),
            }
        )
    yarn = ident.get("yarn")
    if isinstance(yarn, Mapping) and _text(yarn.get("app_id")):
        out.append({"kind": "yarn", "app_id": yarn["app_id"][:256], "cluster": None})
    air = ident.get("airflow")
    if isinstance(air, Mapping):
        dag, run, task = (_text(air.get(k)) for k in ("dag_id", "run_id", "task_id"))
        if dag and run and task:
            out.append(
                {
                    "kind": "airflow",
                    "app_id": airflow_app_id(dag, run, task, _int(air.get("map_index")))[:256],
                    "cluster": None,
                    "try_number": _int(air.get("try_number")),
                }
            )
    return out


def store_claims(
    conn: Connection, started: Sequence[tuple[Mapping[str, Any], dict[str, Any]]]
) -> None:
    """Store the claims of (``run.started`` record, run summary row) pairs; a run's first
    claim of each kind stands (a later record cannot re-point the run)."""
    rows = []
    for rec, run in started:
        for claim in run_claims(rec):
            rows.append(
                {
                    "run_id": run["run_id"],
                    "try_number": None,
                    **claim,
                    "label": run.get("label"),
                    "sender": run.get("sender"),
                }
            )
    if not rows:
        return
    have = {
        (r[0], r[1])
        for r in conn.execute(
            select(claims.c.run_id, claims.c.kind).where(
                claims.c.run_id.in_({r["run_id"] for r in rows})
            )
        )
    }
    fresh: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["run_id"], row["kind"])
        if key not in have and key not in fresh:
            fresh[key] = row
    if fresh:
        conn.execute(insert(claims), list(fresh.values()))


# ---- the service -------------------------------------------------------------------------


POLLERS: dict[str, Callable[..., list[App]]] = {
    "spark-standalone": poll_spark_standalone,
    "spark-driver": poll_spark_driver,
    "yarn": poll_yarn,
}


def _describe(kind: str) -> str:
    return {"yarn": "YARN app", "airflow": "Airflow task"}.get(kind, "Spark app")


def _duration(ms: int | None) -> str | None:
    if ms is None or ms < 0:
        return None
    seconds = ms // 1000
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


@dataclass
class OrchestratorService:
    """Polls the configured endpoints, stores applications, links runs, fails ended ones."""

    engine: Engine
    chain: AuditChain
    endpoints: list[Endpoint]
    status: dict[str, EndpointStatus] = field(default_factory=dict)
    session_factory: Callable[[], requests.Session] = requests.Session

    def __post_init__(self) -> None:
        self.status = {ep.name: EndpointStatus() for ep in self.endpoints}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._due = {ep.name: 0.0 for ep in self.endpoints}

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction that takes SQLite's write lock at BEGIN (``BEGIN IMMEDIATE``):
        a read-then-write transaction begun deferred could not upgrade once ingest had
        committed in between, and would fail instead of waiting its turn."""
        with self.engine.connect() as conn:
            conn.execution_options(cape_write=True)
            with conn.begin():
                yield conn

    # ---- the background thread ---------------------------------------------------------

    def start(self) -> None:
        """Start the poller thread (a no-op with no endpoints configured)."""
        if not self.endpoints or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="cape-orchestrators", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the poller thread (waits for the poll in progress, bounded by its timeouts)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            due = [ep for ep in self.endpoints if self._due[ep.name] <= now]
            if due:
                try:
                    self.poll(due)
                except Exception as exc:  # the database went away: try again next round
                    log.error("orchestrator poll failed: %s", type(exc).__name__)
                for ep in due:
                    self._due[ep.name] = time.monotonic() + ep.poll_seconds
            wait = min(self._due.values()) - time.monotonic()
            self._stop.wait(max(0.05, min(wait, 5.0)))

    # ---- one poll ----------------------------------------------------------------------

    def poll(self, endpoints: Sequence[Endpoint] | None = None) -> dict[str, EndpointStatus]:
        """Poll ``endpoints`` (all by default) once; returns their status. On PostgreSQL a
        poll another replica is doing is skipped."""
        chosen = list(self.endpoints if endpoints is None else endpoints)
        if self.engine.dialect.name != "postgresql":
            for ep in chosen:
                self._poll_one(ep)
            return {ep.name: self.status[ep.name] for ep in chosen}
        with self.engine.connect() as lock_conn:
            got = lock_conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _PG_POLL_LOCK})
            if not got.scalar():
                lock_conn.rollback()
                return {ep.name: self.status[ep.name] for ep in chosen}
            try:
                for ep in chosen:
                    self._poll_one(ep)
            finally:
                lock_conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_POLL_LOCK})
                lock_conn.commit()
        return {ep.name: self.status[ep.name] for ep in chosen}

    def _poll_one(self, ep: Endpoint) -> None:
        st = self.status.setdefault(ep.name, EndpointStatus())
        st.last_poll = db.now()
        session = self.session_factory()
        try:
            http = Http(ep, session)
            if ep.kind == "airflow":
                found = poll_airflow(http, self._wanted_dag_runs(ep))
            else:
                found = POLLERS[ep.kind](http)
        except PollError as exc:
            st.last_error = f"{ep.name}: {exc}"
            log.warning("orchestrator %s", st.last_error)
            return
        finally:
            session.close()
        found = found[:MAX_APPS]
        try:
            self._store(ep, found)
            st.apps = len(found)
            self._link(ep, found)
            st.linked = self._linked_runs(ep)
            st.failed_runs += self._fail_ended(ep)
        except Exception as exc:  # the database: this endpoint again next round, others now
            st.last_error = f"{ep.name}: storing what was read failed ({type(exc).__name__})"
            log.error("orchestrator %s", st.last_error)
            return
        st.last_ok = st.last_poll
        st.last_error = None

    def _wanted_dag_runs(self, ep: Endpoint) -> set[tuple[str, str]]:
        """(dag_id, run_id) of the Airflow task instances claimed by runs still running or
        not linked here yet (a run that finished before the first poll is shown too)."""
        linked_here = select(links.c.run_id).where(links.c.endpoint == ep.name)
        stmt = (
            select(claims.c.app_id)
            .join(db.runs, db.runs.c.run_id == claims.c.run_id)
            .where(
                claims.c.kind == "airflow",
                (db.runs.c.status == "running") | claims.c.run_id.not_in(linked_here),
            )
        )
        with self.engine.connect() as conn:
            ids = [r[0] for r in conn.execute(stmt)]
        out = set()
        for app_id in ids:
            parts = app_id.split("/")
            if len(parts) >= 3:
                # dag ids cannot hold '/', task ids neither; a run id may.
                out.add((parts[0], "/".join(parts[1:-1])))
        return out

    def _store(self, ep: Endpoint, found: Sequence[App]) -> None:
        stamp = db.now()
        with self._write() as conn:
            existing: dict[str, str | None] = {}
            ids = [a.app_id for a in found]
            for i in range(0, len(ids), 500):
                rows = conn.execute(
                    select(apps.c.app_id, apps.c.ended_seen).where(
                        apps.c.endpoint == ep.name, apps.c.app_id.in_(ids[i : i + 500])
                    )
                )
                existing.update((r[0], r[1]) for r in rows)
            inserts, updates = [], []
            for app in found:
                row = {
                    "kind": ep.kind,
                    "cluster": app.cluster,
                    "name": app.name,
                    "state": app.state,
                    "ended": app.ended,
                    "final_status": app.final_status,
                    "user": app.user,
                    "started_at": app.started_at,
                    "ended_at": app.ended_at,
                    "duration_ms": app.duration_ms,
                    "executors": app.executors,
                    "cores": app.cores,
                    "try_number": app.try_number,
                    "last_seen": stamp,
                }
                if app.app_id in existing:
                    seen = existing[app.app_id]
                    row["ended_seen"] = (seen or stamp) if app.ended else None
                    updates.append({"k_endpoint": ep.name, "k_app": app.app_id, **row})
                else:
                    row.update(
                        endpoint=ep.name,
                        app_id=app.app_id,
                        first_seen=stamp,
                        ended_seen=stamp if app.ended else None,
                    )
                    inserts.append(row)
            if inserts:
                conn.execute(insert(apps), inserts)
            if updates:
                conn.execute(
                    update(apps).where(
                        and_(
                            apps.c.endpoint == bindparam("k_endpoint"),
                            apps.c.app_id == bindparam("k_app"),
                        )
                    ),
                    updates,
                )

    def _matches(self, ep: Endpoint, app: App, claim: Mapping[str, Any]) -> bool:
        """Whether ``claim`` (a run's) names ``app`` of ``ep``: same id (checked by the
        query), same cluster where the orchestrator reports one, an allowed label."""
        if ep.labels and claim["label"] not in ep.labels:
            return False
        if ep.kind == "spark-standalone":
            return app.cluster is not None and claim["cluster"] == app.cluster
        if ep.kind == "spark-driver" and app.cluster and claim["cluster"]:
            return bool(claim["cluster"] == app.cluster)
        return True

    def _link(self, ep: Endpoint, found: Sequence[App]) -> int:
        by_id = {a.app_id: a for a in found}
        kind = CLAIM_KIND[ep.kind]
        stamp = db.now()
        new = []
        with self._write() as conn:
            ids = list(by_id)
            for i in range(0, len(ids), 500):
                rows = conn.execute(
                    select(claims).where(
                        claims.c.kind == kind, claims.c.app_id.in_(ids[i : i + 500])
                    )
                ).mappings()
                candidates = [dict(r) for r in rows]
                if not candidates:
                    continue
                linked = {
                    r[0]
                    for r in conn.execute(
                        select(links.c.run_id).where(
                            links.c.endpoint == ep.name,
                            links.c.run_id.in_([c["run_id"] for c in candidates]),
                        )
                    )
                }
                for claim in candidates:
                    app = by_id[claim["app_id"]]
                    if claim["run_id"] in linked or not self._matches(ep, app, claim):
                        continue
                    linked.add(claim["run_id"])
                    new.append(
                        {
                            "run_id": claim["run_id"],
                            "endpoint": ep.name,
                            "app_id": app.app_id,
                            "linked_at": stamp,
                        }
                    )
            if new:
                conn.execute(insert(links), new)
        return len(new)

    def _linked_runs(self, ep: Endpoint) -> int:
        """How many runs are linked to applications of ``ep`` (in all)."""
        with self.engine.connect() as conn:
            stmt = select(func.count()).select_from(links).where(links.c.endpoint == ep.name)
            return int(conn.execute(stmt).scalar_one())

    def _fail_ended(self, ep: Endpoint) -> int:
        """Fail the running runs linked to applications of ``ep`` that ended more than the
        grace period ago; returns how many."""
        cutoff = db.format_time(datetime.now(UTC) - timedelta(seconds=ep.grace_seconds))
        stmt = (
            select(links.c.run_id, apps)
            .join(
                apps,
                and_(apps.c.endpoint == links.c.endpoint, apps.c.app_id == links.c.app_id),
            )
            .join(db.runs, db.runs.c.run_id == links.c.run_id)
            .where(
                links.c.endpoint == ep.name,
                apps.c.ended.is_(True),
                apps.c.ended_seen <= cutoff,
                db.runs.c.status == "running",
            )
        )
        with self.engine.connect() as conn:
            due = [dict(r) for r in conn.execute(stmt).mappings()]
        failed = 0
        for row in due:
            if self._fail(row["run_id"], ep, row):
                failed += 1
        return failed

    def _fail(self, run_id: str, ep: Endpoint, app: Mapping[str, Any]) -> bool:
        with self.chain.write() as (conn, appended):
            run = conn.execute(
                select(db.runs.c.status, db.runs.c.label).where(db.runs.c.run_id == run_id)
            ).first()
            # Re-checked inside the chain's write transaction: a run.completed committed
            # since the query above wins.
            if run is None or run[0] != "running":
                return False
            stamp = db.now()
            conn.execute(
                update(db.runs)
                .where(db.runs.c.run_id == run_id, db.runs.c.status == "running")
                .values(status="failed", ended_at=stamp, error_type=APP_ENDED)
            )
            self.chain.record(
                conn,
                appended,
                _SYSTEM,
                "run.failed",
                label=run[1],
                run_id=run_id,
                reason=APP_ENDED,
                error={
                    "type": APP_ENDED,
                    "message": (
                        f"{_describe(ep.kind)} {app['app_id']} on {ep.name} ended"
                        f" ({app['state']}) without run.completed"
                    ),
                },
                orchestrator={
                    "endpoint": ep.name,
                    "kind": ep.kind,
                    "app_id": app["app_id"],
                    "state": app["state"],
                    "final_status": app["final_status"],
                    "ended_at": app["ended_at"],
                    "ended_seen": app["ended_seen"],
                },
            )
        log.info("run %s failed: %s %s ended", run_id, ep.name, app["app_id"])
        return True

    # ---- reading -----------------------------------------------------------------------

    def attach(self, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Add ``orchestrator`` (linked applications) and ``running_on`` (one line) to each
        run summary of ``runs``, in place; returns ``runs``."""
        ids = [r["run_id"] for r in runs]
        found: dict[str, list[dict[str, Any]]] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(ids), 500):
                stmt = (
                    select(links.c.run_id, apps)
                    .join(
                        apps,
                        and_(apps.c.endpoint == links.c.endpoint, apps.c.app_id == links.c.app_id),
                    )
                    .where(links.c.run_id.in_(ids[i : i + 500]))
                    .order_by(links.c.linked_at)
                )
                for row in conn.execute(stmt).mappings():
                    found.setdefault(row["run_id"], []).append(self._app_view(dict(row)))
        for run in runs:
            linked = found.get(run["run_id"], [])
            run["orchestrator"] = linked
            run["running_on"] = linked[0]["summary"] if linked else None
        return runs

    def _app_view(self, row: Mapping[str, Any]) -> dict[str, Any]:
        duration = row["duration_ms"]
        if duration is None and row["started_at"]:
            end = row["ended_at"] or (None if row["ended"] else db.now())
            if end:
                delta = db.parse_time(end) - db.parse_time(row["started_at"])
                duration = max(0, int(delta.total_seconds() * 1000))
        parts = [row["state"]]
        if _duration(duration):
            parts.append(str(_duration(duration)))
        if row["executors"] is not None:
            parts.append(f"{row['executors']} executor{'s' if row['executors'] != 1 else ''}")
        elif row["cores"] is not None:
            parts.append(f"{row['cores']} core{'s' if row['cores'] != 1 else ''}")
        verb = "ran on" if row["ended"] else "running on"
        summary = f"{verb} {_describe(row['kind'])} {row['app_id']} ({', '.join(parts)})"
        return {
            "endpoint": row["endpoint"],
            "kind": row["kind"],
            "app_id": row["app_id"],
            "name": row["name"],
            "state": row["state"],
            "ended": bool(row["ended"]),
            "final_status": row["final_status"],
            "started_at": row["started_at"],
            "ended_at": row["ended_at"],
            "duration_ms": duration,
            "executors": row["executors"],
            "cores": row["cores"],
            "summary": summary,
        }

    def endpoints_view(self) -> list[dict[str, Any]]:
        """Each configured endpoint (never its auth) with its last poll's outcome."""
        out = []
        for ep in self.endpoints:
            st = self.status.get(ep.name, EndpointStatus())
            out.append(
                {
                    "name": ep.name,
                    "kind": ep.kind,
                    "url": ep.url,
                    "poll_seconds": ep.poll_seconds,
                    "labels": list(ep.labels),
                    "last_poll": st.last_poll,
                    "last_ok": st.last_ok,
                    "last_error": st.last_error,
                    "apps": st.apps,
                    "linked": st.linked,
                    "failed_runs": st.failed_runs,
                }
            )
        return out
