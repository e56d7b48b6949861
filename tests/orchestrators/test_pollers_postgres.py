"""The pollers on PostgreSQL: the same queries, and one replica polling at a time.

A throwaway cluster (``tests/coordinator/_postgres.py``); skipped visibly
without the binaries, a failure in CI.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _orch_standin import serve, yarn_app
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).parent.parent / "coordinator"))

from _postgres import Cluster, pg_bin_dir, unavailable

from cape_coordinator.config import Paths, Settings
from cape_coordinator.coordinator import Coordinator
from cape_coordinator.services.base import Principal
from cape_coordinator.services.orchestrators import _PG_POLL_LOCK
from cape_pipelines.audit import MemorySink, RunContext

YARN_ID = "application_1700000000000_0003"
PIPE = Principal("tok-pg", "etl", "pipeline", ("customers",))


@pytest.fixture(scope="module")
def pg() -> Iterator[Cluster]:
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        unavailable("initdb/pg_ctl not found (apt-get install postgresql)")
    cluster = Cluster(bin_dir)  # type: ignore[arg-type]
    try:
        cluster.start()
    except RuntimeError as exc:
        cluster.stop()
        unavailable(str(exc))
    try:
        yield cluster
    finally:
        cluster.stop()


def _coord(pg: Cluster, tmp_path: Path, url: str) -> Coordinator:
    paths = Paths.resolve(pg.new_database(), str(tmp_path / "k"), str(tmp_path / "c.json"))
    endpoint: dict[str, Any] = {"name": "rm", "kind": "yarn", "url": url, "grace_seconds": 0}
    coord, _ = Coordinator.initialize(paths, Settings(orchestrators=[endpoint]))
    return coord


def test_killed_application_fails_the_run_on_postgresql(pg: Cluster, tmp_path: Path) -> None:
    with serve() as rm:
        rm.route("/ws/v1/cluster/apps", {"apps": {"app": [yarn_app(YARN_ID, "RUNNING")]}})
        coord = _coord(pg, tmp_path, rm.url)
        try:
            ctx = RunContext(engine="spark", sink=MemorySink())
            ctx.set_policy("customers", 1, "ab")
            coord.post_audit(
                PIPE, [ctx.record("run.started", orchestrator={"yarn": {"app_id": YARN_ID}})]
            )
            assert coord.orchestrators.poll()["rm"].linked == 1
            rm.route(
                "/ws/v1/cluster/apps", {"apps": {"app": [yarn_app(YARN_ID, "KILLED", "KILLED")]}}
            )
            assert coord.orchestrators.poll()["rm"].failed_runs == 1
            run = coord.orchestrators.attach(coord.runs.list())[0]
            assert run["status"] == "failed" and run["error_type"] == "orchestrator_app_ended"
            assert coord.verify_audit().intact
        finally:
            coord.close()


def test_one_replica_polls_at_a_time(pg: Cluster, tmp_path: Path) -> None:
    with serve() as rm:
        rm.route("/ws/v1/cluster/apps", {"apps": None})
        coord = _coord(pg, tmp_path, rm.url)
        try:
            # Another replica is polling: it holds the poll lock on its own connection.
            with coord.engine.connect() as other:
                other.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_POLL_LOCK})
                coord.orchestrators.poll()
                assert rm.requests == []
                other.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_POLL_LOCK})
                other.commit()
            coord.orchestrators.poll()
            assert len(rm.requests) == 1
        finally:
            coord.close()
