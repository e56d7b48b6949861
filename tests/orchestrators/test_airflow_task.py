"""The Airflow task's behaviour, without Airflow: apply by label, refusals, the DAG-run link.

``cape_pipelines.airflow.task.apply_task`` is what ``CapeApplyOperator.execute``
runs; here it is given the context Airflow would pass (plain objects with the
same attributes) against a real coordinator (uvicorn on loopback) that polls
an Airflow stand-in. ``tests/airflow_dag`` runs the operator in a real DAG in
Airflow's own virtualenv (``scripts/test_airflow``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
from _orch_standin import airflow_dag_run, airflow_task, paged, serve
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).parent.parent / "coordinator"))

from _coord_support import Server, new_label

from cape_pipelines.airflow import TaskRefused, TaskRetryable, apply_task
from cape_pipelines.airflow.task import Coordinator, task_environment

DAG, RUN, TASK = "nightly_export", "manual__2026-11-30T03:00:00+00:00", "tokenize"


def context(try_number: int = 1) -> dict[str, Any]:
    """What Airflow passes to ``execute``: the parts the task reads."""
    return {
        "dag": SimpleNamespace(dag_id=DAG),
        "dag_run": SimpleNamespace(run_id=RUN),
        "ti": SimpleNamespace(task_id=TASK, try_number=try_number, map_index=-1, dag_id=DAG),
    }


@pytest.fixture(scope="module")
def airflow() -> Iterator[Any]:
    with serve() as af:
        af.routes["/api/v1/dags/~/dagRuns"] = paged("dag_runs", [airflow_dag_run(DAG, RUN)])
        af.routes[f"/api/v1/dags/{DAG}/dagRuns/{RUN}/taskInstances"] = paged(
            "task_instances", [airflow_task(DAG, RUN, TASK, "running")]
        )
        yield af


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, airflow: Any) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("coord-airflow"))
    config = Path(str(srv.db) + ".config.json")
    settings = json.loads(config.read_text()) if config.exists() else {}
    settings["orchestrators"] = [
        {"name": "airflow", "kind": "airflow", "url": airflow.url, "poll_seconds": 0.3}
    ]
    config.write_text(json.dumps(settings))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def published(server: Server) -> dict[str, str]:
    admin = server.client(server.admin_token)
    author = admin.create_token("af-author", "author")["token"]
    reviewer = admin.create_token("af-reviewer", "reviewer")["token"]
    label = new_label("airflow")
    doc = {"label": label, "rules": [{"match": {"name": "ssn"}, "actions": ["drop"]}]}
    version = server.client(author).push_policy(doc)["version"]
    server.client(author).submit_policy(label, version)
    server.client(reviewer).approve_policy(label, version)
    token = admin.create_token("af-pipeline", "pipeline", labels=[label, "unpublished"])["token"]
    return {"label": label, "token": token}


@pytest.fixture
def no_airflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("AIRFLOW_CTX_"):
            monkeypatch.delenv(var)


def _input(tmp_path: Path) -> Path:
    src = tmp_path / "in.csv"
    pd.DataFrame({"id": [1, 2, 3], "ssn": ["1", "2", "3"]}).to_csv(src, index=False)
    return src


def test_applies_by_label_and_links_the_run_to_the_dag_run(
    server: Server, published: dict[str, str], tmp_path: Path, no_airflow_env: None
) -> None:
    coord = Coordinator(server.url, published["token"], server.public_key, str(tmp_path / "spool"))
    out = tmp_path / "out.parquet"
    result = apply_task(
        published["label"], str(_input(tmp_path)), str(out), coordinator=coord, context=context()
    )
    assert out.exists() and result["rows_out"] == 3 and result["label"] == published["label"]
    assert list(pd.read_parquet(out).columns) == ["id"]
    # The task's environment is back as it was.
    assert not [v for v in os.environ if v.startswith("AIRFLOW_CTX_")]
    admin = server.client(server.admin_token)
    records = admin.list_audit(run_id=result["run_id"])
    started = next(e["record"] for e in records if e["record"]["event"] == "run.started")
    assert started["orchestrator"]["airflow"] == {
        "dag_id": DAG,
        "run_id": RUN,
        "task_id": TASK,
        "try_number": 1,
        "map_index": -1,
    }
    deadline = time.monotonic() + 30
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        run = next(r for r in admin.list_runs() if r["run_id"] == result["run_id"])
        if run.get("running_on"):
            break
        time.sleep(0.3)
    assert run["status"] == "succeeded"
    assert run["running_on"].startswith(f"running on Airflow task {DAG}/{RUN}/{TASK} (RUNNING")


@pytest.mark.parametrize(
    "label_of, public_key, why",
    [
        # No active version of the label.
        (lambda p: "unpublished", None, "refused"),
        # A label the token does not hold.
        (lambda p: "someone-elses", None, "refused"),
        # A coordinator whose signature does not verify against the pinned key.
        (
            lambda p: p["label"],
            Ed25519PrivateKey.generate().public_key().public_bytes_raw(),
            "refused",
        ),
    ],
)
def test_refused_policy_fails_the_task_for_good(
    server: Server,
    published: dict[str, str],
    tmp_path: Path,
    no_airflow_env: None,
    label_of: Any,
    public_key: bytes | None,
    why: str,
) -> None:
    key = public_key if public_key is not None else server.public_key
    coord = Coordinator(server.url, published["token"], key, str(tmp_path / "spool"))
    out = tmp_path / "out.parquet"
    with pytest.raises(TaskRefused, match=why):
        apply_task(
            label_of(published),
            str(_input(tmp_path)),
            str(out),
            coordinator=coord,
            context=context(),
        )
    assert not out.exists()


def test_unreachable_coordinator_may_be_retried(tmp_path: Path, no_airflow_env: None) -> None:
    key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    coord = Coordinator("http://127.0.0.1:9", "t0k3n", key, str(tmp_path / "spool"))
    with pytest.raises(TaskRetryable):
        apply_task("x", str(_input(tmp_path)), str(tmp_path / "o.parquet"), coordinator=coord)
    assert "t0k3n" not in repr(coord)


def test_task_environment_keeps_what_airflow_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "from_airflow")
    monkeypatch.delenv("AIRFLOW_CTX_DAG_RUN_ID", raising=False)
    with task_environment(context()):
        assert os.environ["AIRFLOW_CTX_DAG_ID"] == "from_airflow"
        assert os.environ["AIRFLOW_CTX_DAG_RUN_ID"] == RUN
    assert os.environ["AIRFLOW_CTX_DAG_ID"] == "from_airflow"
    assert "AIRFLOW_CTX_DAG_RUN_ID" not in os.environ
