"""Pipeline runs: a summary row per run, folded from its records, and the runs view.

The summary is derived data (the chain holds the records themselves); it is
updated in the same transaction that appends the records.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, insert, select, update

from .. import db
from .orchestrators import APP_ENDED, store_claims

_UPDATE_RUN = update(db.runs).where(db.runs.c.run_id == bindparam("key"))


def merge_run(run: dict[str, Any], rec: Mapping[str, Any], received: str) -> None:
    """Fold one run record, received at ``received``, into the run's summary row: its
    start and end are the coordinator's receipt times, the pipeline's own are kept apart."""
    run["records"] = (run["records"] or 0) + 1
    t = db.normalize_time(rec["time"])
    if run["client_started_at"] is None or t < run["client_started_at"]:
        run["client_started_at"] = t
    for col in ("engine", "engine_version", "principal"):
        if run[col] is None and isinstance(rec.get(col), str):
            run[col] = rec[col][: 64 if col != "principal" else 128]
    policy = rec.get("policy")
    if isinstance(policy, Mapping) and run["label"] is None:
        if isinstance(policy.get("label"), str):
            run["label"] = policy["label"]
        if isinstance(policy.get("version"), int):
            run["version"] = policy["version"]
    if run["started_at"] is None or received < run["started_at"]:
        run["started_at"] = received
    event = rec["event"]
    # A run the coordinator failed because its job ended may still deliver its own end
    # (a spool flushing late): the pipeline's own word wins, whichever it is.
    late = (
        event in ("run.completed", "run.failed")
        and run["status"] == "failed"
        and run["error_type"] == APP_ENDED
    )
    if late:
        run["status"], run["error_type"] = "running", None
    if event in ("run.completed", "run.failed") and run["status"] == "running":
        run["status"] = "succeeded" if event == "run.completed" else "failed"
        run["ended_at"] = received
        run["client_ended_at"] = t
        for col in ("rows_in", "rows_out", "rows_redacted"):
            if isinstance(rec.get(col), int):
                run[col] = rec[col]
        error = rec.get("error")
        if isinstance(error, Mapping) and isinstance(error.get("type"), str):
            run["error_type"] = error["type"][:128]


class RunService:
    """The runs' summary rows."""

    def __init__(self, engine: Engine, lost_after_seconds: int):
        self.engine = engine
        self.lost_after_seconds = lost_after_seconds

    @staticmethod
    def stored(conn: Connection, run_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """run id -> summary row of the runs already stored, among ``run_ids``."""
        ids = list(run_ids)
        out: dict[str, dict[str, Any]] = {}
        for i in range(0, len(ids), 500):
            rows = conn.execute(select(db.runs).where(db.runs.c.run_id.in_(ids[i : i + 500])))
            out.update((r["run_id"], dict(r)) for r in rows.mappings())
        return out

    def bindings(
        self, conn: Connection, run_ids: Iterable[str]
    ) -> dict[str, tuple[str | None, str | None]]:
        """run id -> (sending token, label) of the runs already known."""
        return {k: (r["sender"], r["label"]) for k, r in self.stored(conn, run_ids).items()}

    def fold(
        self,
        conn: Connection,
        records: Sequence[tuple[dict[str, Any], str]],
        senders: Mapping[str, str | None] | None = None,
        stored: Mapping[str, dict[str, Any]] | None = None,
    ) -> None:
        """Fold (record, received_at) pairs into the runs' summary rows; a new run (or one
        stored before senders were kept) is bound to ``senders[run_id]``. ``stored`` is
        what :meth:`stored` returned in this transaction for (at least) these runs, when
        the caller has it: the rows are then not read again."""
        by_run: dict[str, list[tuple[dict[str, Any], str]]] = {}
        for rec, stamp in records:
            by_run.setdefault(rec["run_id"], []).append((rec, stamp))
        if not by_run:
            return
        if stored is None:
            existing = self.stored(conn, by_run)
        else:
            existing = {k: dict(stored[k]) for k in by_run if k in stored}
        inserts, updates = [], []
        started: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for run_id, recs in by_run.items():
            run = existing.get(run_id)
            if run is None:
                run = {c.name: None for c in db.runs.columns}
                run.update(run_id=run_id, status="running", records=0)
                inserts.append(run)
            else:
                updates.append(run)
            for rec, stamp in recs:
                merge_run(run, rec, stamp)
            if run["sender"] is None and senders:
                run["sender"] = senders.get(run_id)
            run["last_seen"] = max(stamp for _, stamp in recs)
            started.extend((rec, run) for rec, _ in recs if rec["event"] == "run.started")
        if inserts:
            conn.execute(insert(db.runs), inserts)
        if updates:
            conn.execute(_UPDATE_RUN, [{"key": r["run_id"], **r} for r in updates])
        if started:
            # What the run says about its orchestrator, bound to its sender and label.
            store_claims(conn, started)

    def list(
        self,
        *,
        status: str | None = None,
        label: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Runs, newest activity first; ``running`` runs silent too long show as ``lost``."""
        cutoff = db.format_time(datetime.now(UTC) - timedelta(seconds=self.lost_after_seconds))
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
