"""A real Spark standalone application linked to its run, and failed with it when killed.

One master and one worker started from the pyspark package on loopback
(``tests/clusters/launch.py``) for the whole module. Each test submits a real
application (``spark_app_driver.py``, its own JVM) whose ``run.started``
carries the application's id and master URL; the test hands the records to
an in-process coordinator as the pipeline's token would, and the
coordinator's poller reads the master's ``/json/``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

pytest.importorskip("pyspark")

sys.path.insert(0, str(Path(__file__).parent.parent / "clusters"))

from launch import SparkStandalone, free_port, tail

from cape_coordinator.coordinator import Coordinator
from cape_coordinator.services.base import Principal

pytestmark = [pytest.mark.spark, pytest.mark.slow]

HERE = Path(__file__).parent
REPO = HERE.parent.parent
PIPELINE = Principal("tok-link", "etl", "pipeline", ("orch-link",))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SparkStandalone]:
    c = SparkStandalone(tmp_path_factory.mktemp("spark-orch"), workers=1, worker_memory="768m")
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _driver(
    cluster: SparkStandalone, audit: Path, sleep: float, log: Path, ui_port: int
) -> subprocess.Popen[bytes]:
    env = dict(cluster.env(), PYTHONPATH=str(REPO))
    for var in ("AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_DAG_RUN_ID", "SPARK_APPLICATION_ID"):
        env.pop(var, None)
    return subprocess.Popen(
        [
            sys.executable,
            str(HERE / "spark_app_driver.py"),
            cluster.url,
            str(audit),
            str(sleep),
            str(ui_port),
        ],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _records(audit: Path) -> list[dict[str, Any]]:
    if not audit.exists():
        return []
    return [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]


def _wait(what: str, check: Any, timeout: float, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"{what} not seen in {timeout}s:\n{tail(log)}")


def test_master_json_has_the_shape_the_poller_reads(cluster: SparkStandalone) -> None:
    data = requests.get(cluster.webui_url + "/json/", timeout=10).json()
    assert data["url"] == cluster.url
    assert {"activeapps", "completedapps", "status"} <= set(data)


def test_application_linked_then_killed_fails_its_run(
    cluster: SparkStandalone, make_coord: Any, tmp_path: Path
) -> None:
    ui_port = free_port()
    coord: Coordinator = make_coord(
        {
            "name": "standalone",
            "kind": "spark-standalone",
            "url": cluster.webui_url,
            "grace_seconds": 0,
            "labels": ["orch-link"],
        },
        # The driver's own UI: its /api/v1 says how many executors the application has.
        {
            "name": "driver",
            "kind": "spark-driver",
            "url": f"http://127.0.0.1:{ui_port}",
            "grace_seconds": 0,
            "timeout_seconds": 2,
        },
    )
    audit, log = tmp_path / "audit.jsonl", tmp_path / "driver.log"
    driver = _driver(cluster, audit, sleep=600, log=log, ui_port=ui_port)
    try:
        started = _wait(
            "run.started",
            lambda: [r for r in _records(audit) if r["event"] == "run.started"],
            timeout=180,
            log=log,
        )[0]
        ident = started["orchestrator"]["spark"]
        assert ident["master"] == cluster.url
        assert ident["app_id"].startswith("app-")
        assert ident["app_name"] == "cape-orchestrator-link"
        coord.post_audit(PIPELINE, _records(audit))

        def linked() -> dict[str, Any] | None:
            coord.orchestrators.poll()
            run = coord.orchestrators.attach(coord.runs.list())[0]
            by = {o["endpoint"]: o for o in run["orchestrator"]}
            ready = (
                by.get("standalone", {}).get("state") == "RUNNING"
                and by.get("driver", {}).get("executors") == 1
            )
            return run if ready else None

        run = _wait("the running application", linked, timeout=90, log=log)
        assert run["run_id"] == started["run_id"]
        assert run["status"] == "running"
        assert run["running_on"].startswith(f"running on Spark app {ident['app_id']} (RUNNING")
        assert "1 core" in run["running_on"]
        on_driver = next(o for o in run["orchestrator"] if o["endpoint"] == "driver")
        assert on_driver["app_id"] == ident["app_id"]
        assert on_driver["summary"].endswith("1 executor)")
    finally:
        # The application dies before run.completed: the driver is killed mid-stage.
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(60)

    def failed() -> dict[str, Any] | None:
        coord.orchestrators.poll()
        run = coord.orchestrators.attach(coord.runs.list())[0]
        return run if run["status"] == "failed" else None

    run = _wait("the run failing", failed, timeout=120, log=log)
    assert run["error_type"] == "orchestrator_app_ended"
    by = {o["endpoint"]: o for o in run["orchestrator"]}
    assert by["standalone"]["state"] in ("FINISHED", "FAILED", "KILLED")
    # A driver that is gone is unreachable, not ended: it only records an error.
    assert by["driver"]["state"] == "RUNNING"
    assert "ConnectionError" in (coord.orchestrators.status["driver"].last_error or "")
    events = [e["record"]["event"] for e in coord.list_audit(run_id=run["run_id"])]
    assert events == ["run.started", "run.failed"]
    assert coord.verify_audit().intact
