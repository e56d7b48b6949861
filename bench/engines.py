"""Benchmark of the engine adapters (Dask, Spark, Beam) against pass-throughs and native Spark SQL.

Reads one Parquet file of ``--rows`` synthetic customer rows (generated once into
``--data-dir`` and reused: ``email`` ~70% distinct strings of 12-25 characters,
``country`` ~5% distinct, ``salary`` float64, ``signup`` timestamp[us], ``age``
int64) and, per engine in one run, measures rows/s (median of ``--repeat``
runs, each after one uncounted warm-up run) of a 4-rule policy (HMAC tokenize
``email``, reversible-tokenize ``country``, round ``salary`` to hundreds,
truncate ``signup`` to the month) against a pass-through of the same data on the
same engine (read Parquet, write Parquet, the same partitions); on Spark also
against the tokenize/round/truncate part written in native Spark SQL (``hmac``,
``bround``, ``date_trunc``; runs interleaved with ours, and the whole outputs
compared byte for byte), against a pass-through of the policy's own output
(tokens and rounded values do not write at the input's cost), against
``mapInArrow`` handing batches back untouched (Spark's Arrow exchange with
Python alone), and against cape-dataframes' Spark ``apply_policy``.
``CPU s`` is the median CPU time of the bench's whole process tree (the
engines' JVM and worker processes included) and ``cpu/base`` its ratio to the
baseline's: on a shared machine it moves far less than wall time.
A first section runs the core alone over the file in memory on one thread, the
floor under every engine's policy cost. It prints one table (``time/base`` is
the row's median time over its baseline's; raw rows/s kept), then whether each
target of issue 14 is met with the measured ratio. The adapter-overhead measure
is the engine's time with the policy ÷ (its pass-through time + the core-alone
time ÷ the processes that can run the core at once): 1.0 means the adapter adds
nothing to reading, writing and the core's own work. Progress goes to stderr,
the table to stdout.

    python bench/engines.py                          # 1,000,000 rows, 3 repeats
    python bench/engines.py --rows 100000 --repeat 1 --engines dask,beam
    python bench/engines.py --beam-multiprocess      # also Beam with 2 worker processes

Memory: ``driver MiB`` is the peak RSS of this process sampled during the
measurement, ``children MiB`` the peak of the summed RSS of all its descendant
processes (Dask workers and nannies, Spark's JVM and its Python workers, Beam's
worker processes; pages shared between forked processes are counted in each),
and ``maxrss MiB`` this process's ``ru_maxrss`` after the measurement (a
high-water mark over the whole run, so it only grows). Sections run the core,
Dask, Beam, then Spark, so that Spark's JVM (whose heap never shrinks) is not counted
in the other engines' children.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

# The string columns come from the same generator as bench/core.py (this folder is on sys.path
# when the script runs).
from core import with_distinct

TOKEN_KEY = b"bench-engines-email-key-0123456789"
SIV_KEY = bytes(range(32))
KEYS = {"email-key": TOKEN_KEY, "country-key": SIV_KEY}
DATA_VERSION = 1

_TOKENIZE = {
    "match": {"name": "email"},
    "actions": [
        {
            "transform": {
                "type": "tokenizer",
                "algorithm": "hmac-sha256",
                "key": {"secret": "email-key"},
            }
        }
    ],
}
_REVERSIBLE = {
    "match": {"name": "country"},
    "actions": [{"transform": {"type": "reversible-tokenizer", "key": {"secret": "country-key"}}}],
}
_ROUND = {
    "match": {"name": "salary"},
    "actions": [{"transform": {"type": "numeric-rounding", "precision": -2}}],
}
_TRUNCATE = {
    "match": {"name": "signup"},
    "actions": [{"transform": {"type": "date-truncation", "frequency": "month"}}],
}
POLICY_4 = {"label": "bench-engines", "rules": [_TOKENIZE, _REVERSIBLE, _ROUND, _TRUNCATE]}
POLICY_3 = {"label": "bench-engines-3", "rules": [_TOKENIZE, _ROUND, _TRUNCATE]}

# cape-dataframes' form of the same four rules: keys inline, a dtype for rounding.
# Its tokenizer is SHA-256(value || key), not HMAC (our `cape-sha256` algorithm).
CAPE_DATAFRAMES_POLICY = {
    "label": "bench-engines",
    "rules": [
        {
            "match": {"name": "email"},
            "actions": [{"transform": {"type": "tokenizer", "key": TOKEN_KEY.decode()}}],
        },
        {
            "match": {"name": "country"},
            "actions": [{"transform": {"type": "reversible-tokenizer", "key": SIV_KEY}}],
        },
        {
            "match": {"name": "salary"},
            "actions": [
                {"transform": {"type": "numeric-rounding", "dtype": "Double", "precision": -2}}
            ],
        },
        {
            "match": {"name": "signup"},
            "actions": [{"transform": {"type": "date-truncation", "frequency": "month"}}],
        },
    ],
}

ENGINES = ("core", "dask", "beam", "spark")
CORE = "apply_table, in memory, 1 thread"


# --------------------------------------------------------------------------- data


def make_table(rows: int, seed: int = 11) -> pa.Table:
    """The benchmark's input rows (deterministic for a given ``rows`` and ``seed``)."""
    rng = np.random.default_rng(seed)
    signup = rng.integers(1_500_000_000_000_000, 1_700_000_000_000_000, rows)
    return pa.table(
        {
            "email": with_distinct(rng, rows, 0.70),
            "country": with_distinct(rng, rows, 0.05),
            "salary": pa.array(rng.normal(50_000, 15_000, rows), pa.float64()),
            "signup": pa.array(signup.astype("datetime64[us]"), pa.timestamp("us")),
            "age": pa.array(rng.integers(18, 90, rows), pa.int64()),
        }
    )


def dataset(data_dir: Path, rows: int, row_groups: int) -> Path:
    """The Parquet file of ``rows`` rows in ``row_groups`` row groups, written on first use."""
    path = data_dir / f"engines-v{DATA_VERSION}-{rows}-rg{row_groups}.parquet"
    if path.exists():
        return path
    data_dir.mkdir(parents=True, exist_ok=True)
    table = make_table(rows)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    pq.write_table(table, partial, row_group_size=max(1, math.ceil(rows / row_groups)))
    partial.replace(path)
    return path


def policy_output(path: Path) -> Path:
    """The core's output of POLICY_4 over the file at ``path``, written beside it on first use
    (same row groups): what a pass-through of the policy's output reads."""
    out = path.with_name(path.stem + "-policy4-output.parquet")
    if out.exists():
        return out
    from cape_pipelines.core import apply_table
    from cape_pipelines.plan import build_plan

    source = pq.ParquetFile(path)
    table = source.read()
    plan = build_plan(POLICY_4, table.schema, keys=KEYS)
    result, _ = apply_table(plan, table)
    partial = out.with_suffix(f".{os.getpid()}.tmp")
    pq.write_table(result, partial, row_group_size=source.metadata.row_group(0).num_rows)
    partial.replace(out)
    return out


def parquet_rows(path: Path) -> int:
    """Rows in every Parquet file under ``path`` (footers only)."""
    return sum(pq.read_metadata(f).num_rows for f in sorted(path.rglob("*.parquet")))


# ------------------------------------------------------------------ measurement


class MemoryWatch:
    """Peak RSS of this process and of the sum of its descendants, sampled on a thread."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.driver = 0
        self.children = 0
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-watch", daemon=True)

    def sample(self) -> None:
        """Take one sample; processes that exit while being read are skipped."""
        kids = 0
        for child in self._proc.children(recursive=True):
            try:
                kids += child.memory_info().rss
            except psutil.Error:
                continue
        self.driver = max(self.driver, self._proc.memory_info().rss)
        self.children = max(self.children, kids)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemoryWatch:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its live descendants (see
    :func:`tree_cpu_split`)."""
    return tree_cpu_split()[0]


def tree_cpu_split() -> tuple[float, float]:
    """(all, JVM): CPU seconds of this process and its live descendants, and of the Java ones.

    On a machine shared with other work, wall time says how long a run waited
    as much as how long it worked; the CPU its own processes used (Spark's JVM
    and Python workers, Dask's and Beam's workers) is disturbed far less. A
    descendant that exits during a run takes its CPU time with it, so the
    engines' long-lived workers (Spark reuses its Python workers) are what
    this counts. The JVM's share tells Spark's own work (reading, writing, the
    Arrow conversions of the exchange with Python) from the Python side's.
    """
    proc = psutil.Process()
    total = sum(proc.cpu_times()[:2])
    jvm = 0.0
    for child in proc.children(recursive=True):
        try:
            used = sum(child.cpu_times()[:2])
            java = child.name().startswith("java")
        except psutil.Error:
            continue
        total += used
        jvm += used if java else 0.0
    return total, jvm


def maxrss_bytes() -> int:
    """This process's ``ru_maxrss`` in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Outcome:
    """One measured row of the table."""

    group: str
    name: str
    rows: int
    baseline: str | None = None
    note: str = ""
    seconds: float | None = None
    cpu_seconds: float | None = None
    tree_cpu_seconds: float | None = None
    jvm_cpu_seconds: float | None = None
    driver: int = 0
    children: int = 0
    maxrss: int = 0
    error: str | None = None
    optional: bool = False

    @property
    def rate(self) -> float | None:
        """Rows per second (median run), or None if it did not run."""
        return None if self.seconds is None else self.rows / self.seconds


@dataclass
class Bench:
    """Runs measurements, keeps their outcomes, and gives each run a fresh output path."""

    repeat: int
    scratch: Path
    outcomes: dict[tuple[str, str], Outcome] = field(default_factory=dict)
    _runs: int = 0

    def output(self) -> Path:
        """A path that does not exist yet, for one run's output."""
        self._runs += 1
        return self.scratch / f"out-{self._runs}"

    def record_error(self, group: str, name: str, rows: int, exc: BaseException) -> Outcome:
        """Record that ``group``/``name`` could not run at all (e.g. the engine did not start)."""
        out = Outcome(group, name, rows, error=brief(exc))
        self.outcomes[(group, name)] = out
        _progress(out)
        return out

    def measure(
        self,
        group: str,
        name: str,
        run: Callable[[Path], object],
        *,
        rows: int,
        baseline: str | None = None,
        expect_rows: bool = True,
        note: str = "",
        optional: bool = False,
    ) -> Outcome:
        """One warm-up run, then ``repeat`` timed runs of ``run(output_path)``.

        After the warm-up, when ``expect_rows``, the Parquet written is counted
        and must hold ``rows`` rows (the policy removes none).
        """
        out = Outcome(group, name, rows, baseline=baseline, note=note, optional=optional)
        times: list[float] = []
        cpu: list[float] = []
        tree: list[float] = []
        jvm: list[float] = []
        with MemoryWatch() as mem:
            try:
                path = self.output()
                run(path)
                if expect_rows:
                    written = parquet_rows(path)
                    if written != rows:
                        raise RuntimeError(f"wrote {written:,} rows, expected {rows:,}")
                shutil.rmtree(path, ignore_errors=True)
                for _ in range(self.repeat):
                    path = self.output()
                    c0, (k0, j0) = time.process_time(), tree_cpu_split()
                    t0 = time.perf_counter()
                    run(path)
                    times.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
                    k1, j1 = tree_cpu_split()
                    tree.append(k1 - k0)
                    jvm.append(j1 - j0)
                    shutil.rmtree(path, ignore_errors=True)
            except Exception as exc:
                out.error = brief(exc)
        if out.error is None:
            out.seconds = statistics.median(times)
            out.cpu_seconds = statistics.median(cpu)
            out.tree_cpu_seconds = statistics.median(tree)
            out.jvm_cpu_seconds = statistics.median(jvm)
        out.driver, out.children, out.maxrss = mem.driver, mem.children, maxrss_bytes()
        self.outcomes[(group, name)] = out
        _progress(out)
        return out

    def measure_together(
        self,
        group: str,
        cases: list[tuple[str, Callable[[Path], object], str | None]],
        *,
        rows: int,
        note: str = "",
    ) -> None:
        """Like :meth:`measure` for several cases (no rows check), their runs interleaved.

        One warm-up of each, then ``repeat`` rounds each running every case
        once, so the cases compared share the machine's conditions.
        """
        outs = [Outcome(group, name, rows, baseline=base, note=note) for name, _, base in cases]
        times: list[list[float]] = [[] for _ in cases]
        cpu: list[list[float]] = [[] for _ in cases]
        tree: list[list[float]] = [[] for _ in cases]
        jvm: list[list[float]] = [[] for _ in cases]
        with MemoryWatch() as mem:
            try:
                for _, run, _ in cases:
                    run(self.output())
                for _ in range(self.repeat):
                    for i, (_, run, _) in enumerate(cases):
                        path = self.output()
                        c0, (k0, j0) = time.process_time(), tree_cpu_split()
                        t0 = time.perf_counter()
                        run(path)
                        times[i].append(time.perf_counter() - t0)
                        cpu[i].append(time.process_time() - c0)
                        k1, j1 = tree_cpu_split()
                        tree[i].append(k1 - k0)
                        jvm[i].append(j1 - j0)
                        shutil.rmtree(path, ignore_errors=True)
            except Exception as exc:
                for out in outs:
                    out.error = brief(exc)
        for i, out in enumerate(outs):
            if out.error is None:
                out.seconds = statistics.median(times[i])
                out.cpu_seconds = statistics.median(cpu[i])
                out.tree_cpu_seconds = statistics.median(tree[i])
                out.jvm_cpu_seconds = statistics.median(jvm[i])
                out.note += "; runs: " + ", ".join(f"{t:.2f}s" for t in times[i])
            out.driver, out.children, out.maxrss = mem.driver, mem.children, maxrss_bytes()
            self.outcomes[(group, out.name)] = out
            _progress(out)

    def get(self, group: str, name: str) -> Outcome | None:
        """The outcome of ``group``/``name`` if it was measured."""
        return self.outcomes.get((group, name))


def brief(exc: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters."""
    text = str(exc).strip().splitlines()
    first = next((line.strip() for line in text if line.strip()), "")
    return f"{type(exc).__name__}: {first}"[:limit]


def _progress(out: Outcome) -> None:
    state = f"{out.rate:,.0f} rows/s" if out.rate is not None else f"did not run: {out.error}"
    print(f"  [{out.group}] {out.name}: {state}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ core


def bench_core(bench: Bench, path: Path, rows: int) -> None:
    """The floor every engine adds to: the core over the whole file in memory, one thread."""
    from cape_pipelines.core import apply_table
    from cape_pipelines.plan import build_plan

    table = pq.read_table(path)
    plan = build_plan(POLICY_4, table.schema, keys=KEYS)
    out = bench.measure(
        "core (reference)",
        CORE,
        lambda _out: apply_table(plan, table),
        rows=rows,
        expect_rows=False,
        note=f"{table.num_rows // max(1, len(table.to_batches())):,}-row batches",
    )
    if out.cpu_seconds:
        # This process's CPU time is the core's own here (one thread, no children):
        # a rate a machine shared with other work disturbs far less than wall time.
        out.note += f"; {rows / out.cpu_seconds:,.0f} rows per CPU second"


# ------------------------------------------------------------------------ Dask


def bench_dask(bench: Bench, path: Path, rows: int) -> None:
    """Threaded scheduler, then LocalCluster with 1 and 2 worker processes (1 thread each)."""
    import dask
    import dask.dataframe as dd
    from distributed import Client, LocalCluster

    import cape_pipelines.dask as cdask
    from cape_pipelines.audit import MemorySink

    def read() -> Any:
        # One partition per row group, for the pass-through and the policy alike.
        return dd.read_parquet(str(path), split_row_groups=True)

    parts = read().npartitions

    def pass_through(scheduler: Any) -> Callable[[Path], object]:
        def run(out: Path) -> None:
            dask.compute(
                read().to_parquet(str(out), write_index=False, compute=False),
                scheduler=scheduler,
            )

        return run

    def policy(scheduler: Any) -> Callable[[Path], object]:
        def run(out: Path) -> None:
            frame = cdask.apply_policy(read(), POLICY_4, keys=KEYS, audit=MemorySink())
            cdask.run(
                frame,
                frame.to_parquet(str(out), write_index=False, compute=False),
                scheduler=scheduler,
            )

        return run

    def pair(group: str, scheduler: Any) -> None:
        note = f"{parts} partitions"
        bench.measure(group, "pass-through", pass_through(scheduler), rows=rows, note=note)
        bench.measure(
            group,
            "apply_policy (audited run)",
            policy(scheduler),
            rows=rows,
            baseline="pass-through",
            note=note,
        )

    pair("dask threads", "threads")
    for workers in (1, 2):
        group = f"dask {workers} worker{'s' if workers > 1 else ''}"
        try:
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
        except Exception as exc:
            bench.record_error(group, "pass-through", rows, exc)
            continue
        try:
            with Client(cluster) as client:
                pair(group, client)
        finally:
            cluster.close()


# ------------------------------------------------------------------------ Beam


def bench_beam(bench: Bench, path: Path, rows: int, multiprocess: bool) -> None:
    """DirectRunner in-process (and, with ``--beam-multiprocess``, with 2 worker processes)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from cape_pipelines.beam import ApplyPolicy

    schema = pq.read_schema(path)
    audit = bench.scratch / "beam-audit.jsonl"
    modes = [("beam direct", ["--runner=DirectRunner"])]
    if multiprocess:
        modes.append(
            (
                "beam direct 2 procs",
                [
                    "--runner=DirectRunner",
                    "--direct_running_mode=multi_processing",
                    "--direct_num_workers=2",
                ],
            )
        )

    def pass_through(flags: list[str]) -> Callable[[Path], object]:
        def run(out: Path) -> None:
            with beam.Pipeline(options=PipelineOptions(flags)) as p:
                _ = (
                    p
                    | "Read" >> beam.io.ReadFromParquetBatched(str(path))
                    | "Write"
                    >> beam.io.WriteToParquetBatched(
                        str(out / "part"), schema=schema, file_name_suffix=".parquet"
                    )
                )

        return run

    def policy(flags: list[str]) -> Callable[[Path], object]:
        def run(out: Path) -> None:
            step = ApplyPolicy.from_parquet_schema(str(path), POLICY_4, keys=KEYS, audit=str(audit))
            with beam.Pipeline(options=PipelineOptions(flags)) as p:
                _ = (
                    p
                    | "Read" >> beam.io.ReadFromParquetBatched(str(path))
                    | "Protect" >> step
                    | "Write"
                    >> beam.io.WriteToParquetBatched(
                        str(out / "part"), schema=step.output_schema, file_name_suffix=".parquet"
                    )
                )

        return run

    for group, flags in modes:
        bench.measure(group, "pass-through", pass_through(flags), rows=rows)
        bench.measure(
            group, "ApplyPolicy (audited)", policy(flags), rows=rows, baseline="pass-through"
        )


# ----------------------------------------------------------------------- Spark


def spark_session(arrow_batch: int | None) -> Any:
    """The one local[2] SparkSession of this benchmark (UTC, UI and AQE off, Arrow on)."""
    from pyspark.sql import SparkSession

    # Python workers must run this interpreter (the venv's), not the system one.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.master("local[2]")
        .appName("cape-pipelines-bench-engines")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.default.parallelism", "2")
        .config("spark.sql.adaptive.enabled", "false")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.driver.memory", "2g")
    )
    if arrow_batch is not None:
        builder = builder.config("spark.sql.execution.arrow.maxRecordsPerBatch", str(arrow_batch))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def native_sql(df: Any) -> Any:
    """The tokenize/round/truncate rules of POLICY_3 as Spark's own expressions.

    ``lower(hex(hmac(...)))`` is the core tokenizer's lower-case hex HMAC-SHA256 of
    the UTF-8 value; ``bround`` rounds half to even as the core does (``round`` is
    half up); ``date_trunc`` keeps the timestamp type.
    """
    from pyspark.sql import functions as F

    if not hasattr(F, "hmac"):
        raise RuntimeError("pyspark.sql.functions has no hmac (needs Spark 4.3)")
    token = F.lower(
        F.hex(F.hmac(F.lit(TOKEN_KEY), F.col("email").cast("binary"), F.lit("SHA-256")))
    )
    return df.select(
        token.alias("email"),
        F.col("country"),
        F.bround("salary", -2).alias("salary"),
        # date_trunc takes and returns TIMESTAMP: a TIMESTAMP_NTZ input is cast to
        # the session zone and back, so the column keeps its type as the core's does.
        F.date_trunc("month", "signup").cast(df.schema["signup"].dataType).alias("signup"),
        F.col("age"),
    )


def _identity(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """A ``mapInArrow`` function that hands every batch back as it came."""
    yield from batches


def compare_all(ours: Any, theirs: Any) -> str:
    """Whether two Spark DataFrames over the same scan hold the same rows in the same order.

    Both are collected to Arrow and compared column by column (nulls, NaN bits
    and all): exact, and affordable at the bench's sizes.
    """
    a = ours.toArrow()
    b = theirs.toArrow()
    if a.num_rows != b.num_rows:
        return f"no: {a.num_rows:,} rows vs {b.num_rows:,}"
    if a.schema != b.schema:
        return f"no: schemas differ ({a.schema.types} vs {b.schema.types})"
    differ = [c for c in a.column_names if not a.column(c).equals(b.column(c))]
    return "yes" if not differ else f"no: {', '.join(differ)} differ"


def bench_spark(
    bench: Bench,
    path: Path,
    rows: int,
    slow_path: Path,
    slow_rows: int,
    arrow_batch: int | None,
    notes: list[str],
) -> None:
    """local[2]: pass-throughs, apply_policy (4 and 3 rules), native SQL, cape-dataframes."""
    import cape_pipelines.spark as cspark
    from cape_pipelines.audit import MemorySink

    group = "spark local[2]"
    try:
        spark = spark_session(arrow_batch)
    except Exception as exc:
        bench.record_error(group, "pass-through -> parquet", rows, exc)
        return
    try:
        df = cspark.read_parquet(spark, str(path))
        parts = df.rdd.getNumPartitions()
        batch = spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch")
        note = f"{parts} partitions"
        notes.append(
            f"spark: {parts} input partitions, Arrow batches of {batch} rows, "
            f"schema {', '.join(f'{f.name}:{f.dataType.simpleString()}' for f in df.schema)}"
        )

        def parquet(make: Callable[[], Any]) -> Callable[[Path], object]:
            return lambda out: make().write.mode("overwrite").parquet(str(out))

        def noop(make: Callable[[], Any]) -> Callable[[Path], object]:
            return lambda _out: make().write.format("noop").mode("overwrite").save()

        def ours(policy: dict) -> Callable[[], Any]:
            return lambda: cspark.apply_policy(df, policy, keys=KEYS, audit=MemorySink())

        def audited(out: Path) -> None:
            cspark.write(ours(POLICY_4)(), str(out))

        # The JVM compiles hot code over its first jobs: run both kinds once before
        # any measurement, so the first measured row is not the one that pays for it.
        warm = bench.output()
        df.write.parquet(str(warm))
        ours(POLICY_4)().write.format("noop").mode("overwrite").save()
        shutil.rmtree(warm, ignore_errors=True)

        bench.measure(group, "pass-through -> parquet", parquet(lambda: df), rows=rows, note=note)
        # The policy's output is not its input: 64-character hex tokens and rounded values
        # encode and compress at another cost than the values they replace. A pass-through
        # of the output itself shows that cost apart from the adapter's.
        produced = cspark.read_parquet(spark, str(policy_output(path)))
        bench.measure(
            group,
            "output pass-through -> parquet",
            parquet(lambda: produced),
            rows=rows,
            note="the core's output of the 4 rules, read and written",
        )
        bench.measure(
            group,
            "output pass-through -> noop",
            noop(lambda: produced),
            rows=rows,
            expect_rows=False,
            note="the core's output of the 4 rules, read only",
        )
        bench.measure(
            group,
            "apply_policy -> parquet (audited write)",
            audited,
            rows=rows,
            baseline="pass-through -> parquet",
            note=note,
        )
        bench.measure(
            group,
            "apply_policy -> parquet (plain df.write)",
            parquet(ours(POLICY_4)),
            rows=rows,
            baseline="pass-through -> parquet",
            note=note,
        )
        # Where the adapter's time goes: Spark's Arrow exchange with a Python worker alone
        # (mapInArrow handing each batch back untouched) between the pass-through and the
        # policy, the three interleaved.
        bench.measure_together(
            group,
            [
                ("pass-through -> noop", noop(lambda: df), None),
                (
                    "identity mapInArrow -> noop",
                    noop(lambda: df.mapInArrow(_identity, df.schema)),
                    "pass-through -> noop",
                ),
                ("apply_policy -> noop", noop(ours(POLICY_4)), "pass-through -> noop"),
            ],
            rows=rows,
            note=note,
        )
        # Native SQL and ours interleaved run by run (not one after the other), so a
        # change of the machine's load during the section hits both alike.
        bench.measure_together(
            group,
            [
                (
                    "native SQL, 3 rules -> noop",
                    noop(lambda: native_sql(df)),
                    "pass-through -> noop",
                ),
                (
                    "apply_policy, 3 rules -> noop",
                    noop(ours(POLICY_3)),
                    "native SQL, 3 rules -> noop",
                ),
            ],
            rows=rows,
            note=note,
        )
        try:
            same = compare_all(native_sql(df), ours(POLICY_3)())
        except Exception as exc:
            same = f"could not compare: {brief(exc)}"
        notes.append(
            f"spark: native SQL output == apply_policy output, 3 rules (every row): {same}"
        )
        bench_cape_dataframes(bench, spark, slow_path, slow_rows, group)
    finally:
        spark.stop()


def bench_cape_dataframes(
    bench: Bench, spark: Any, slow_path: Path, slow_rows: int, group: str
) -> None:
    """cape-dataframes' Spark apply_policy (4 rules) and ours, both on the smaller file."""
    import cape_pipelines.spark as cspark
    from cape_pipelines.audit import MemorySink

    name = "cape-dataframes apply_policy -> noop"
    ours_name = "apply_policy -> noop (small file)"
    note = f"on {slow_rows:,} rows"
    df = cspark.read_parquet(spark, str(slow_path))

    def ours(_out: Path) -> None:
        out = cspark.apply_policy(df, POLICY_4, keys=KEYS, audit=MemorySink())
        out.write.format("noop").mode("overwrite").save()

    bench.measure(group, ours_name, ours, rows=slow_rows, expect_rows=False, note=note)
    try:
        import cape_dataframes
    except Exception as exc:
        bench.record_error(group, name, slow_rows, exc).optional = True
        return

    def theirs(_out: Path) -> None:
        policy = cape_dataframes.parse_policy(CAPE_DATAFRAMES_POLICY)
        out = cape_dataframes.apply_policy(policy, df)
        out.write.format("noop").mode("overwrite").save()

    # cape-dataframes logs a warning per column it failed on and carries on.
    logging.getLogger().setLevel(logging.ERROR)
    bench.measure(
        group,
        name,
        theirs,
        rows=slow_rows,
        baseline=ours_name,
        expect_rows=False,
        note=note,
        optional=True,
    )


# --------------------------------------------------------------------- report


@dataclass(frozen=True)
class Target:
    """A target: a ratio between two measurements (or one rate) and its bound.

    ``kind`` is "cost" (subject's time over reference's, at most ``bound``),
    "speedup" (subject's rate over reference's, at least ``bound``), "overhead"
    (the adapter-overhead measure, at most ``bound``: subject's time over the
    reference pass-through's time plus the core-alone time divided by
    ``workers``, the processes that can run the core at once), or "rate"
    (subject's rows per second, CPU time for the core, at least ``bound``).
    """

    label: str
    subject: tuple[str, str]
    reference: tuple[str, str] | None
    kind: str
    bound: float
    workers: int = 1


_CORE_KEY = ("core (reference)", CORE)
# Processes that can run the core at the same time in each group. Dask's threaded
# scheduler counts one: the per-value crypto loops hold the GIL.
_OVERHEAD_GROUPS = [
    ("dask threads", "apply_policy (audited run)", "pass-through", 1),
    ("dask 1 worker", "apply_policy (audited run)", "pass-through", 1),
    ("dask 2 workers", "apply_policy (audited run)", "pass-through", 2),
    ("beam direct", "ApplyPolicy (audited)", "pass-through", 1),
    ("beam direct 2 procs", "ApplyPolicy (audited)", "pass-through", 2),
    ("spark local[2]", "apply_policy -> parquet (audited write)", "pass-through -> parquet", 2),
    ("spark local[2]", "apply_policy -> parquet (plain df.write)", "pass-through -> parquet", 2),
    ("spark local[2]", "apply_policy -> noop", "pass-through -> noop", 2),
]

# The adapter overhead with the output's own write cost in the baseline: engine time ÷
# (reading the input + writing the policy's output + core ÷ workers), where writing the output
# is (output pass-through -> parquet) - (output pass-through -> noop).
_OUTPUT_AWARE = [
    ("spark local[2]", "apply_policy -> parquet (audited write)", 2),
    ("spark local[2]", "apply_policy -> parquet (plain df.write)", 2),
]

TARGETS = [
    Target("core: 4-rule policy on one core (rows per CPU second)", _CORE_KEY, None, "rate", 1e6),
    *(
        Target(
            f"{g}: adapter overhead, {subject}",
            (g, subject),
            (g, reference),
            "overhead",
            1.2,
            workers,
        )
        for g, subject, reference, workers in _OVERHEAD_GROUPS
    ),
    Target(
        "dask: 2 workers vs 1 worker (apply_policy rows/s)",
        ("dask 2 workers", "apply_policy (audited run)"),
        ("dask 1 worker", "apply_policy (audited run)"),
        "speedup",
        1.6,
    ),
    Target(
        "spark: audited write over plain write (observed-metrics cost)",
        ("spark local[2]", "apply_policy -> parquet (audited write)"),
        ("spark local[2]", "apply_policy -> parquet (plain df.write)"),
        "cost",
        1.2,
    ),
    Target(
        "spark: apply_policy over native SQL (3 rules, noop sink)",
        ("spark local[2]", "apply_policy, 3 rules -> noop"),
        ("spark local[2]", "native SQL, 3 rules -> noop"),
        "cost",
        1.0,
    ),
]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def print_table(bench: Bench) -> None:
    """The one results table: rows/s, time relative to the row's baseline, memory."""
    header = (
        f"{'engine':20} {'measurement':46} {'rows/s':>11} {'time/base':>9} {'CPU s':>7} "
        f"{'cpu/base':>8} {'driver MiB':>10} {'children MiB':>12} {'maxrss MiB':>10}  "
        "baseline; note"
    )
    print(header)
    print("-" * len(header))
    for out in bench.outcomes.values():
        if out.rate is None:
            print(f"{out.group:20} {out.name:46} did not run: {out.error}")
            continue
        vs, cpu_vs, tail = "", "", []
        base = bench.get(out.group, out.baseline) if out.baseline else None
        if base is not None and base.rate is not None:
            vs = f"{base.rate / out.rate:.2f}x"
            if base.tree_cpu_seconds and out.tree_cpu_seconds is not None:
                cpu_vs = f"{out.tree_cpu_seconds / base.tree_cpu_seconds:.2f}x"
            tail.append(f"vs {out.baseline}")
        cpu = f"{out.tree_cpu_seconds:.2f}" if out.tree_cpu_seconds is not None else ""
        if out.note:
            tail.append(out.note)
        if out.jvm_cpu_seconds and out.tree_cpu_seconds is not None:
            # Spark: the JVM's CPU seconds apart from the Python side's (driver and workers).
            tail.append(
                f"CPU s: JVM {out.jvm_cpu_seconds:.2f}, "
                f"Python {out.tree_cpu_seconds - out.jvm_cpu_seconds:.2f}"
            )
        print(
            f"{out.group:20} {out.name:46} {out.rate:11,.0f} {vs:>9} {cpu:>7} {cpu_vs:>8} "
            f"{_mib(out.driver):>10} {_mib(out.children):>12} {_mib(out.maxrss):>10}  "
            f"{'; '.join(tail)}"
        )


def print_targets(bench: Bench) -> bool:
    """Met / missed per target with the measured ratio; False if any target was missed."""
    print()
    print("targets:")
    all_met = True
    core = bench.get(*_CORE_KEY)
    for t in TARGETS:
        subject = bench.get(*t.subject)
        reference = bench.get(*t.reference) if t.reference else core
        if subject is None and reference is None:
            continue
        if subject is None or reference is None or subject.rate is None or reference.rate is None:
            print(f"  {t.label:72} not measured")
            continue
        extra = ""
        if t.kind == "rate":
            rate = subject.rows / (subject.cpu_seconds or subject.seconds or math.inf)
            met = rate >= t.bound
            print(
                f"  {t.label:72} {rate:10,.0f} (target >= {t.bound:,.0f}): "
                f"{'met' if met else 'missed'}"
            )
            all_met &= met
            continue
        if t.kind == "overhead":
            if core is None or core.seconds is None or subject.seconds is None:
                print(f"  {t.label:72} not measured (needs the core section)")
                continue
            expected = (
                reference.seconds or 0.0
            ) + core.seconds * subject.rows / core.rows / t.workers
            ratio = subject.seconds / expected
            met, want = ratio <= t.bound, f"<= {t.bound}x"
            extra = f"  (pass-through + core / {t.workers})"
            if subject.tree_cpu_seconds and reference.tree_cpu_seconds and core.cpu_seconds:
                # The same measure in CPU seconds of the process tree, which needs no
                # count of workers and moves less with the machine's load than wall time.
                cpu_base = reference.tree_cpu_seconds + core.cpu_seconds * subject.rows / core.rows
                extra += f"; CPU form {subject.tree_cpu_seconds / cpu_base:.2f}x"
        elif t.kind == "cost":
            ratio = reference.rate / subject.rate
            met, want = ratio <= t.bound, f"<= {t.bound}x"
        else:
            ratio = subject.rate / reference.rate
            met, want = ratio >= t.bound, f">= {t.bound}x"
        all_met &= met
        if t.reference and t.reference[1].startswith("native SQL"):
            extra = "  (beats native SQL)" if ratio < 1 else "  (slower than native SQL)"
        if t.kind == "cost" and subject.tree_cpu_seconds and reference.tree_cpu_seconds:
            extra += f"; CPU {subject.tree_cpu_seconds / reference.tree_cpu_seconds:.2f}x"
        print(f"  {t.label:72} {ratio:6.2f}x (target {want}): {'met' if met else 'missed'}{extra}")
    for group, subject_name, workers in _OUTPUT_AWARE:
        subject = bench.get(group, subject_name)
        parts = [bench.get(group, n) for n in ("pass-through -> noop",
                 "output pass-through -> parquet", "output pass-through -> noop")]  # fmt: skip
        if subject is None or subject.seconds is None or core is None or core.seconds is None:
            continue
        if any(p is None or p.seconds is None for p in parts):
            continue
        read_in, out_parquet, out_noop = (p.seconds for p in parts if p and p.seconds)
        expected = read_in + max(0.0, out_parquet - out_noop) + core.seconds / workers
        ratio = subject.seconds / expected
        label = f"{group}: adapter overhead, {subject_name}, output's write in the baseline"
        print(
            f"  {label:72} {ratio:6.2f}x (target <= 1.2x): {'met' if ratio <= 1.2 else 'missed'}"
            f"  (read input + write output + core / {workers}; not counted in the result)"
        )
    return all_met


@contextmanager
def scratch_dir(parent: str | None) -> Iterator[Path]:
    """A temporary directory for the runs' outputs, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="cape-bench-engines-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _versions(engines: list[str]) -> str:
    from importlib.metadata import PackageNotFoundError, version

    names = {
        "core": [],
        "dask": ["dask", "distributed"],
        "beam": ["apache-beam"],
        "spark": ["pyspark"],
    }
    parts = [f"python {sys.version.split()[0]}", f"pyarrow {pa.__version__}"]
    for engine in engines:
        for pkg in names[engine]:
            try:
                parts.append(f"{pkg} {version(pkg)}")
            except PackageNotFoundError:
                parts.append(f"{pkg} missing")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (median)")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset")
    ap.add_argument(
        "--row-groups",
        type=int,
        default=8,
        help="row groups in the input file (Dask partitions; Spark splits by them)",
    )
    ap.add_argument(
        "--slow-rows",
        type=int,
        default=100_000,
        help="rows for cape-dataframes (its per-value Python UDFs are slow)",
    )
    ap.add_argument(
        "--data-dir",
        default=os.path.join(tempfile.gettempdir(), "cape-bench-data"),
        help="where the generated input files are cached",
    )
    ap.add_argument("--scratch", default=None, help="parent of the temporary output directory")
    ap.add_argument(
        "--beam-multiprocess",
        action="store_true",
        help="also run Beam's DirectRunner with 2 worker processes",
    )
    ap.add_argument(
        "--spark-arrow-batch",
        type=int,
        default=None,
        help="spark.sql.execution.arrow.maxRecordsPerBatch (default: Spark's, 10000)",
    )
    args = ap.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown or args.rows < 1 or args.repeat < 1:
        ap.error(f"unknown engine(s) {unknown}" if unknown else "--rows and --repeat must be >= 1")
    logging.basicConfig(level=logging.WARNING)
    # distributed configures its own loggers at INFO; the table is what matters here.
    for name in ("distributed", "apache_beam", "py4j"):
        logging.getLogger(name).setLevel(logging.ERROR)

    data_dir = Path(args.data_dir)
    path = dataset(data_dir, args.rows, args.row_groups)
    slow_rows = min(args.slow_rows, args.rows)
    slow_path = dataset(data_dir, slow_rows, args.row_groups) if "spark" in engines else path

    load = os.getloadavg()
    print(
        f"# {args.rows:,} rows from {path} ({path.stat().st_size / 2**20:,.1f} MiB, "
        f"{pq.read_metadata(path).num_row_groups} row groups); median of {args.repeat} "
        f"after 1 warm-up; {os.cpu_count()} cpus, load average {load[0]:.1f} at start"
    )
    print(f"# {_versions(engines)}")
    notes: list[str] = []
    with scratch_dir(args.scratch) as scratch:
        bench = Bench(repeat=args.repeat, scratch=scratch)
        for engine in ENGINES:
            if engine not in engines:
                continue
            print(f"{engine}...", file=sys.stderr, flush=True)
            try:
                if engine == "core":
                    bench_core(bench, path, args.rows)
                elif engine == "dask":
                    bench_dask(bench, path, args.rows)
                elif engine == "beam":
                    bench_beam(bench, path, args.rows, args.beam_multiprocess)
                else:
                    bench_spark(
                        bench, path, args.rows, slow_path, slow_rows, args.spark_arrow_batch, notes
                    )
            except Exception as exc:
                # An engine that is missing or fails outside a measurement skips its
                # section; the other engines still run.
                bench.record_error(engine, "(section)", args.rows, exc)
    print(f"# load average {os.getloadavg()[0]:.1f} at end")
    for note in notes:
        print(f"# {note}")
    print()
    print_table(bench)
    print_targets(bench)
    failed = [o for o in bench.outcomes.values() if o.error is not None and not o.optional]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
