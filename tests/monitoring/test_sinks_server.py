"""Issue 11 item 5 through the real server: ``cape coordinator serve`` starts the audit
sinks from ``$CAPE_COORDINATOR_AUDIT_SINKS`` with the app, records posted over HTTP reach
a signed webhook, and a coordinator restart during a receiver outage loses nothing (the
cursor lives in the database)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "coordinator"))

from _coord_support import Server
from _sink_receivers import WebhookReceiver, wait_for

from cape_pipelines.audit import MemorySink, RunContext

pytestmark = pytest.mark.coordinator

SECRET = "server-webhook-secret-0123456789"


def _run() -> list[dict[str, object]]:
    run = RunContext(
        engine="pandas",
        sink=MemorySink(),
        policy={"label": "customers", "version": 1, "sha256": "ab"},
    )
    return [run.record("run.started"), run.record("run.completed", rows_in=1, rows_out=1)]


def test_served_coordinator_delivers_and_a_restart_loses_nothing(tmp_path, monkeypatch):
    receiver = WebhookReceiver(SECRET).start()
    sinks = [
        {
            "name": "hook",
            "kind": "webhook",
            "url": receiver.url,
            "secret_env": "CAPE_TEST_HOOK_SECRET",
            "retry_base_seconds": 0.05,
            "retry_max_seconds": 0.5,
            "poll_seconds": 0.2,
        }
    ]
    monkeypatch.setenv("CAPE_COORDINATOR_AUDIT_SINKS", json.dumps(sinks))
    monkeypatch.setenv("CAPE_TEST_HOOK_SECRET", SECRET)
    server = Server(tmp_path / "coord")
    server.start()
    try:
        admin = server.client(server.admin_token)
        token = admin.create_token("job", "pipeline", labels=["customers"])["token"]
        pipeline = server.client(token, spool_dir=tmp_path / "spool")
        pipeline.post_audit(_run())
        # init's token.created, the new token's, and the run's two records.
        wait_for(lambda: len(receiver.by_seq) == 4, what="delivery from the served app")
        assert {d["event"] for d in receiver.by_seq.values()} >= {"token.created", "run.started"}

        receiver.stop()
        pipeline.post_audit(_run())
        pipeline.post_audit(_run())
        server.stop()
        receiver.start()
        server.start()
        wait_for(lambda: len(receiver.by_seq) == 8, what="delivery after both restarts")
        assert sorted(receiver.by_seq) == list(range(1, 9))
        assert receiver.rejected == []
        assert SECRET not in (server.dir / "serve.log").read_text()
    finally:
        server.stop()
        receiver.stop()
