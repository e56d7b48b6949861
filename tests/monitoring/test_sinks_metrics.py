"""Issue 11 items 5 and 6: the audit sinks' figures on ``GET /metrics``: records pending
per sink (the backlog alert's gauge), delivered and dead-lettered records and failed
attempts, read from the database so every replica reports the same."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _sink_receivers import wait_for
from prometheus_client.parser import text_string_to_metric_families

from cape_coordinator.app import create_app
from cape_coordinator.config import Paths, Settings
from cape_coordinator.coordinator import Coordinator
from cape_coordinator.services.base import Principal

TOKEN = "metrics-scrape-token-for-sinks"
ADMIN = Principal("-", "tester", "admin")


def _scrape(http: TestClient) -> dict[tuple[str, str], float]:
    resp = http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 200, resp.text
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            if "sink" in s.labels:
                out[(s.name, s.labels["sink"])] = s.value
    return out


def test_pending_delivered_failed_and_dead_lettered_per_sink(tmp_path):
    settings = Settings.from_dict(
        {
            "metrics_token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
            "audit_sinks": [
                {"name": "file", "kind": "jsonl", "path": str(tmp_path / "a.jsonl")},
                {
                    "name": "down",
                    "kind": "webhook",
                    "url": "http://127.0.0.1:9/hook",
                    "secret": "0123456789abcdef0123",
                    "retry_base_seconds": 0.01,
                    "retry_max_seconds": 0.05,
                    "events": ["token.*"],
                },
                {
                    "name": "dead",
                    "kind": "webhook",
                    "url": "http://127.0.0.1:9/hook",
                    "secret": "0123456789abcdef0123",
                    "retry_base_seconds": 0.01,
                    "retry_max_seconds": 0.05,
                    "max_attempts": 2,
                    "dead_letter": str(tmp_path / "dead.jsonl"),
                },
            ],
        }
    )
    coord, _ = Coordinator.initialize(Paths.resolve(str(tmp_path / "c.db")), settings)
    try:
        for n in range(3):
            coord.create_token(ADMIN, name=f"t{n}", role="auditor")
        total = coord.chain.count()
        coord.delivery.failure_record_seconds = 0  # every failed attempt in the row at once
        # The lifespan starts the dispatchers.
        with TestClient(create_app(coord)) as http:
            wait_for(lambda: coord.delivery.backlog()["file"] == 0, what="file delivery")
            wait_for(lambda: coord.delivery.backlog()["dead"] == 0, what="dead-lettering")
            wait_for(lambda: coord.delivery.status()[1]["failures"] >= 2, what="failures")
            got = _scrape(http)
        assert got[("cape_audit_delivery_pending", "file")] == 0
        assert got[("cape_audit_delivered_total", "file")] == total
        assert got[("cape_audit_delivery_pending", "down")] == total  # all token.created
        assert got[("cape_audit_delivered_total", "down")] == 0
        assert got[("cape_audit_delivery_failures_total", "down")] >= 2
        assert got[("cape_audit_dead_lettered_total", "dead")] == total
        assert got[("cape_audit_delivery_pending", "dead")] == 0
    finally:
        coord.close()
