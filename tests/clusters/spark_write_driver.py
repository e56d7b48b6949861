"""Driver for the Spark standalone write tests, run as its own process (its own JVM).

``python spark_write_driver.py MASTER OUT_DIR AUDIT_JSONL ROWS PARTITIONS MARKERS SLEEP``

Makes ``ROWS`` rows in ``PARTITIONS`` partitions, passes each partition
through a slow stage that first drops a marker file into ``MARKERS`` (so the
test can see the job running and pick its moment to kill an executor), then
applies a policy that tokenizes ``name`` and removes every seventh row, and
writes Parquet with the audited :func:`cape_pipelines.spark.write` (records in
``AUDIT_JSONL``). It runs in a process of its own because a JVM holds one
active SparkSession and the rest of the suite shares a ``local[2]`` one.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

KEY = b"cape-cluster-test-tokenizer-key1"
POLICY = {
    "label": "cluster-write",
    "rules": [
        {
            "match": {"name": "name"},
            "actions": [{"transform": {"type": "tokenizer", "key": {"secret": "tok"}}}],
        },
        {"actions": [{"transform": {"type": "row-redact", "condition": "seventh == 0"}}]},
    ],
}


def slow_stage(markers: str, sleep: float):  # type: ignore[no-untyped-def]
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        Path(markers, uuid.uuid4().hex).touch()
        time.sleep(sleep)
        for batch in batches:
            ids = batch.column("id")
            import pyarrow.compute as pc

            names = pc.binary_join_element_wise("person-", pc.cast(ids, pa.string()), "")
            seventh = pc.subtract(ids, pc.multiply(pc.divide(ids, 7), 7))
            yield pa.record_batch([ids, names, seventh], names=["id", "name", "seventh"])

    return run


def main() -> None:
    master, out, audit, rows, parts, markers, sleep = sys.argv[1:8]
    from pyspark.sql import SparkSession

    from cape_pipelines.audit import JsonlSink
    from cape_pipelines.spark import apply_policy, write

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (
        SparkSession.builder.master(master)
        .appName("cape-cluster-write")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.executor.memory", "512m")
        .config("spark.executor.cores", "1")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.adaptive.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        base = spark.range(0, int(rows), numPartitions=int(parts))
        made = base.mapInArrow(
            slow_stage(markers, float(sleep)), "id long, name string, seventh long"
        )
        protected = apply_policy(made, POLICY, keys={"tok": KEY}, audit=JsonlSink(audit))
        started = time.monotonic()
        counters = write(protected, out)
        print(
            json.dumps(
                {
                    "rows_in": counters.rows_in,
                    "rows_out": counters.rows_out,
                    "seconds": time.monotonic() - started,
                }
            ),
            flush=True,
        )
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
