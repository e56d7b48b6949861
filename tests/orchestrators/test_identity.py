"""The orchestrator identity a run's ``run.started`` carries (cape_pipelines.orchestrator).

Read from what a job's process can see: the Airflow task environment, the
YARN container environment, the active SparkContext, the default Dask client.
Written as an operator would check it (the fields are there, and right) and
as an attacker would try to abuse it (credentials in a master URL, control
characters that would make a coordinator refuse the whole record).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest

from cape_pipelines.audit import MemorySink
from cape_pipelines.orchestrator import clean_url, detect
from cape_pipelines.pandas import apply_policy

POLICY = {"label": "orch-id", "rules": [{"match": {"name": "x"}, "actions": ["drop"]}]}

AIRFLOW_ENV = {
    "AIRFLOW_CTX_DAG_ID": "nightly_export",
    "AIRFLOW_CTX_DAG_RUN_ID": "scheduled__2026-11-30T00:00:00+00:00",
    "AIRFLOW_CTX_TASK_ID": "tokenize",
    "AIRFLOW_CTX_TRY_NUMBER": "2",
    "AIRFLOW_CTX_LOGICAL_DATE": "2026-11-30T00:00:00+00:00",
}


@pytest.fixture(autouse=True)
def no_live_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide a SparkContext or Dask client that earlier tests in the session left running
    (the suite shares one SparkSession), except in the tests that start their own."""
    import sys

    if "pyspark" in sys.modules and "spark" not in request.fixturenames:
        from pyspark import SparkContext

        monkeypatch.setattr(SparkContext, "_active_spark_context", None)
    if "distributed" in sys.modules and "dask" not in request.node.name:
        import distributed

        def no_client() -> None:
            raise ValueError("no default client in this test")

        monkeypatch.setattr(distributed, "default_client", no_client)


@pytest.fixture
def no_orchestrator(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (*AIRFLOW_ENV, "SPARK_APPLICATION_ID", "CONTAINER_ID", "APPLICATION_WEB_PROXY_BASE"):
        monkeypatch.delenv(var, raising=False)


def test_airflow_task_environment() -> None:
    found = detect(env=AIRFLOW_ENV)
    assert found is not None
    assert found["airflow"] == {
        "dag_id": "nightly_export",
        "run_id": "scheduled__2026-11-30T00:00:00+00:00",
        "task_id": "tokenize",
        "try_number": 2,
        "logical_date": "2026-11-30T00:00:00+00:00",
    }


def test_partial_airflow_context_is_not_an_identity() -> None:
    # A DAG id without its run cannot be linked to anything: no half identity.
    assert detect(env={"AIRFLOW_CTX_DAG_ID": "d", "AIRFLOW_CTX_TRY_NUMBER": "x"}) is None


@pytest.mark.parametrize(
    "env, app_id",
    [
        # The ApplicationMaster's proxy base names the application.
        ({"APPLICATION_WEB_PROXY_BASE": "/proxy/application_1700000000000_0042"}, "0042"),
        # A container id with an epoch (container_e17_...) and without one.
        ({"CONTAINER_ID": "container_e17_1700000000000_0042_01_000001"}, "0042"),
        ({"CONTAINER_ID": "container_1700000000000_0042_01_000001"}, "0042"),
    ],
)
def test_yarn_application_from_the_container_environment(env: dict[str, str], app_id: str) -> None:
    found = detect(env=env)
    assert found == {"yarn": {"app_id": f"application_1700000000000_{app_id}"}}


def test_spark_from_the_environment_when_no_context_is_active() -> None:
    found = detect(
        env={"SPARK_APPLICATION_ID": "spark-abc", "SPARK_MASTER": "k8s://https://u:pw@api:6443"}
    )
    assert found == {"spark": {"app_id": "spark-abc", "master": "k8s://https://api:6443"}}


@pytest.mark.parametrize(
    "url, clean",
    [
        ("spark://127.0.0.1:7077", "spark://127.0.0.1:7077"),
        ("spark://admin:s3cret@master:7077", "spark://master:7077"),
        ("http://driver:4040/?token=abc#x", "http://driver:4040/"),
        ("k8s://https://user:pw@api.example:6443", "k8s://https://api.example:6443"),
        ("tcp://[::1]:8786", "tcp://[::1]:8786"),
        ("local[2]", "local[2]"),
    ],
)
def test_urls_lose_credentials_query_and_fragment(url: str, clean: str) -> None:
    assert clean_url(url) == clean


def test_control_characters_and_length_are_bounded() -> None:
    # An app name is free text chosen by whoever submits the job; a record with a
    # control character would be refused whole by the coordinator.
    env = {
        "AIRFLOW_CTX_DAG_ID": "dag\x00\x1b[31m" + "d" * 1000,
        "AIRFLOW_CTX_DAG_RUN_ID": "run\n1",
    }
    found = detect(env=env)
    assert found is not None
    assert found["airflow"]["dag_id"].startswith("dag[31m")
    assert len(found["airflow"]["dag_id"]) == 256
    assert found["airflow"]["run_id"] == "run1"


def test_switched_off() -> None:
    assert detect(env={**AIRFLOW_ENV, "CAPE_ORCHESTRATOR": "off"}) is None


def _started(records: list[dict[str, Any]]) -> dict[str, Any]:
    return next(r for r in records if r["event"] == "run.started")


def test_run_started_carries_the_identity(
    monkeypatch: pytest.MonkeyPatch, no_orchestrator: None
) -> None:
    for var, value in AIRFLOW_ENV.items():
        monkeypatch.setenv(var, value)
    sink = MemorySink()
    apply_policy(POLICY, pd.DataFrame({"x": ["a"], "y": [1]}), audit=sink)
    started = _started(sink.records)
    assert started["orchestrator"]["airflow"]["dag_id"] == "nightly_export"
    # Only run.started carries it: the other records stay as they were.
    assert all("orchestrator" not in r for r in sink.records if r is not started)


def test_no_orchestrator_no_field(no_orchestrator: None) -> None:
    sink = MemorySink()
    apply_policy(POLICY, pd.DataFrame({"x": ["a"], "y": [1]}), audit=sink)
    assert "orchestrator" not in _started(sink.records)


@pytest.mark.spark
def test_spark_session_identity(spark: Any, no_orchestrator: None) -> None:
    from cape_pipelines.spark import apply_policy as spark_apply
    from cape_pipelines.spark import collect

    sink = MemorySink()
    frame = spark.createDataFrame(pd.DataFrame({"x": ["a", "b"], "y": [1, 2]}))
    collect(spark_apply(frame, POLICY, audit=sink))
    ident = _started(sink.records)["orchestrator"]["spark"]
    sc = spark.sparkContext
    assert ident["app_id"] == sc.applicationId
    assert ident["app_name"] == sc.appName
    assert ident["master"] == sc.master


@pytest.mark.dask
def test_dask_scheduler_address(no_orchestrator: None) -> None:
    distributed = pytest.importorskip("distributed")
    with distributed.Client(
        processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None
    ) as client:
        found = detect(env={})
        assert found is not None
        assert found["dask"] == {"scheduler": client.scheduler.address}


def test_remote_run_carries_the_drivers_identity_to_workers(
    monkeypatch: pytest.MonkeyPatch, no_orchestrator: None
) -> None:
    # Beam's records are written by workers, which cannot see the driver's orchestrator:
    # the identity is read when the run is made (on the driver) and travels pickled.
    import pickle

    from cape_pipelines.seam import RemoteRun, bind

    for var, value in AIRFLOW_ENV.items():
        monkeypatch.setenv(var, value)
    sink = MemorySink()
    remote = RemoteRun(bind(POLICY, engine="beam", audit=sink), sink, "etl")
    for var in AIRFLOW_ENV:
        monkeypatch.delenv(var)
    shipped = pickle.loads(pickle.dumps(remote))
    shipped.started("run-1")
    assert shipped.sink.records[0]["orchestrator"]["airflow"]["task_id"] == "tokenize"
