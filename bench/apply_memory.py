"""Peak memory of ``cape apply`` over a large Parquet file (a benchmark, not a test).

Generates a Parquet file of about ``--size-mb`` megabytes (default 2048) of
synthetic customer rows, runs ``cape apply`` with a 5-rule policy on it in a
subprocess, and reports the child's peak resident memory
(``ru_maxrss`` from ``os.wait4``), time and throughput.
The target (issue 2) is a peak RSS under 1 GB for a 2 GB input.

    python bench/apply_memory.py                 # 2 GB
    python bench/apply_memory.py --size-mb 200   # quicker check
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROWS_PER_GROUP = 1_000_000
POOL = 2_000_000

FULL_POLICY = """
label: bench-memory
rules:
  - actions:
      - transform: {type: row-redact, condition: "age < 18"}
  - match: {name: email}
    actions:
      - transform: {type: tokenizer, key: {secret: bench-key}, max_token_len: 32}
  - match: {name: ssn}
    actions: [drop]
  - match: {name: salary}
    actions:
      - transform: {type: numeric-perturbation, min: -1000, max: 1000, key: {secret: bench-key}}
  - match: {name: signup}
    actions:
      - transform: {type: date-truncation, frequency: day}
"""

# Only redaction: for a tree where the other transformations have not landed yet.
REDACT_POLICY = """
label: bench-memory-redact
rules:
  - actions:
      - transform: {type: row-redact, condition: "age < 18"}
  - match: {name: ssn}
    actions: [drop]
  - match: {name: phone}
    actions: [drop]
  - actions:
      - transform: {type: row-redact, condition: "country == 'XX'"}
  - match: {names: [notes]}
    actions: [drop]
"""


def _hex_pool(rng: np.random.Generator, n: int, nbytes: int, prefix: str = "") -> pa.Array:
    raw = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    hexed = [prefix + row.tobytes().hex() for row in raw]
    return pa.array(hexed, pa.string())


def generate(path: Path, size_mb: int, seed: int = 7) -> int:
    """Write about ``size_mb`` MB of synthetic rows to ``path``; return the row count."""
    rng = np.random.default_rng(seed)
    emails = pc.binary_join_element_wise(_hex_pool(rng, POOL, 8), "example.com", "@")
    phones = _hex_pool(rng, POOL, 6, "+1-")
    ssns = _hex_pool(rng, POOL, 5)
    notes = _hex_pool(rng, POOL, 24)
    countries = pa.array(["US", "GB", "DE", "FR", "IN", "XX"])
    schema = pa.schema(
        [
            ("id", pa.int64()),
            ("email", pa.string()),
            ("phone", pa.string()),
            ("ssn", pa.string()),
            ("age", pa.int64()),
            ("country", pa.string()),
            ("salary", pa.int64()),
            ("signup", pa.timestamp("us")),
            ("notes", pa.string()),
        ]
    )
    target = size_mb * 1024 * 1024
    rows = 0
    with pq.ParquetWriter(path, schema, compression="snappy") as writer:
        while not path.exists() or path.stat().st_size < target:
            n = ROWS_PER_GROUP

            def pick(pool: pa.Array, n: int = n) -> pa.Array:
                return pool.take(pa.array(rng.integers(0, len(pool), n)))

            table = pa.table(
                {
                    "id": pa.array(np.arange(rows, rows + n, dtype=np.int64)),
                    "email": pick(emails),
                    "phone": pick(phones),
                    "ssn": pick(ssns),
                    "age": pa.array(rng.integers(5, 90, n)),
                    "country": pick(countries),
                    "salary": pa.array(rng.integers(20_000, 200_000, n)),
                    "signup": pa.array(
                        rng.integers(1_600_000_000, 1_750_000_000, n) * 1_000_000
                        + rng.integers(0, 1_000_000, n),
                        pa.timestamp("us"),
                    ),
                    "notes": pick(notes),
                },
                schema=schema,
            )
            writer.write_table(table, row_group_size=ROWS_PER_GROUP)
            rows += n
            # The writer buffers; the size on disk only grows once a row group is flushed.
            print(f"\rgenerated {rows:,} rows", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return rows


def _policy_text(choice: str) -> str:
    if choice == "redact":
        return REDACT_POLICY
    if choice == "full":
        return FULL_POLICY
    from cape_pipelines.transforms import known_types

    needed = {"tokenizer", "numeric-perturbation", "date-truncation"}
    return FULL_POLICY if needed <= set(known_types()) else REDACT_POLICY


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=2048, help="input size (default 2048)")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "cape-bench")
    ap.add_argument("--batch-size", type=int, default=None, help="cape apply --batch-size")
    ap.add_argument("--policy", choices=["auto", "full", "redact"], default="auto")
    ap.add_argument("--keep", action="store_true", help="keep the generated input and output")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    args.dir.mkdir(parents=True, exist_ok=True)
    src = args.dir / f"input-{args.size_mb}mb.parquet"
    if args.generate_only:
        generate(src, args.size_mb)
        return
    if src.exists():
        print(f"reusing {src}", file=sys.stderr)
    else:
        # In a child process: this one must stay small, because a child forked from it
        # starts with (and ru_maxrss counts) the parent's resident memory.
        t0 = time.perf_counter()
        gen = [
            sys.executable,
            __file__,
            "--generate-only",
            "--size-mb",
            str(args.size_mb),
            "--dir",
            str(args.dir),
        ]
        subprocess.run(gen, check=True)
        print(f"generated {src} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    rows = pq.ParquetFile(src).metadata.num_rows
    policy_text = _policy_text(args.policy)
    pol = args.dir / "policy.yaml"
    pol.write_text(policy_text)
    out = args.dir / "output.parquet"
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "cape_pipelines.cli",
        "apply",
        "--policy",
        str(pol),
        "--input",
        str(src),
        "--output",
        str(out),
        "--audit-file",
        str(args.dir / "audit.jsonl"),
        "--no-progress",
    ]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    env = dict(os.environ, CAPE_KEY_BENCH_KEY="42" * 32)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    # wait4 gives this child's own rusage (RUSAGE_CHILDREN would also count the generator).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - t0
    peak_kb = usage.ru_maxrss
    if proc.returncode != 0:
        sys.exit(f"cape apply failed with exit code {proc.returncode}")
    in_mb = src.stat().st_size / 2**20
    out_mb = out.stat().st_size / 2**20
    print(f"policy:        {pol} ({'full' if policy_text is FULL_POLICY else 'redact-only'})")
    print(f"input:         {in_mb:,.0f} MiB, {rows:,} rows")
    print(f"output:        {out_mb:,.0f} MiB")
    print(f"time:          {elapsed:,.1f} s ({rows / elapsed:,.0f} rows/s)")
    print(f"peak RSS:      {peak_kb / 1024:,.0f} MiB (target < 1024 MiB for a 2 GiB input)")
    if not args.keep:
        out.unlink(missing_ok=True)
        src.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
