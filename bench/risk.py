"""Cost of the k-anonymity / l-diversity measurement (cape_pipelines.transforms.risk) on the core.

Prints the median seconds and rows/s of counting equivalence classes over
three quasi-identifiers (with a sensitive column for l-diversity), of merging
the counts of 10 partitions, and of marking the rows below ``k`` (what a
suppression removes), next to the bare ``group_by`` count it is built on.

    python bench/risk.py --rows 1000000

Per-engine costs (Spark groupBy, Dask groupby, Beam CombinePerKey) are not
measured: the report is not wired into engine runs yet.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pyarrow as pa

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    table = make_table(args.rows)
    parts = [table.slice(i * args.rows // 10, args.rows // 10) for i in range(10)]
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
    print(f"# {args.rows:,} rows, {report.classes:,} classes over {QIS}, median of {args.repeat}")
    print(f"{'step':30} {'seconds':>9} {'rows/s':>14}")
    for name, fn in cases:
        s = timed(fn, args.repeat)
        print(f"{name:30} {s:9.3f} {args.rows / s:14,.0f}")
    print(f"report: {report.to_dict()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
