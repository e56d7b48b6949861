"""Cost of the k-anonymity / l-diversity measurement: on the core, and per engine in one run.

Core section: the median seconds and rows/s of counting equivalence classes
over three quasi-identifiers (with a sensitive column for l-diversity), of
merging the counts of 10 partitions, and of marking the rows below ``k`` (what
a suppression removes), next to the bare ``group_by`` count it is built on.

Engine section (``--engines``, default pandas,dask,beam,spark: Spark last, so its
JVM is not counted in the others' peaks): the same
synthetic rows as a Parquet file, one policy (``bucket`` the age into decades)
run three ways side by side on each engine: without a ``risk:`` section, with
``action: report`` and with ``action: suppress`` (k=5 over zip3, age, sex;
l-diversity of dx). Each is the engine's audited run from Parquet to its
output (pandas: the frame in memory; Dask: ``compute``; Spark: ``write`` to
Parquet; Beam: read Parquet, ApplyPolicy, write Parquet on the DirectRunner).
Rows/s are medians of ``--repeat`` runs after one warm-up; ``ratio`` is the
row's median time over the no-risk row's; ``peak MiB`` is the peak RSS of
this process plus its child processes (Spark's JVM, Beam's workers) sampled
every 50 ms during the runs of that row.

    python bench/risk.py --rows 1000000
    python bench/risk.py --rows 100000 --repeat 1 --engines pandas,dask
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from cape_pipelines.audit import MemorySink
from cape_pipelines.transforms.risk import ClassCounts, below_k

QIS = ["zip3", "age_band", "sex"]


def make_table(rows: int, seed: int = 5) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "zip3": pa.array(rng.integers(0, 900, rows)).cast(pa.string()),
            "age_band": pa.array(rng.integers(0, 10, rows) * 10, pa.int64()),
            "sex": pa.array(rng.choice(["f", "m", "x"], rows)),
            "dx": pa.array(rng.integers(0, 50, rows)).cast(pa.string()),
        }
    )


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def policy(action: str | None) -> dict[str, Any]:
    """The bench policy: bucket the age; with a risk section when ``action`` is given."""
    doc: dict[str, Any] = {
        "label": "bench-risk",
        "rules": [
            {
                "match": {"name": "age_band"},
                "actions": [{"transform": {"type": "bucket", "width": 20}}],
            }
        ],
    }
    if action is not None:
        doc["risk"] = {
            "quasi_identifiers": QIS,
            "sensitive": "dx",
            "k": 5,
            "l": 2,
            "action": action,
        }
    return doc


@contextmanager
def peak_rss() -> Iterator[list[int]]:
    """The peak RSS (bytes) of this process and its descendants while the block runs."""
    me = psutil.Process()
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            total = 0
            try:
                total = me.memory_info().rss
                for child in me.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            peak[0] = max(peak[0], total)
            stop.wait(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


def run_pandas(path: str, work: str) -> Callable[[dict[str, Any]], int]:
    import cape_pipelines

    df = pq.read_table(path).to_pandas()

    def run(doc: dict[str, Any]) -> int:
        return len(cape_pipelines.apply_policy(doc, df, audit=MemorySink()))

    return run


def run_dask(path: str, work: str) -> Callable[[dict[str, Any]], int]:
    import dask.dataframe as dd

    import cape_pipelines.dask as cape_dask

    def run(doc: dict[str, Any]) -> int:
        ddf = dd.read_parquet(path, dtype_backend="pyarrow").repartition(npartitions=8)
        out = cape_dask.apply_policy(ddf, doc, audit=MemorySink())
        return len(cape_dask.compute(out, scheduler="threads"))

    return run


def run_spark(path: str, work: str) -> Callable[[dict[str, Any]], int]:
    from pyspark.sql import SparkSession

    import cape_pipelines.spark as cape_spark

    # Spark's Python workers must be this interpreter (the one with cape_pipelines).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    runs = [0]

    def run(doc: dict[str, Any]) -> int:
        runs[0] += 1
        out = cape_spark.apply_policy(spark.read.parquet(path), doc, audit=MemorySink())
        return cape_spark.write(out, os.path.join(work, f"spark-{runs[0]}")).rows_out

    return run


def run_beam(path: str, work: str) -> Callable[[dict[str, Any]], int]:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from cape_pipelines.beam import ApplyPolicy

    logging.getLogger("apache_beam").setLevel(logging.ERROR)
    schema = pq.read_schema(path)
    runs = [0]

    def run(doc: dict[str, Any]) -> int:
        runs[0] += 1
        sink = os.path.join(work, f"beam-audit-{runs[0]}.jsonl")
        step = ApplyPolicy(doc, schema=schema, audit=sink)
        prefix = os.path.join(work, f"beam-{runs[0]}", "part")
        with beam.Pipeline(options=PipelineOptions([])) as p:
            _ = (
                p
                | beam.io.ReadFromParquetBatched(path)
                | step
                | beam.io.WriteToParquetBatched(prefix, schema=step.output_schema)
            )
        import json

        with open(sink, encoding="utf-8") as fh:
            done = [json.loads(line) for line in fh if '"run.completed"' in line]
        return int(done[0]["rows_out"])

    return run


ENGINES: dict[str, Callable[[str, str], Callable[[dict[str, Any]], int]]] = {
    "pandas": run_pandas,
    "dask": run_dask,
    "spark": run_spark,
    "beam": run_beam,
}


def engine_section(table: pa.Table, engines: list[str], repeat: int) -> None:
    rows = table.num_rows
    print()
    print(f"# per engine: {rows:,} rows from Parquet, median of {repeat} after one warm-up")
    print(f"{'engine':8} {'risk':9} {'seconds':>9} {'rows/s':>12} {'ratio':>6} {'peak MiB':>9}")
    with tempfile.TemporaryDirectory(prefix="cape-bench-risk-") as work:
        path = os.path.join(work, "input.parquet")
        pq.write_table(table, path, row_group_size=max(1, rows // 8))
        for name in engines:
            try:
                run = ENGINES[name](path, work)
            except ImportError as exc:
                print(f"{name:8} not installed ({exc})")
                continue
            base = None
            for action in (None, "report", "suppress"):
                doc = policy(action)
                run(doc)  # warm-up (JIT, JVM, imports, file cache)
                with peak_rss() as peak:
                    seconds = timed(lambda doc=doc, run=run: run(doc), repeat)
                base = seconds if base is None else base
                print(
                    f"{name:8} {action or 'none':9} {seconds:9.3f} {rows / seconds:12,.0f} "
                    f"{seconds / base:6.2f} {peak[0] / 2**20:9.0f}",
                    flush=True,
                )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--engines", default="pandas,dask,beam,spark")
    ap.add_argument("--no-core", action="store_true", help="skip the core section")
    args = ap.parse_args(argv)
    table = make_table(args.rows)
    if not args.no_core:
        core_section(table, args.rows, args.repeat)
    engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        print(f"unknown engine(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    engine_section(table, engines, args.repeat)
    return 0


def core_section(table: pa.Table, rows: int, repeat: int) -> None:
    parts = [table.slice(i * rows // 10, rows // 10) for i in range(10)]
    counts = ClassCounts.of_table(table, QIS, "dx")

    def merged() -> ClassCounts:
        total = ClassCounts(tuple(QIS), "dx")
        return total.merge(*(ClassCounts.of_table(p, QIS, "dx") for p in parts))

    cases = [
        ("bare group_by count", lambda: table.group_by(QIS).aggregate([([], "count_all")])),
        ("class counts (k only)", lambda: ClassCounts.of_table(table, QIS)),
        ("class counts + l-diversity", lambda: ClassCounts.of_table(table, QIS, "dx")),
        ("10 partitions merged", merged),
        ("report (k=5)", lambda: counts.report(5)),
        ("rows below k (suppress mask)", lambda: below_k(table, counts, 5)),
    ]
    report = counts.report(5)
    print(f"# core: {rows:,} rows, {report.classes:,} classes over {QIS}, median of {repeat}")
    print(f"{'step':30} {'seconds':>9} {'rows/s':>14}")
    for name, fn in cases:
        s = timed(fn, repeat)
        print(f"{name:30} {s:9.3f} {rows / s:14,.0f}")
    print(f"report: {report.to_dict()}")


if __name__ == "__main__":
    raise SystemExit(main())
