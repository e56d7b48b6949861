"""Scale-out benchmark: Spark standalone and Dask clusters (1 vs 2 workers), Arrow Flight.

One run, one table, side by side, on one Parquet file of ``--rows`` synthetic
rows (``email`` ~70% distinct strings, ``country`` ~5% distinct, ``salary``
float64, ``age`` int64; 16 row groups) and one policy (HMAC-tokenize
``email``, round ``salary`` to hundreds, drop rows with ``age < 18``):

- ``local``: pyarrow reads the file (no policy), and reads it through the core
  (``apply_batch`` per batch) in this process: the floor and the baseline.
- ``flight``: ``cape flight serve`` in its own process (policy file, no auth,
  loopback): ``do_get`` of the dataset and ``do_exchange`` of the file's
  batches, with 1 and with 2 concurrent clients (threads of this process;
  rows/s is all clients' rows over the wall time).
- ``dask``: ``dask scheduler`` + 1 or 2 ``dask worker`` processes (1 thread
  each), ``read_parquet`` -> ``apply_policy`` -> audited ``run`` writing
  Parquet.
- ``spark``: a standalone master + 1 or 2 workers (1 core, 1 GiB each), a
  driver process reading the file, applying the policy, audited ``write``.

Cluster start-up is not timed; each measured figure is the median of
``--repeat`` runs after one warm-up. ``peak MiB`` is the peak summed RSS of the
processes doing the work (the Flight server; the Dask workers; the Spark
executors), sampled every 50 ms. The machine is shared: print ``os.getloadavg``
with the table and read ratios, not absolute figures.

    python bench/scale.py --rows 1000000 --repeat 3
    python bench/scale.py --sections flight,dask
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests" / "clusters"))

from core import with_distinct  # noqa: E402
from launch import DaskCluster, SparkStandalone  # noqa: E402

KEY_HEX = (b"bench-scale-email-key-0123456789").hex()
POLICY = {
    "label": "bench-scale",
    "rules": [
        {
            "match": {"name": "email"},
            "actions": [{"transform": {"type": "tokenizer", "key": {"secret": "email"}}}],
        },
        {
            "match": {"name": "salary"},
            "actions": [{"transform": {"type": "numeric-rounding", "precision": -2}}],
        },
        {"actions": [{"transform": {"type": "row-redact", "condition": "age < 18"}}]},
    ],
}


def make_data(path: Path, rows: int) -> None:
    rng = np.random.default_rng(11)
    table = pa.table(
        {
            "id": pa.array(np.arange(rows, dtype=np.int64)),
            "email": with_distinct(rng, rows, 0.7),
            "country": with_distinct(rng, rows, 0.05),
            "salary": pa.array(rng.normal(60_000, 20_000, rows)),
            "age": pa.array(rng.integers(0, 90, rows, dtype=np.int64)),
        }
    )
    pq.write_table(table, path, row_group_size=max(1, rows // 16))


class Peak:
    """Peak summed RSS of the processes ``pids()`` names, sampled in a thread."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self.pids = pids
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for pid in self.pids():
                try:
                    total += psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.05)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def tree(pid: int) -> list[int]:
    try:
        p = psutil.Process(pid)
        return [pid, *(c.pid for c in p.children(recursive=True))]
    except psutil.Error:
        return []


def timed(
    fn: Callable[[], int], repeat: int, pids: Callable[[], list[int]]
) -> tuple[float, int, int]:
    """(median seconds, rows, peak bytes) of ``fn`` (returns the rows it handled)."""
    fn()
    times, rows = [], 0
    with Peak(pids) as peak:
        for _ in range(repeat):
            start = time.perf_counter()
            rows = fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times), rows, peak.peak


RESULTS: list[tuple[str, str, float, int]] = []


def report(section: str, what: str, seconds: float, rows: int, peak: int) -> None:
    rate = rows / seconds if seconds else float("nan")
    RESULTS.append((section, what, rate, peak))
    print(f"{section:8} {what:34} {rate:14,.0f} {peak / 2**20:9.0f}", flush=True)


# -- local --------------------------------------------------------------------------------------


def local(path: Path, rows: int, repeat: int) -> None:
    from cape_pipelines import build_plan
    from cape_pipelines.core import apply_batch

    me = os.getpid()

    def read() -> int:
        return sum(b.num_rows for b in pq.ParquetFile(path).iter_batches(65_536))

    s, n, p = timed(read, repeat, lambda: [me])
    report("local", "read file (no policy)", s, n, p)
    plan = build_plan(POLICY, pq.read_schema(path), keys={"email": bytes.fromhex(KEY_HEX)})

    def through_core() -> int:
        n = 0
        for b in pq.ParquetFile(path).iter_batches(65_536):
            apply_batch(plan, b)
            n += b.num_rows
        return n

    s, n, p = timed(through_core, repeat, lambda: [me])
    report("local", "read file + core (1 thread)", s, n, p)


# -- flight -------------------------------------------------------------------------------------


def flight_section(path: Path, work: Path, repeat: int) -> None:
    import pyarrow.flight as flight

    policy_file = work / "policy.json"
    policy_file.write_text(json.dumps(POLICY))
    env = dict(os.environ, CAPE_KEY_EMAIL=KEY_HEX)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cape_pipelines.cli", "flight", "serve", "--port", "0",
         "--policy", str(policy_file), "--no-auth", "--dataset", f"data={path}",
         "--audit-file", str(work / "flight-audit.jsonl"),
         "--label", f"data={POLICY['label']}"],
        stdout=subprocess.PIPE, env=env, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        uri = line.rsplit(" ", 1)[1].strip()
        from cape_pipelines.flight import ticket_for

        source = pq.read_table(path)

        def get() -> int:
            return flight.connect(uri).do_get(ticket_for("data")).read_all().num_rows

        def exchange() -> int:
            client = flight.connect(uri)
            writer, reader = client.do_exchange(flight.FlightDescriptor.for_path(POLICY["label"]))
            got = [0]

            def drain() -> None:
                for chunk in reader:
                    got[0] += chunk.data.num_rows

            # Read while writing, as any real caller should (both directions flow-controlled).
            writer.begin(source.schema)
            t = threading.Thread(target=drain)
            t.start()
            for batch in source.to_batches(max_chunksize=65_536):
                writer.write_batch(batch)
            writer.done_writing()
            t.join()
            writer.close()
            return source.num_rows

        def concurrently(fn: Callable[[], int], k: int) -> Callable[[], int]:
            def run() -> int:
                out = [0] * k

                def one(i: int) -> None:
                    out[i] = fn()

                threads = [threading.Thread(target=one, args=(i,)) for i in range(k)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                return sum(out)

            return run

        server = lambda: tree(proc.pid)  # noqa: E731
        for k in (1, 2):
            s, n, p = timed(concurrently(get, k), repeat, server)
            report("flight", f"do_get, {k} client(s) [rows out]", s, n, p)
        for k in (1, 2):
            s, n, p = timed(concurrently(exchange, k), repeat, server)
            report("flight", f"do_exchange, {k} client(s) [rows in]", s, n, p)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -- dask ---------------------------------------------------------------------------------------


def dask_section(path: Path, work: Path, repeat: int) -> None:

    for workers in (1, 2):
        _dask_once(path, work, repeat, workers)


def _dask_once(path: Path, work: Path, repeat: int, workers: int) -> None:
    import dask.dataframe as dd
    from distributed import Client

    import cape_pipelines.dask as cape_dask
    from cape_pipelines.audit import NullSink

    root = work / f"dask{workers}"
    root.mkdir()
    cluster = DaskCluster(root, workers=workers, memory_limit="2GB")
    cluster.start()
    runs = iter(range(1_000))
    try:
        with Client(cluster.address, set_as_default=False) as client:
            client.wait_for_workers(workers, timeout=60)

            def run() -> int:
                ddf = dd.read_parquet(str(path), split_row_groups=True)
                out = cape_dask.apply_policy(
                    ddf, POLICY, keys={"email": bytes.fromhex(KEY_HEX)}, audit=NullSink()
                )
                target = out.to_parquet(str(root / f"out{next(runs)}"), compute=False)
                cape_dask.run(out, target, scheduler=client)
                return pq.ParquetFile(path).metadata.num_rows

            def pids() -> list[int]:
                return [p for w in cluster.workers for p in tree(w.pid)]

            s, n, p = timed(run, repeat, pids)
            report("dask", f"{workers} worker process(es) [rows in]", s, n, p)
    finally:
        cluster.stop()


# -- spark --------------------------------------------------------------------------------------

SPARK_DRIVER = """
import json, sys, time
from pyspark.sql import SparkSession
from cape_pipelines.audit import NullSink
from cape_pipelines.spark import apply_policy, read_parquet, write
master, path, out, repeat, policy, key = sys.argv[1:7]
spark = (SparkSession.builder.master(master).appName("bench-scale")
         .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
         .config("spark.ui.enabled", "false").config("spark.executor.memory", "768m")
         .config("spark.executor.cores", "1").config("spark.sql.session.timeZone", "UTC")
         .getOrCreate())
spark.sparkContext.setLogLevel("ERROR")
times = []
for i in range(int(repeat) + 1):
    df = read_parquet(spark, path)
    o = apply_policy(df, json.loads(policy), keys={"email": bytes.fromhex(key)}, audit=NullSink())
    t = time.perf_counter()
    c = write(o, f"{out}/{i}")
    times.append(time.perf_counter() - t)
print(json.dumps({"times": times[1:], "rows_in": c.rows_in}), flush=True)
spark.stop()
"""


def spark_section(path: Path, work: Path, repeat: int) -> None:
    for workers in (1, 2):
        _spark_once(path, work, repeat, workers)


def _spark_once(path: Path, work: Path, repeat: int, workers: int) -> None:
    root = work / f"spark{workers}"
    root.mkdir()
    cluster = SparkStandalone(root, workers=workers, worker_memory="1g")
    cluster.start()
    try:
        driver = subprocess.Popen(
            [sys.executable, "-c", SPARK_DRIVER, cluster.url, str(path), str(root / "out"),
             str(repeat), json.dumps(POLICY), KEY_HEX],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable),
        )  # fmt: skip

        def pids() -> list[int]:
            return [p for i in range(workers) for e in cluster.executors(i) for p in tree(e)]

        with Peak(pids) as peak:
            stdout, stderr = driver.communicate(timeout=1800)
        if driver.returncode != 0:
            raise RuntimeError(f"spark driver failed:\n{stderr[-3000:]}")
        result = json.loads(stdout.strip().splitlines()[-1])
        s = statistics.median(result["times"])
        what = f"standalone, {workers} worker(s) [rows in]"
        report("spark", what, s, result["rows_in"], peak.peak)
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sections", default="local,flight,dask,spark")
    args = ap.parse_args(argv)
    sections = args.sections.split(",")
    with tempfile.TemporaryDirectory(prefix="cape-bench-scale-") as tmp:
        work = Path(tmp)
        path = work / "data.parquet"
        make_data(path, args.rows)
        print(f"rows {args.rows:,}; cpus {os.cpu_count()}; load average {os.getloadavg()}")
        print(f"{'section':8} {'what':34} {'rows/s':>14} {'peak MiB':>9}", flush=True)
        if "local" in sections:
            local(path, args.rows, args.repeat)
        if "flight" in sections:
            flight_section(path, work, args.repeat)
        if "dask" in sections:
            dask_section(path, work, args.repeat)
        if "spark" in sections:
            spark_section(path, work, args.repeat)
        print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
