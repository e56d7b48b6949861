"""Spark standalone on loopback: a master and two workers as separate JVM processes.

The parity cases and the Spark adapter's audited-write tests run unchanged
against ``spark://127.0.0.1:PORT``: they run in a pytest subprocess whose
``tests/_spark.py`` session points at the cluster (``$CAPE_TEST_SPARK_MASTER``),
because one JVM holds one active SparkSession and this session's shared
``local[2]`` one must stay intact. The fault test SIGKILLs one worker's
executor JVM in the middle of an audited write and checks the run's counts
against the files written.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytest.importorskip("pyspark")

from launch import SparkStandalone, tail

pytestmark = [pytest.mark.spark, pytest.mark.slow]

HERE = Path(__file__).parent
REPO = HERE.parent.parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SparkStandalone]:
    c = SparkStandalone(tmp_path_factory.mktemp("spark-standalone"), workers=2)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _pytest_on(cluster: SparkStandalone, *args: str, timeout: float = 900) -> str:
    env = dict(os.environ, CAPE_TEST_SPARK_MASTER=cluster.url, SPARK_LOCAL_IP="127.0.0.1")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def _passed(summary: str) -> int:
    found = re.search(r"(\d+) passed", summary)
    return int(found.group(1)) if found else 0


def _apps_registered(cluster: SparkStandalone) -> int:
    return len(re.findall(r"Registering app ", (cluster.root / "master.log").read_text()))


def test_parity_cases_on_the_standalone_cluster(cluster: SparkStandalone) -> None:
    before = _apps_registered(cluster)
    out = _pytest_on(cluster, "tests/engines/test_parity.py", "-k", "spark", "-m", "spark")
    assert _passed(out) >= 20, out[-2000:]
    # The subprocess's session really ran on this master (one application registered).
    assert _apps_registered(cluster) == before + 1


def test_audited_writes_on_the_standalone_cluster(cluster: SparkStandalone) -> None:
    out = _pytest_on(cluster, "tests/engines/test_spark.py", "-k", "write")
    assert _passed(out) >= 4, out[-2000:]


def _run_write_driver(
    cluster: SparkStandalone, tmp: Path, rows: int, parts: int, sleep: float
) -> tuple[subprocess.Popen[str], Path, Path, Path]:
    out, audit, markers = tmp / "out", tmp / "audit.jsonl", tmp / "markers"
    markers.mkdir()
    driver = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "spark_write_driver.py"),
            cluster.url,
            str(out),
            str(audit),
            str(rows),
            str(parts),
            str(markers),
            str(sleep),
        ],
        cwd=REPO,
        env=dict(os.environ, SPARK_LOCAL_IP="127.0.0.1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return driver, out, audit, markers


def _check_written(out: Path, audit: Path, rows: int, result: dict[str, int]) -> None:
    """The audited counts equal the files: every kept row exactly once, none missing."""
    from spark_write_driver import KEY

    table = pq.read_table(out)
    ids = table.column("id").to_pylist()
    kept = [i for i in range(rows) if i % 7 != 0]
    assert len(ids) == len(set(ids)), "a row was written twice"
    assert sorted(ids) == kept
    for i, token in zip(ids[:50], table.column("name").to_pylist()[:50], strict=True):
        assert token == hmac.new(KEY, f"person-{i}".encode(), hashlib.sha256).hexdigest()
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [r["event"] for r in records] == ["run.started", "run.completed"]
    done = records[-1]
    assert (done["rows_in"], done["rows_out"]) == (rows, len(kept))
    assert done["columns"]["name"]["values"] == len(kept)
    assert (result["rows_in"], result["rows_out"]) == (rows, len(kept))


def test_an_executor_killed_mid_write_leaves_exact_counts(
    cluster: SparkStandalone, tmp_path: Path
) -> None:
    rows, parts = 14_000, 16
    driver, out, audit, markers = _run_write_driver(cluster, tmp_path, rows, parts, sleep=1.5)
    try:
        # Both executors at work and some partitions done, but not all: then kill one.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            victims = cluster.executors(0)
            if victims and cluster.executors(1) and len(list(markers.iterdir())) >= 4:
                break
            assert driver.poll() is None, driver.stderr.read()[-4000:] if driver.stderr else ""
            time.sleep(0.2)
        else:
            pytest.fail("the job never ran on both workers:\n" + tail(cluster.root / "master.log"))
        assert len(list(markers.iterdir())) < parts, "the job finished before the kill"
        os.kill(victims[0], signal.SIGKILL)
        stdout, stderr = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, stderr[-4000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    # The master saw the executor die (so the kill happened mid-job, not after it).
    assert re.search(
        r"Removing executor .* because it is (KILLED|FAILED|EXITED)|exited",
        tail(cluster.root / "master.log", 200),
    ), tail(cluster.root / "master.log")
    # Tasks were lost and rerun: more partition attempts started than partitions.
    assert len(list(markers.iterdir())) > parts
    _check_written(out, audit, rows, result)
