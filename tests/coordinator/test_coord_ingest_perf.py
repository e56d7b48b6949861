"""The audit ingest path under concurrency: group commit keeps every guarantee.

Many posters at once, replays (whole, partial, in-batch, and the same batch from two
clients at once) against a real server: the database holds each record exactly once,
the answers add up, runs count their records, and the chain verifies. In process: a
failing batch in a commit group fails alone, ``close`` commits what is queued, the
token cache honours revocation at once, and the SQLite durability setting is applied.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _coord_support import Server, fetched_records, run_cli

from cape_coordinator.config import Paths, Settings
from cape_coordinator.crypto import CoordinatorSetupError
from cape_coordinator.errors import ApiError
from cape_coordinator.store import Coordinator, Principal, _GroupWriter, _PendingBatch
from cape_pipelines.policy.models import canonical_json
from coordinator_client import AuthError

POSTERS = 8
BATCHES = 6
BATCH = 25
PIPELINE = Principal(token_id="t", name="perf-pipeline", role="pipeline", labels=("perf",))


def _records(run_id: str, n: int) -> list[dict[str, object]]:
    return fetched_records(run_id, n, "perf", "ünïcode and \u2028 kept")


def _db_counts(db: Path) -> tuple[int, int, dict[str, int]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        total, distinct = con.execute(
            "SELECT count(*), count(DISTINCT record_id) FROM audit WHERE kind = 'run'"
        ).fetchone()
        runs = dict(con.execute("SELECT run_id, records FROM runs").fetchall())
    finally:
        con.close()
    return total, distinct, runs


@pytest.fixture
def perf_server(tmp_path: Path):
    srv = Server(tmp_path / "coord")
    srv.start()
    try:
        admin = srv.client(srv.admin_token)
        pipeline = admin.create_token("perf-pipeline", "pipeline", labels=["perf"])["token"]
        auditor = admin.create_token("perf-auditor", "auditor")["token"]
        yield srv, pipeline, auditor
    finally:
        srv.stop()


def test_concurrent_posters_with_replays_store_each_record_once(perf_server):
    srv, pipeline_token, auditor_token = perf_server
    shared = _records("shared-run", BATCH)
    sent: dict[str, Counter[str]] = {}
    answers: list[tuple[str, dict[str, int]]] = []
    lock = threading.Lock()

    def poster(i: int) -> None:
        run_id = f"run-{i}"
        client = srv.client(pipeline_token)
        try:
            posted: list[list[dict[str, object]]] = []
            for b in range(BATCHES):
                batch = _records(run_id, BATCH)
                kind = "fresh"
                if b % 3 == 2:
                    # A fresh batch carrying a replayed half of an earlier one.
                    batch = batch[: BATCH // 2] + posted[-1][: BATCH - BATCH // 2]
                    kind = "overlap"
                result = client.post_audit(batch)
                posted.append(batch)
                with lock:
                    answers.append((kind, result))
                    sent.setdefault(run_id, Counter()).update(r["record_id"] for r in batch)
            # Whole replays, an in-batch repeat, and the batch every poster sends.
            replay = client.post_audit(posted[0])
            repeat = client.post_audit(posted[1][:3] + posted[1][:3])
            both = client.post_audit(shared)
            with lock:
                answers.extend([("replay", replay), ("repeat", repeat), ("shared", both)])
        finally:
            client.close()

    with ThreadPoolExecutor(POSTERS) as pool:
        list(pool.map(poster, range(POSTERS)))

    distinct_sent = {rid for c in sent.values() for rid in c} | {r["record_id"] for r in shared}
    total, distinct, runs = _db_counts(srv.db)
    assert total == distinct == len(distinct_sent)
    assert sum(a["accepted"] for _, a in answers) == len(distinct_sent)
    for kind, answer in answers:
        if kind == "replay":
            assert answer == {"accepted": 0, "duplicates": BATCH}
        elif kind == "repeat":
            assert answer == {"accepted": 0, "duplicates": 6}
        elif kind == "overlap":
            assert answer == {"accepted": BATCH // 2, "duplicates": BATCH - BATCH // 2}
        elif kind == "fresh":
            assert answer == {"accepted": BATCH, "duplicates": 0}
    # Every poster sent the shared batch; one of them stored it, the others were told so.
    shared_answers = [a for kind, a in answers if kind == "shared"]
    assert sum(a["accepted"] for a in shared_answers) == BATCH
    assert all(a["accepted"] + a["duplicates"] == BATCH for a in shared_answers)
    for run_id, counter in sent.items():
        assert runs[run_id] == len(counter)
    assert runs["shared-run"] == BATCH
    verify = srv.client(auditor_token).verify_audit()
    assert verify["intact"] is True, verify["problems"]
    assert verify["count"] >= total


def test_revoked_token_refused_at_once_despite_cache(perf_server):
    srv, _, _ = perf_server
    admin = srv.client(srv.admin_token)
    made = admin.create_token("short-lived", "pipeline", labels=["perf"])
    client = srv.client(made["token"])
    assert client.post_audit(_records("cache-run", 2)) == {"accepted": 2, "duplicates": 0}
    admin.revoke_token(made["id"])
    with pytest.raises(AuthError, match="revoked"):
        client.post_audit(_records("cache-run", 2))


@pytest.fixture
def coordinator(tmp_path: Path):
    coord, _ = Coordinator.initialize(Paths.resolve(str(tmp_path / "c.db")), Settings())
    try:
        yield coord
    finally:
        coord.close()


def test_threads_posting_in_process_keep_the_chain(coordinator):
    batches = [_records(f"r{i % 4}", 40) for i in range(24)]
    batches += [batches[0], batches[5][:10] + batches[6][:10]]
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda b: coordinator.post_audit(PIPELINE, b), batches))
    ids = {r["record_id"] for b in batches for r in b}
    assert sum(r["accepted"] for r in results) == len(ids) == 24 * 40
    assert sum(r["duplicates"] for r in results) == 40 + 20
    assert coordinator.audit_count() == len(ids) + 1  # and the token made by init
    assert coordinator.verify_audit().intact


def test_bodies_are_canonical_json_of_the_entry(coordinator):
    coordinator.post_audit(PIPELINE, _records("canon", 3))
    for row in coordinator.list_audit(run_id="canon"):
        entry = {k: row[k] for k in ("kind", "source", "received_at", "record", "sender")}
        with sqlite3.connect(coordinator.engine.url.database) as con:
            (body,) = con.execute("SELECT body FROM audit WHERE seq = ?", (row["seq"],)).fetchone()
        assert body.encode("utf-8") == canonical_json(entry)


def test_close_commits_queued_batches(tmp_path: Path):
    paths = Paths.resolve(str(tmp_path / "c.db"))
    coord, _ = Coordinator.initialize(paths, Settings())
    futures = [coord.submit_audit(PIPELINE, _records("closing", 10)) for _ in range(20)]
    coord.close()
    assert [f.result(timeout=0)["accepted"] for f in futures] == [10] * 20
    with pytest.raises(ApiError, match="shutting down"):
        coord.submit_audit(PIPELINE, _records("closing", 1))
    reopened = Coordinator.open(paths, Settings())
    try:
        assert reopened.audit_count() == 201
        assert reopened.verify_audit().intact
    finally:
        reopened.close()


class _Boom(Exception):
    pass


def test_a_failing_batch_fails_alone_in_its_group():
    entered, gate = threading.Event(), threading.Event()
    calls: list[list[int]] = []

    def commit(group):
        calls.append([b.sent for b in group])
        entered.set()
        gate.wait(10)
        if any(b.sent == 99 for b in group):
            raise _Boom("bad batch")
        return [{"accepted": b.sent, "duplicates": 0} for b in group]

    writer = _GroupWriter(commit)
    try:
        first = _PendingBatch([], [], 1)
        writer.submit(first)
        assert entered.wait(10)
        # Queued while the first commit runs, these three form the next group.
        rest = [_PendingBatch([], [], n) for n in (2, 99, 3)]
        for batch in rest:
            writer.submit(batch)
        gate.set()
        assert first.future.result(10) == {"accepted": 1, "duplicates": 0}
        assert rest[0].future.result(10) == {"accepted": 2, "duplicates": 0}
        assert rest[2].future.result(10) == {"accepted": 3, "duplicates": 0}
        with pytest.raises(_Boom, match="bad batch"):
            rest[1].future.result(10)
    finally:
        writer.stop()
    # The group rolled back as a whole, then each of its batches was retried alone.
    assert calls == [[1], [2, 99, 3], [2], [99], [3]]


@pytest.mark.parametrize(
    ("setting", "pragma"),
    [("FULL", 2), ("full", 2), ("EXTRA", 3), ("NORMAL", 1)],
)
def test_sqlite_synchronous_setting_is_applied(tmp_path: Path, setting: str, pragma: int):
    paths = Paths.resolve(str(tmp_path / "c.db"))
    Coordinator.initialize(paths, Settings())[0].close()
    coord = Coordinator.open(paths, Settings(sqlite_synchronous=setting))
    try:
        with coord.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == pragma
    finally:
        coord.close()


def test_default_durability_is_full(tmp_path: Path):
    db = tmp_path / "c.db"
    run_cli("coordinator", "init", "--db", str(db))
    config = json.loads((tmp_path / "c.db.config.json").read_text())
    assert config["sqlite_synchronous"] == "FULL"


@pytest.mark.parametrize("setting", ["OFF", "fast", ""])
def test_unknown_sqlite_synchronous_refused(tmp_path: Path, setting: str):
    paths = Paths.resolve(str(tmp_path / "c.db"))
    Coordinator.initialize(paths, Settings())[0].close()
    with pytest.raises(CoordinatorSetupError, match="sqlite_synchronous must be one of"):
        Coordinator.open(paths, Settings(sqlite_synchronous=setting))


def test_serve_keeps_the_garbage_collector_out_of_request_latency(tmp_path: Path, monkeypatch):
    """Full collections walking the start-up heap held the GIL ~110 ms each, several times a
    second under load: ``serve`` freezes what exists at start-up and collects less often."""
    import gc

    import uvicorn

    from cape_coordinator.cli import main

    db = tmp_path / "c.db"
    Coordinator.initialize(Paths.resolve(str(db)), Settings())[0].close()
    seen: dict[str, object] = {}

    def serving(app, **_kwargs):
        seen["threshold"] = gc.get_threshold()
        seen["frozen"] = gc.get_freeze_count()

    monkeypatch.setattr(uvicorn, "run", serving)
    before = gc.get_threshold()
    try:
        assert main(["coordinator", "serve", "--db", str(db), "--port", "1"]) == 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    assert seen["threshold"][0] >= 10_000
    assert seen["frozen"] > 1000
