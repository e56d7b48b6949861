"""Dask distributed on loopback: ``dask scheduler`` and two ``dask worker`` processes (CLI).

The parity cases run through ``Client(address)`` against the same
expectations as every other engine, with an audited run each; the fault test
SIGKILLs one worker process in the middle of an audited run and checks the
run completes on the other worker with counts equal to what it returned.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("distributed")

import pandas as pd
from cluster_work import slow_people
from launch import DaskCluster

sys.path.insert(0, str(Path(__file__).parent.parent / "engines"))
import runners
from cases import CASES, Case
from test_parity import CASE_PARAMS, expectation

import cape_pipelines.dask as cape_dask
from cape_pipelines.audit import MemorySink

pytestmark = [pytest.mark.dask, pytest.mark.slow]

KEY = b"cape-cluster-test-tokenizer-key1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster]:
    # The workers import the test's work functions from this directory.
    c = DaskCluster(
        tmp_path_factory.mktemp("dask-cluster"), workers=2, python_path=[str(Path(__file__).parent)]
    )
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def client(cluster: DaskCluster) -> Iterator[Any]:
    from distributed import Client

    with Client(cluster.address, set_as_default=False, timeout=30) as c:
        c.wait_for_workers(2, timeout=60)
        yield c


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_parity_case_on_the_cli_cluster(client: Any, case: Case) -> None:
    expected = runners.normalise(expectation(case.name))
    # _run_dask asserts the audited run's rows_in/rows_out against the result.
    actual = runners._run_dask(case.policy, case.input, case.keys, client)
    assert actual.schema.remove_metadata() == expected.schema.remove_metadata()
    assert actual.equals(expected)


def test_both_workers_took_part(client: Any) -> None:
    # The parity cases split each frame in three partitions; both workers hold
    # the same modules, so any case may land on either: the cluster has two.
    assert len(client.scheduler_info()["workers"]) == 2
    assert len(CASES) >= 20


def test_a_worker_killed_mid_run_leaves_exact_counts(
    cluster: DaskCluster, client: Any, tmp_path: Path
) -> None:
    import dask
    import dask.dataframe as dd

    markers = tmp_path / "markers"
    markers.mkdir()
    parts, per = 20, 500
    pieces = [
        dask.delayed(slow_people)(per, str(markers), 1.0, dask_key_name=f"people-{p}")
        for p in range(parts)
    ]
    meta = pd.DataFrame({"i": pd.Series([], dtype="int64"), "name": pd.Series([], dtype=object)})
    ddf = dd.from_delayed(pieces, meta=meta, verify_meta=False)
    policy = {
        "label": "cluster-dask",
        "rules": [
            {
                "match": {"name": "name"},
                "actions": [{"transform": {"type": "tokenizer", "key": {"secret": "tok"}}}],
            },
            {"actions": [{"transform": {"type": "row-redact", "condition": "i < 50"}}]},
        ],
    }
    sink = MemorySink()
    out = cape_dask.apply_policy(ddf, policy, keys={"tok": KEY}, audit=sink)
    victim = cluster.workers[0]
    killed = threading.Event()

    def kill_when_running() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if len(list(markers.iterdir())) >= 4:
                os.kill(victim.pid, signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_when_running, daemon=True)
    killer.start()
    try:
        result = cape_dask.compute(out, scheduler=client)
    finally:
        killer.join(timeout=130)
    assert killed.is_set() and victim.wait(timeout=10) == -signal.SIGKILL
    assert len(list(markers.iterdir())) < 2 * parts + 1
    # Exact: every partition once, whatever was lost with the dead worker was recomputed.
    kept = parts * (per - 50)
    assert len(result) == kept
    records = sink.records
    assert [r["event"] for r in records] == ["run.started", "run.completed"]
    done = records[-1]
    assert (done["rows_in"], done["rows_out"]) == (parts * per, kept)
    assert done["columns"]["name"]["values"] == kept
    first = result.iloc[0]
    assert first["name"] == hmac.new(KEY, f"p{first['i']}".encode(), hashlib.sha256).hexdigest()
    assert len(client.scheduler_info()["workers"]) == 1
