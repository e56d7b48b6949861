"""Apache Beam example: the bundled customer sample (CSV) -> ApplyPolicy -> Parquet.

Reads the sample dataset and the demo policy that ship with Cape Pipelines,
applies the policy with :class:`cape_pipelines.beam.ApplyPolicy` on the
DirectRunner, and writes Parquet shards. CSV files are parsed by Arrow inside
the pipeline (one table per file) and Parquet input is read with
``ReadFromParquetBatched``, so no step runs Python per row. The keys are the
PUBLIC demo keys of ``cape demo``: never use them for real data; a real
pipeline gets its keys from ``keys=`` or ``CAPE_KEY_<NAME>`` variables.

    python examples/beam_pipeline.py --output /tmp/cape-beam/customers
    python examples/beam_pipeline.py --output /tmp/cape-beam/customers \\
        --direct_running_mode=multi_processing --direct_num_workers=2
"""

from __future__ import annotations

import argparse
import glob
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions

from cape_pipelines.beam import ApplyPolicy
from cape_pipelines.cli import demo_keys, demo_paths


def csv_schema(path: str) -> pa.Schema:
    """The Arrow schema Arrow infers from the CSV's first block (pinned for every file)."""
    with pacsv.open_csv(path) as reader:
        return reader.schema


def read_csv(path: str, schema: pa.Schema) -> pa.Table:
    """One CSV file as one Arrow table, with the column types pinned to ``schema``."""
    options = pacsv.ConvertOptions(column_types=schema)
    return pacsv.read_csv(path, convert_options=options)


def build(
    p: beam.Pipeline,
    source: str,
    policy: Any,
    output_prefix: str,
    *,
    keys: Mapping[str, bytes],
    audit: str,
) -> ApplyPolicy:
    """Wire read -> ApplyPolicy -> write into ``p``; returns the policy step."""
    if source.endswith(".parquet"):
        step = ApplyPolicy.from_parquet_schema(source, policy, keys=keys, audit=audit)
        tables = p | "Read" >> beam.io.ReadFromParquetBatched(source)
    else:
        schema = csv_schema(source)
        step = ApplyPolicy(policy, keys=keys, schema=schema, audit=audit)
        tables = (
            p
            | "Files" >> beam.Create(sorted(glob.glob(source)))
            | "ReadCsv" >> beam.Map(read_csv, schema)
        )
    _ = (
        tables
        | "Protect" >> step
        | "Write"
        >> beam.io.WriteToParquetBatched(
            output_prefix, schema=step.output_schema, file_name_suffix=".parquet"
        )
    )
    return step


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Run the example; returns the Parquet files written."""
    data, demo_policy = demo_paths()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=str(data), help="CSV file/glob or Parquet file/glob")
    parser.add_argument("--policy", default=str(demo_policy), help="policy YAML/JSON file")
    parser.add_argument("--output", required=True, help="output path prefix for Parquet shards")
    parser.add_argument("--audit", default=None, help="JSONL audit file (default: beside output)")
    args, beam_args = parser.parse_known_args(argv)
    audit = args.audit or str(Path(args.output).parent / "audit.jsonl")
    with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
        build(p, args.input, args.policy, args.output, keys=demo_keys(), audit=audit)
    written = sorted(glob.glob(args.output + "*.parquet"))
    rows = sum(pq.read_metadata(f).num_rows for f in written)
    print(f"wrote {rows} rows to {len(written)} file(s) at {args.output}*; audit: {audit}")
    return written


if __name__ == "__main__":
    main()
