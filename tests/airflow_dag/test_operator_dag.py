"""CapeApplyOperator in a real Airflow DAG (``dag.test()``), against a real coordinator.

Runs only in Airflow's own virtualenv (``scripts/test_airflow`` builds it; Airflow's
pins cannot share ``.venv``). Each DAG runs in a subprocess with its own
``AIRFLOW_HOME`` (a SQLite metadata database migrated once for the module),
so Airflow's configuration never leaks into this process. Checked: the task
writes the output and returns the run's summary as XCom; the run's
``run.started`` names the DAG, its run and the task; a refused policy fails
the task (and the DAG run) without retries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

pytest.importorskip("airflow.sdk")

sys.path.insert(0, str(Path(__file__).parent.parent / "coordinator"))

from _coord_support import Server, new_label

HERE = Path(__file__).parent
REPO = HERE.parent.parent
AIRFLOW = Path(sys.executable).parent / "airflow"


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("airflow-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CTX_", "AIRFLOW__"))}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(HERE / "dags"),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home}/airflow.db",
        PYTHONPATH=str(REPO),
    )
    done = subprocess.run(
        [str(AIRFLOW), "db", "migrate"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("coord"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def published(server: Server) -> dict[str, str]:
    admin = server.client(server.admin_token)
    author = admin.create_token("author", "author")["token"]
    reviewer = admin.create_token("reviewer", "reviewer")["token"]
    label = new_label("dag")
    doc = {"label": label, "rules": [{"match": {"name": "ssn"}, "actions": ["drop"]}]}
    version = server.client(author).push_policy(doc)["version"]
    server.client(author).submit_policy(label, version)
    server.client(reviewer).approve_policy(label, version)
    token = admin.create_token("nightly", "pipeline", labels=[label, "unpublished"])["token"]
    return {"label": label, "token": token}


def _run_dag(
    env: dict[str, str], server: Server, token: str, label: str, tmp: Path
) -> dict[str, Any]:
    src, dst, result = tmp / "in.csv", tmp / "out.parquet", tmp / "result.json"
    pd.DataFrame({"id": [1, 2, 3], "ssn": ["1", "2", "3"]}).to_csv(src, index=False)
    run_env = dict(
        env,
        CAPE_COORDINATOR_URL=server.url,
        CAPE_TOKEN=token,
        CAPE_COORDINATOR_PUBLIC_KEY=server.public_key,
        HOME=str(tmp),
        CAPE_TEST_LABEL=label,
        CAPE_TEST_INPUT=str(src),
        CAPE_TEST_OUTPUT=str(dst),
    )
    done = subprocess.run(
        [sys.executable, str(HERE / "dags" / "cape_dag.py"), str(result)],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.exists(), done.stdout[-4000:] + done.stderr[-4000:]
    return dict(json.loads(result.read_text()), output_exists=dst.exists())


def test_operator_applies_the_policy_and_links_the_dag_run(
    airflow_env: dict[str, str], server: Server, published: dict[str, str], tmp_path: Path
) -> None:
    got = _run_dag(airflow_env, server, published["token"], published["label"], tmp_path)
    assert got["state"].endswith("success"), got
    assert got["output_exists"]
    xcom = got["xcom"]
    assert xcom["label"] == published["label"] and xcom["rows_out"] == 3
    admin = server.client(server.admin_token)
    records = admin.list_audit(run_id=xcom["run_id"])
    started = next(e["record"] for e in records if e["record"]["event"] == "run.started")
    ident = started["orchestrator"]["airflow"]
    assert ident["dag_id"] == "cape_nightly"
    assert ident["run_id"] == got["run_id"]
    assert ident["task_id"] == "tokenize"
    assert ident["try_number"] == got["try_number"]


def test_refused_policy_fails_the_task(
    airflow_env: dict[str, str], server: Server, published: dict[str, str], tmp_path: Path
) -> None:
    got = _run_dag(airflow_env, server, published["token"], "unpublished", tmp_path)
    assert got["state"].endswith("failed"), got
    assert got["task_state"].endswith("failed"), got
    assert not got["output_exists"]
