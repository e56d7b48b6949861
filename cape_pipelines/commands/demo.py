"""``cape demo``: the main job on bundled sample data with PUBLIC demo keys.

Also the samples for the README's walk-through (``--write-samples``). The demo
keys are derived from their names: anyone can compute them, so they are for
the demo only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import CapeError
from ..io import apply_files
from .common import EXIT_OK
from .reveal import reveal_policy

DEMO_KEY_NAMES = ("demo-email-key", "demo-name-key", "demo-phone-key", "demo-noise-key")


def demo_keys() -> dict[str, bytes]:
    """PUBLIC demo keys, derived from their names: for ``cape demo`` only, never for real data."""
    return {
        name: hashlib.sha256(
            b"cape-pipelines PUBLIC DEMO KEY, never use for real data: " + name.encode()
        ).digest()
        for name in DEMO_KEY_NAMES
    }


def demo_paths() -> tuple[Path, Path]:
    """The bundled sample dataset and demo policy."""
    data = Path(str(resources.files("cape_pipelines") / "data"))
    return data / "customers.csv", data / "demo_policy.yaml"


def _show(title: str, table: Any, rows: int) -> None:
    try:
        import pandas as pd
    except ImportError:  # pandas is an optional extra; Arrow prints a table too
        print(f"\n{title}")
        print(table.slice(0, rows).to_string(preview_cols=20))
        return

    frame = table.slice(0, rows).to_pandas(integer_object_nulls=True)
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(f"\n{title}")
        print(frame.to_string(index=False, max_colwidth=22))


def run_demo(output: str | None = None, audit_file: str | None = None, rows: int = 5) -> int:
    """The main job on embedded defaults: sample data + demo policy + demo keys."""
    import tempfile

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from ..api import apply_policy
    from ..audit import JsonlSink, MemorySink, MultiSink, Sink

    data, policy = demo_paths()
    keys = demo_keys()
    memory = MemorySink()
    sinks: list[Sink] = [memory]
    if audit_file:
        sinks.append(JsonlSink(audit_file))
    print(
        "Cape Pipelines demo (synthetic data; keys are PUBLIC demo keys, never use them for real)"
    )
    print(f"  data:   {data}")
    print(f"  policy: {policy}")
    _show("Before (first rows of the sample data):", pacsv.read_csv(data), rows)
    with tempfile.TemporaryDirectory(prefix="cape-demo-") as tmp:
        out = Path(output) if output else Path(tmp) / "customers_protected.parquet"
        result = apply_files(policy, data, out, keys=keys, audit=MultiSink(sinks), overwrite=True)
        protected = pq.read_table(out)
        stamped = {
            k.decode(): v.decode()
            for k, v in (protected.schema.metadata or {}).items()
            if k.startswith(b"cape.")
        }
    _show("After (first rows written by the policy):", protected, rows)
    reveal = apply_policy(
        reveal_policy(["phone"], "demo-phone-key"),
        protected.select(["customer_id", "phone"]).slice(0, rows),
        keys=keys,
        audit=MemorySink(),
    )
    _show("A key holder reveals the phone tokens (cape reveal):", reveal, rows)
    c = result.counters
    print(
        f"\n{c.rows_in:,} rows in, {c.rows_out:,} written, "
        f"{c.rows_redacted:,} removed by row-redact"
    )
    print("Parquet metadata: " + json.dumps(stamped, indent=None))
    if output:
        print(f"output kept at {out}")
    print("\nAudit records of this run:")
    for rec in memory.records:
        print(json.dumps(rec, indent=2, sort_keys=True))
    return EXIT_OK


def write_samples(directory: str | os.PathLike[str]) -> list[Path]:
    """Copy the sample data and demo policy into ``directory``, with a keys file of the
    PUBLIC demo keys, so the README's "Using it" commands run as written there."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    data, policy = demo_paths()
    keys = "".join(f"{name}: {value.hex()}\n" for name, value in sorted(demo_keys().items()))
    files = {
        target / "customers.csv": data.read_bytes(),
        target / "policy.yaml": policy.read_bytes(),
        target / "keys.yaml": (
            "# PUBLIC demo keys (cape demo): anyone can derive them; never use for real data.\n"
            + keys
        ).encode(),
    }
    existing = [str(p) for p in files if p.exists()]
    if existing:
        raise CapeError(f"--write-samples: {', '.join(existing)} already exist(s); not replaced")
    for path, content in files.items():
        path.write_bytes(content)
    return list(files)


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.write_samples:
        for path in write_samples(args.write_samples):
            print(f"wrote {path}", file=sys.stderr)
        return EXIT_OK
    return run_demo(output=args.output, audit_file=args.audit_file, rows=args.rows)
