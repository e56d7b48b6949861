"""A Spark application for the orchestrator link test, run as its own process (its own JVM).

``python spark_app_driver.py MASTER AUDIT_JSONL SLEEP UI_PORT``

Applies a policy with the Spark adapter to a frame whose one partition first
sleeps ``SLEEP`` seconds, and collects it: the run is started (``run.started``
in ``AUDIT_JSONL``, with the application's identity) and stays unfinished for
as long as the stage sleeps, so the test can kill the application mid-run. The
driver's UI listens on loopback ``UI_PORT`` (its ``/api/v1`` is polled too).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import pyarrow as pa

POLICY = {
    "label": "orch-link",
    "rules": [{"match": {"name": "name"}, "actions": ["drop"]}],
}


def sleeper(seconds: float):  # type: ignore[no-untyped-def]
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        time.sleep(seconds)
        yield from batches

    return run


def main() -> None:
    master, audit, sleep, ui_port = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    from pyspark.sql import SparkSession

    from cape_pipelines.audit import JsonlSink
    from cape_pipelines.spark import apply_policy, collect

    spark = (
        SparkSession.builder.master(master)
        .appName("cape-orchestrator-link")
        .config("spark.ui.enabled", "true")
        .config("spark.ui.port", ui_port)
        .config("spark.port.maxRetries", "0")
        .config("spark.executor.memory", "512m")
        .config("spark.cores.max", "1")
        .getOrCreate()
    )
    frame = spark.range(4, numPartitions=1).selectExpr("id", "cast(id as string) as name")
    slow = frame.mapInArrow(sleeper(sleep), frame.schema)
    table = collect(apply_policy(slow, POLICY, audit=JsonlSink(audit)))
    print("rows", table.num_rows, flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
