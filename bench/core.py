"""Benchmark of the core transformations against cape-dataframes and the bare floors.

Prints, for each transformation, rows/s (median of ``--repeat`` runs of wall
time, and of the process's CPU time, which a machine shared with other work
disturbs far less) and the peak extra memory of the run, for Cape Pipelines'
core, cape-dataframes (the library it descends from, from PyPI:
``pip install -e .[bench]``) and the floor (a plain ``hmac.digest`` loop,
``cryptography``'s AESSIV with one cipher object, the bare pyarrow.compute
kernel), side by side, with ratios (of CPU rates). For the AES-SIV cases a
second floor, ``floor-distinct``, runs that AESSIV loop over the column's
distinct values only (the work left once repeats are removed), still reported
per input row. The header gives this core's SHA-256 speed and the HMAC limit it
implies (an HMAC of a short value is 4 compression blocks, 2 with the keyed
states precomputed).

    python bench/core.py                 # 1,000,000 rows, 3 repeats
    python bench/core.py --rows 200000 --only tokenizer-70 --nulls

``pandas-tokenizer-70`` goes through ``apply_policy(policy, df)`` on an
object-dtype frame (binding, plan, conversions and audit record included), with
two more rows: ``string_dtype="string[pyarrow]"`` and ``workers=`` every core
(its CPU column counts the workers' CPU too; read its wall column). The ``vs
ours`` column divides our CPU rate by the row's, ``wall`` our wall rate.

Targets are those of issue 14 (the AES-SIV cases' earlier ">= 50x
cape-dataframes" is still shown by the ratio column). Every measurement runs in
a forked child of the process that holds the data, so the memory column is the
child's own high-water mark above its start.
Slow baselines (cape-dataframes' reversible tokenizer: ~12k rows/s) run on a
slice of ``--slow-rows`` rows and are reported as rows/s of that slice.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cape_pipelines.core import apply_table
from cape_pipelines.plan import build_plan

TOKEN_KEY = b"bench-tokenizer-key-0123456789ab"
SIV_KEY = bytes(range(32))
PRF_KEY = bytes(range(32, 64))
FPE_KEY = bytes(range(64, 80))
KEYS = {"tok": TOKEN_KEY, "siv": SIV_KEY, "prf": PRF_KEY, "fpe": FPE_KEY}


def random_strings(rng: np.random.Generator, count: int) -> pa.Array:
    """``count`` random lowercase strings of 12 to 25 characters, as one Arrow array."""
    lengths = rng.integers(12, 26, size=count)
    offsets = np.zeros(count + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    data = rng.integers(ord("a"), ord("z") + 1, size=int(offsets[-1]), dtype=np.uint8)
    return pa.StringArray.from_buffers(
        count, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data.tobytes())
    )


def with_distinct(rng: np.random.Generator, rows: int, fraction: float) -> pa.Array:
    """``rows`` strings of which ``fraction`` are distinct values, shuffled."""
    distinct = max(1, int(rows * fraction))
    pool = random_strings(rng, distinct)
    picks = np.concatenate([np.arange(distinct), rng.integers(0, distinct, rows - distinct)])
    rng.shuffle(picks)
    return pool.take(pa.array(picks))


def make_table(rows: int, nulls: bool, seed: int = 7) -> pa.Table:
    """The benchmark input: two string columns, an int, a float and a timestamp column."""
    rng = np.random.default_rng(seed)
    cols = {
        "email": with_distinct(rng, rows, 0.70),
        "country": with_distinct(rng, rows, 0.05),
        "age": pa.array(rng.integers(0, 100, rows), pa.int64()),
        "salary": pa.array(rng.normal(50_000, 15_000, rows), pa.float64()),
        "signup": pa.array(
            rng.integers(1_500_000_000_000_000, 1_700_000_000_000_000, rows).astype(
                "datetime64[us]"
            ),
            pa.timestamp("us"),
        ),
        # 16-digit numbers (card-shaped, all distinct in practice) for fpe and mask.
        "card": pc.utf8_lpad(
            pa.array(rng.integers(0, 10**16, rows), pa.int64()).cast(pa.string()), 16, "0"
        ),
    }
    if nulls:
        mask = pa.array(rng.random(rows) < 0.10)
        for name, arr in cols.items():
            cols[name] = pc.if_else(mask, pa.nulls(rows, arr.type), arr)
    return pa.table(cols)


@dataclass(frozen=True)
class Case:
    """One transformation measured three ways."""

    name: str
    column: str
    transform: dict
    target: str
    target_ratio: float | None = None
    target_against: str = "cape-dataframes"
    target_rows_per_s: float | None = None
    input_transform: dict | None = None
    # "pandas": ours is ``apply_policy(policy, df)`` on a pandas frame of the column
    # (object strings, as cape-dataframes' users have them), not the core on Arrow.
    via: str = "core"


CASES = [
    Case(
        "tokenizer-70",
        "email",
        {"type": "tokenizer", "key": {"secret": "tok"}},
        ">= 1.5x cape-dataframes",
        1.5,
    ),
    Case(
        "pandas-tokenizer-70",
        "email",
        {"type": "tokenizer", "key": {"secret": "tok"}},
        ">= 1.5x cape-dataframes",
        1.5,
        via="pandas",
    ),
    Case(
        "tokenizer-5",
        "country",
        {"type": "tokenizer", "key": {"secret": "tok"}},
        ">= 20x cape-dataframes",
        20.0,
    ),
    Case(
        "reversible-tokenizer",
        "email",
        {"type": "reversible-tokenizer", "key": {"secret": "siv"}},
        "within 1.1x of floor-distinct",
        1 / 1.1,
        target_against="floor-distinct",
    ),
    Case(
        "token-reverser",
        "email",
        {"type": "token-reverser", "key": {"secret": "siv"}},
        "within 1.1x of floor-distinct",
        1 / 1.1,
        target_against="floor-distinct",
        input_transform={"type": "reversible-tokenizer", "key": {"secret": "siv"}},
    ),
    Case(
        "numeric-perturbation",
        "salary",
        {"type": "numeric-perturbation", "min": -1000, "max": 1000, "key": {"secret": "prf"}},
        ">= 30M rows/s",
        target_rows_per_s=30e6,
    ),
    Case(
        "date-perturbation",
        "signup",
        {
            "type": "date-perturbation",
            "frequency": "DAY",
            "min": -10,
            "max": 10,
            "key": {"secret": "prf"},
        },
        ">= 30M rows/s",
        target_rows_per_s=30e6,
    ),
    Case(
        "numeric-rounding",
        "salary",
        {"type": "numeric-rounding", "precision": -2},
        "within 1.5x of the pyarrow kernel",
        1 / 1.5,
        target_against="floor",
    ),
    Case(
        "date-truncation",
        "signup",
        {"type": "date-truncation", "frequency": "month"},
        "within 1.5x of the pyarrow kernel",
        1 / 1.5,
        target_against="floor",
    ),
    # Issue 13's families. fpe's floor is only its AES work (10 ECB passes).
    Case(
        "fpe-16-digits",
        "card",
        {"type": "fpe", "key": {"secret": "fpe"}},
        ">= 200k rows/s (one core)",
        target_rows_per_s=200e3,
    ),
    Case(
        "mask-keep-last-4",
        "card",
        {"type": "mask", "keep_last": 4},
        "within 2x of the pyarrow kernels",
        1 / 2,
        target_against="floor",
    ),
    Case(
        "bucket-width-10",
        "age",
        {"type": "bucket", "width": 10},
        "within 2x of the pyarrow kernels",
        1 / 2,
        target_against="floor",
    ),
    Case(
        "bucket-month",
        "signup",
        {"type": "bucket", "unit": "month"},
        "within 2x of the pyarrow kernels",
        1 / 2,
        target_against="floor",
    ),
]


def _policy(case: Case) -> dict:
    return {
        "label": "bench",
        "rules": [{"match": {"name": case.column}, "actions": [{"transform": case.transform}]}],
    }


def _prepare_input(case: Case, table: pa.Table) -> pa.Table:
    """The case's input table (the reverser gets tokens made by the reversible tokenizer)."""
    col = table.select([case.column])
    if case.input_transform is None:
        return col
    pol = {
        "label": "bench-prep",
        "rules": [
            {"match": {"name": case.column}, "actions": [{"transform": case.input_transform}]}
        ],
    }
    out, _ = apply_table(build_plan(pol, col.schema, keys=KEYS), col)
    return out


def ours(case: Case, table: pa.Table) -> Callable[[], object]:
    """Cape Pipelines: plan built once, then the core over the table (or ``apply_policy``)."""
    if case.via == "pandas":
        return _through_pandas(case, table)
    plan = build_plan(_policy(case), table.schema, keys=KEYS)
    return lambda: apply_table(plan, table)


def _through_pandas(case: Case, table: pa.Table, **options: object) -> Callable[[], object]:
    """``apply_policy(policy, df)`` on an object-dtype frame: binding, plan, audit and all."""
    from cape_pipelines.audit import MemorySink
    from cape_pipelines.pandas import apply_policy

    df = table.select([case.column]).to_pandas()
    policy = _policy(case)
    return lambda: apply_policy(policy, df, keys=KEYS, audit=MemorySink(), **options)


def ours_arrow_strings(case: Case, table: pa.Table) -> Callable[[], object] | None:
    """The pandas cases with ``string_dtype="string[pyarrow]"`` (no Python object per token)."""
    if case.via != "pandas":
        return None
    return _through_pandas(case, table, string_dtype="string[pyarrow]")


def ours_all_cores(case: Case, table: pa.Table) -> Callable[[], object] | None:
    """The pandas cases with ``workers=`` this machine's cores (CPU: all processes')."""
    from cape_pipelines.pool import default_workers

    if case.via != "pandas" or default_workers() < 2:
        return None
    return _through_pandas(case, table, workers=default_workers())


def cape_dataframes(case: Case, table: pa.Table) -> Callable[[], object] | None:
    """cape-dataframes' pandas transformation on the same column, as a pandas Series."""
    try:
        from cape_dataframes.pandas import dtypes
        from cape_dataframes.pandas import transformations as t
    except ImportError:
        return None
    series = table.column(case.column).to_pandas()
    name = case.transform["type"]
    if name == "tokenizer":
        fn = t.Tokenizer(key=TOKEN_KEY.decode())
    elif name == "reversible-tokenizer":
        fn = t.ReversibleTokenizer(key=SIV_KEY)
    elif name == "token-reverser":
        fn = t.TokenReverser(key=SIV_KEY)
    elif name == "numeric-perturbation":
        fn = t.NumericPerturbation(dtype=dtypes.Double, min=-1000, max=1000, seed=1)
    elif name == "date-perturbation":
        fn = t.DatePerturbation(frequency="DAY", min=-10, max=10, seed=1)
    elif name == "numeric-rounding":
        fn = t.NumericRounding(dtype=dtypes.Double, precision=-2)
    elif name == "date-truncation":
        fn = t.DateTruncation(frequency="month")
    else:
        return None
    return lambda: fn(series.copy())


def floor(case: Case, table: pa.Table) -> Callable[[], object] | None:
    """The least a correct implementation must do: the bare primitive over every value."""
    name = case.transform["type"]
    arr = table.column(case.column)
    if name == "tokenizer":
        values = [v.encode() if v is not None else None for v in arr.to_pylist()]
        digest = hmac.digest
        return lambda: [
            digest(TOKEN_KEY, v, hashlib.sha256).hex() if v is not None else None for v in values
        ]
    if name in ("reversible-tokenizer", "token-reverser"):
        from cryptography.hazmat.primitives.ciphers.aead import AESSIV

        siv = AESSIV(SIV_KEY)
        if name == "reversible-tokenizer":
            values = [v.encode() if v is not None else None for v in arr.to_pylist()]
            return lambda: [siv.encrypt(v, None).hex() if v is not None else None for v in values]
        tokens = [bytes.fromhex(v) if v is not None else None for v in arr.to_pylist()]
        return lambda: [siv.decrypt(v, None).decode() if v is not None else None for v in tokens]
    if name == "numeric-rounding":
        return lambda: pc.round(arr, -2, round_mode="half_to_even")
    if name == "date-truncation":
        return lambda: pc.floor_temporal(arr, unit="month")
    if name == "fpe":
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        blocks = np.zeros(len(arr) * 16, dtype=np.uint8).tobytes()

        def ten_aes_passes():
            for _ in range(10):
                enc = Cipher(algorithms.AES(FPE_KEY), modes.ECB()).encryptor()
                enc.update(blocks)

        return ten_aes_passes
    if name == "mask":
        star = pa.scalar("*")
        return lambda: pc.binary_join_element_wise(
            pc.binary_repeat(star, pc.subtract(pc.utf8_length(arr), 4)),
            pc.utf8_slice_codeunits(arr, -4),
            "",
        )
    if name == "bucket" and "width" in case.transform:
        # Non-negative ages: truncating division is the floor; the label join.
        def bare_bucket():
            lower = pc.multiply(pc.divide(arr, 10), 10)
            upper = pc.add(lower, 9)
            return pc.binary_join_element_wise(
                lower.cast(pa.string()), upper.cast(pa.string()), "-"
            )

        return bare_bucket
    if name == "bucket":
        return lambda: pc.strftime(arr, format="%Y-%m")
    if name in ("numeric-perturbation", "date-perturbation"):
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        ints = arr.cast(pa.int64()) if name == "date-perturbation" else arr.cast(pa.float64())
        values = np.ascontiguousarray(ints.to_numpy(zero_copy_only=False))

        def prf_noise():
            blocks = np.zeros((len(values), 2), dtype=np.uint64)
            blocks[:, 0] = values.view(np.uint64)
            enc = Cipher(algorithms.AES(PRF_KEY[:16]), modes.ECB()).encryptor()
            out = np.frombuffer(enc.update(blocks.tobytes()), dtype=np.uint64)[::2]
            return values + ((out >> np.uint64(11)) * (2.0**-53) * 2000 - 1000)

        return prf_noise
    return None


def floor_distinct(case: Case, table: pa.Table) -> Callable[[], object] | None:
    """The AES-SIV floor over the column's distinct values only (the same loop as ``floor``)."""
    name = case.transform["type"]
    if name not in ("reversible-tokenizer", "token-reverser"):
        return None
    from cryptography.hazmat.primitives.ciphers.aead import AESSIV

    siv = AESSIV(SIV_KEY)
    unique = pc.unique(table.column(case.column)).to_pylist()
    if name == "reversible-tokenizer":
        values = [v.encode() for v in unique if v is not None]
        return lambda: [siv.encrypt(v, None).hex() for v in values]
    tokens = [bytes.fromhex(v) for v in unique if v is not None]
    return lambda: [siv.decrypt(v, None).decode() for v in tokens]


IMPLS: dict[str, Callable[[Case, pa.Table], Callable[[], object] | None]] = {
    "cape-pipelines": ours,
    "ours, arrow str": ours_arrow_strings,
    "ours, all cores": ours_all_cores,
    "cape-dataframes": cape_dataframes,
    "floor": floor,
    "floor-distinct": floor_distinct,
}


def sha256_blocks_per_second(seconds: float = 0.3) -> float:
    """SHA-256 compression blocks per CPU second on this core (hashing 64 KiB buffers)."""
    chunk = bytes(1 << 16)
    h = hashlib.sha256()
    blocks = 0
    t0 = time.process_time()
    while time.process_time() - t0 < seconds:
        h.update(chunk)
        blocks += len(chunk) // 64
    return blocks / (time.process_time() - t0)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _measure_child(conn, impl: str, case: Case, table: pa.Table, repeat: int) -> None:
    try:
        import psutil

        start_rss = psutil.Process().memory_info().rss
        fn = IMPLS[impl](case, table)
        if fn is None:
            conn.send(("n/a", None, None))
            return
        times = []
        cpu = []
        for _ in range(repeat):
            # Worker processes (``workers=``) count too, once they have ended.
            c0 = time.process_time() + _children_cpu()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() + _children_cpu() - c0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        medians = (statistics.median(times), statistics.median(cpu))
        conn.send(("ok", medians, max(0, peak - start_rss)))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}".replace("\n", " ")[:100], None))
    finally:
        conn.close()


def measure(impl: str, case: Case, table: pa.Table, repeat: int) -> tuple[str, object, object]:
    """Run one implementation in a forked child.

    Returns (status, (median wall seconds, median CPU seconds), peak extra bytes).
    """
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_measure_child, args=(child, impl, case, table, repeat))
    proc.start()
    child.close()
    result = parent.recv()
    proc.join()
    return result


def tokenizer_hash() -> str:
    """Which SHA-256 the tokenizer uses here, found without importing DataFusion.

    Importing it in this process would make every forked measurement fall back
    to hashlib (see cape_pipelines/transforms/_native_sha256.py).
    """
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("datafusion") is None:
        return "hashlib loop (datafusion not installed: pip install cape-pipelines[fast])"
    version = importlib.metadata.version("datafusion")
    return f"DataFusion {version}, native, whole columns (hashlib under 2,048 values)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--slow-rows", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--nulls", action="store_true", help="the 10%% null variant")
    ap.add_argument("--only", default="", help="comma-separated case names")
    args = ap.parse_args(argv)
    only = {s for s in args.only.split(",") if s}

    table = make_table(args.rows, args.nulls)
    blocks = sha256_blocks_per_second()
    print(
        f"# {args.rows:,} rows{' (10% nulls)' if args.nulls else ''}, median of {args.repeat}; "
        f"python {sys.version.split()[0]}, pyarrow {pa.__version__}, {os.cpu_count()} cpus, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"# this core: SHA-256 {blocks / 1e6:.1f}M blocks/s -> HMAC per-core limit "
        f"{blocks / 4 / 1e6:.2f}M values/s (4 blocks), {blocks / 2 / 1e6:.2f}M with "
        "precomputed keyed states (2 blocks)"
    )
    print(f"# tokenizer's SHA-256: {tokenizer_hash()}")
    header = (
        f"{'case':22} {'implementation':16} {'rows/s (wall)':>14} {'rows/s (cpu)':>14} "
        f"{'peak MiB':>9} {'vs ours':>8} {'wall':>7}"
    )
    print(header)
    print("-" * len(header))
    verdicts = []
    for case in CASES:
        if only and case.name not in only:
            continue
        data = _prepare_input(case, table)
        results: dict[str, float] = {}
        walls: dict[str, float] = {}
        for impl in IMPLS:
            slow = impl == "cape-dataframes" and case.transform["type"] in (
                "reversible-tokenizer",
                "token-reverser",
            )
            rows = min(args.slow_rows, args.rows) if slow else args.rows
            status, seconds, peak = measure(impl, case, data.slice(0, rows), args.repeat)
            if status == "n/a":
                continue
            if status != "ok":
                print(f"{case.name:22} {impl:16} {seconds or status!s:>14}")
                continue
            wall, cpu = seconds
            rate = rows / cpu
            results[impl] = rate
            walls[impl] = rows / wall
            ratio = results["cape-pipelines"] / rate if "cape-pipelines" in results else 1.0
            wall_ratio = walls["cape-pipelines"] / walls[impl] if "cape-pipelines" in walls else 1.0
            note = f" (on {rows:,} rows)" if slow else ""
            print(
                f"{case.name:22} {impl:16} {rows / wall:14,.0f} {rate:14,.0f} "
                f"{peak / 2**20:9.1f} {ratio:7.2f}x {wall_ratio:6.2f}x{note}"
            )
        ours_rate = results.get("cape-pipelines")
        if ours_rate is None:
            continue
        if case.target_rows_per_s is not None:
            ok = ours_rate >= case.target_rows_per_s
        elif case.target_against in results:
            ok = ours_rate / results[case.target_against] >= (case.target_ratio or 0)
        else:
            ok = None
        verdicts.append((case.name, case.target, ok))
        if "ours, all cores" in walls and "cape-dataframes" in walls:
            # Not the target's measure (one core each): every core against cape-dataframes' one.
            ratio = walls["ours, all cores"] / walls["cape-dataframes"]
            print(f"{'':22} all cores ÷ cape-dataframes, wall: {ratio:.2f}x")
    print()
    print("targets:")
    for name, target, ok in verdicts:
        mark = "met" if ok else ("missed" if ok is False else "no baseline")
        print(f"  {name:22} {target:36} {mark}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
