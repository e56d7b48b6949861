"""Protect the bundled sample customers with Dask: ``ddf.cape.apply(policy)``, then one audited run.

The sample dataset and demo policy are the ones every example shares
(``cape_pipelines/data``); the demo keys are PUBLIC and for the demo only.
The frame stays lazy until :func:`cape_pipelines.dask.compute` (or ``run``),
which is one audited run: a ``run.started`` and a ``run.completed`` record.

    python examples/dask_accessor.py                       # threaded scheduler
    python examples/dask_accessor.py --distributed         # LocalCluster, 2 worker processes
    python examples/dask_accessor.py --output out/customers --audit out/audit.jsonl
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import dask.dataframe as dd
import pandas as pd

import cape_pipelines.dask as cape_dask  # registers the ``cape`` accessors
from cape_pipelines.cli import demo_keys, demo_paths


def main(argv: list[str] | None = None) -> int:
    """Read the sample CSV into 4 partitions, apply the demo policy, compute or write it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distributed", action="store_true", help="use a LocalCluster")
    parser.add_argument("--output", help="write Parquet here instead of collecting the result")
    parser.add_argument("--audit", help="JSONL audit file (default: a temporary file)")
    args = parser.parse_args(argv)

    data, policy = demo_paths()
    ddf = dd.read_csv(data, parse_dates=["birthdate", "signup"]).repartition(npartitions=4)

    audit = Path(args.audit or Path(tempfile.mkdtemp(prefix="cape-dask-")) / "audit.jsonl")
    # Lazy: the plan is built (and every key resolved) now, nothing is computed yet.
    protected = ddf.cape.apply(policy, keys=demo_keys(), audit=audit)
    print("output columns and dtypes (from meta, before any compute):")
    print(protected.dtypes.to_string())

    scheduler: object = "threads"
    cluster = client = None
    if args.distributed:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=2, processes=True, dashboard_address=None)
        client = Client(cluster, set_as_default=False)
        scheduler = client
    try:
        if args.output:
            # One pass writes the files and counts the rows for the audit record.
            cape_dask.run(
                protected, protected.to_parquet(args.output, compute=False), scheduler=scheduler
            )
            print(f"\nwrote {args.output}")
        else:
            result = cape_dask.compute(protected, scheduler=scheduler)
            with pd.option_context("display.width", 200, "display.max_columns", None):
                print("\nfirst rows:")
                print(result.head().to_string(max_colwidth=20))
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()

    done = json.loads(audit.read_text().splitlines()[-1])
    print(
        f"\naudit ({audit}): {done['event']}: {done['rows_in']} rows in, "
        f"{done['rows_out']} out, {done['rows_redacted']} redacted"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
