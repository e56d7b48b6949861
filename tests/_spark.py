"""One cached local SparkSession for the whole test session (Spark starts slowly).

Every Spark test, runner and example check calls :func:`get_spark` (or the
``spark`` fixture in ``tests/conftest.py``, which delegates here), so a pytest
run starts one JVM at most; it is stopped when the interpreter exits.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any

_SESSION: Any = None


# A subprocess of the cluster tests (tests/clusters) sets this to a standalone
# master's URL, so the same test code runs against real executors; every other
# run uses local[2].
MASTER_ENV = "CAPE_TEST_SPARK_MASTER"


def get_spark() -> Any:
    """The shared SparkSession (``local[2]``, or the cluster in ``$CAPE_TEST_SPARK_MASTER``).

    UTC, UI off, few shuffle partitions, Arrow on.
    """
    global _SESSION
    if _SESSION is not None:
        return _SESSION
    from pyspark.sql import SparkSession

    # Workers must run the same interpreter as the driver (the venv's Python).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    master = os.environ.get(MASTER_ENV) or "local[2]"
    builder = SparkSession.builder.master(master)
    if master.startswith("spark://"):
        # Loopback only, small executors: the machine is shared.
        builder = (
            builder.config("spark.driver.host", "127.0.0.1")
            .config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.executor.memory", "512m")
            .config("spark.executor.cores", "1")
            .config("spark.cores.max", "2")
        )
    _SESSION = (
        builder.appName("cape-pipelines-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.default.parallelism", "2")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.driver.memory", "1g")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.adaptive.enabled", "false")
        .getOrCreate()
    )
    _SESSION.sparkContext.setLogLevel("ERROR")
    atexit.register(_stop)
    return _SESSION


def _stop() -> None:
    global _SESSION
    if _SESSION is not None:
        _SESSION.stop()
        _SESSION = None
