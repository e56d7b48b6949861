"""Console sessions under concurrent writes: a page load must not fail because ingest (or
the orchestrator poller) committed between its session read and its session update.

On SQLite a transaction begun deferred that reads and then writes cannot take the
write lock once another connection has committed since its read (SQLITE_BUSY
without waiting); the console's session update used such a transaction, so under
ingest load a signed-in page could answer 500 ("database is locked").
"""

from __future__ import annotations

import threading
from pathlib import Path

from _console_support import make_coord

from cape_coordinator.console.sessions import SessionStore
from cape_pipelines.audit import MemorySink, RunContext


def test_session_loads_while_runs_are_ingested(tmp_path: Path) -> None:
    cc = make_coord(tmp_path)
    try:
        sessions = SessionStore(cc.coord, idle_seconds=600, absolute_seconds=3600)
        sid = sessions.create(cc.principals["admin"])
        pipe = cc.principals["pipeline"]
        stop = threading.Event()
        errors: list[BaseException] = []

        def ingest() -> None:
            try:
                while not stop.is_set():
                    ctx = RunContext(engine="pandas", sink=MemorySink())
                    ctx.set_policy("customers", 1, "ab")
                    cc.coord.post_audit(pipe, [ctx.record("run.started")])
            except BaseException as exc:
                errors.append(exc)

        writer = threading.Thread(target=ingest)
        writer.start()
        try:
            for _ in range(300):
                sessions.load(sid)
        finally:
            stop.set()
            writer.join()
        assert errors == []
    finally:
        cc.coord.close()
