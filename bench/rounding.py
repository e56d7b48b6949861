"""Exact float rounding (``numeric-rounding``) against the bare pyarrow kernel it replaced.

A benchmark, not a test. For each value distribution and precision it reports,
in one run, the median rows/s of ``pc.round(..., round_mode="half_to_even")``
(fast but wrong at large magnitudes, issue 8) and of
:class:`~cape_pipelines.transforms.rounding.NumericRounding` (exact: decimal
half-even of the float's value, then the nearest float), their ratio, and the
share of values the exact path had to send to Python's ``decimal``.

    python bench/rounding.py               # 1,000,000 values, 5 repeats
    python bench/rounding.py --rows 200000
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cape_pipelines.transforms import rounding
from cape_pipelines.transforms.base import ColumnContext


def median_rate(fn: Callable[[], object], rows: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return rows / statistics.median(times)


def slow_share(values: np.ndarray, precision: int) -> float:
    """The fraction of values the exact path computes with ``decimal`` (counted by patching)."""
    calls = 0
    real = rounding._exact_round

    def counting(x: float, p: int) -> object:
        nonlocal calls
        calls += 1
        return real(x, p)

    rounding._exact_round = counting  # type: ignore[assignment]
    try:
        rounding._round_floats(values, precision)
    finally:
        rounding._exact_round = real  # type: ignore[assignment]
    return calls / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n = args.rows
    cases = {
        "salaries U(0, 1e6)": rng.uniform(0, 1e6, n),
        "lognormal(10, 3)": rng.lognormal(10, 3, n),
        "U(-1e12, 1e12)": rng.uniform(-1e12, 1e12, n),
    }
    print(f"{n:,} float64 values, median of {args.repeats}; rows/s in millions")
    print(f"{'values':20} {'precision':>9} {'pc.round':>9} {'exact':>9} {'ratio':>6} {'slow':>7}")
    for label, values in cases.items():
        arr = pa.array(values)
        for precision in (-12, -2, 0, 2, 6, 30):
            t = rounding.NumericRounding(precision=precision)
            ctx = ColumnContext("x")
            kernel = median_rate(
                lambda arr=arr, p=precision: pc.round(arr, p, round_mode="half_to_even"),
                n,
                args.repeats,
            )
            exact = median_rate(lambda t=t, arr=arr, ctx=ctx: t.apply(arr, ctx), n, args.repeats)
            share = slow_share(values, precision)
            print(
                f"{label:20} {precision:>9} {kernel / 1e6:>9.1f} {exact / 1e6:>9.1f} "
                f"{exact / kernel:>6.2f} {share:>7.2%}"
            )


if __name__ == "__main__":
    main()
