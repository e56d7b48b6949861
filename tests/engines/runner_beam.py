"""Beam runners for the cross-engine parity suite: Parquet in, ApplyPolicy, Parquet out.

Each runner writes the input table to a temporary Parquet file (several row
groups, so the pipeline sees several Arrow tables), reads it with
``ReadFromParquetBatched``, applies :class:`~cape_pipelines.beam.ApplyPolicy`
and writes with ``WriteToParquetBatched``, then reads the shards back.

Row order: Beam does not keep the order of elements across bundles and output
shards, so the runner adds a hidden ``int64`` row id (the input position) that
ApplyPolicy carries past the policy unchanged; the result is put back in input
order by that id, which is then removed. No data value is sorted on.
"""

from __future__ import annotations

import glob
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROW_ID = "__cape_parity_row_id__"
MULTI_PROCESS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]

Runner = Callable[[Mapping[str, Any], pa.Table, Mapping[str, bytes] | None], pa.Table]


def run_beam(
    policy: Mapping[str, Any],
    table: pa.Table,
    keys: Mapping[str, bytes] | None = None,
    *,
    options: list[str] | None = None,
    audit: str | None = None,
) -> pa.Table:
    """Run ``policy`` over ``table`` in a Beam pipeline on the DirectRunner; rows in input order."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from cape_pipelines.beam import ApplyPolicy

    with tempfile.TemporaryDirectory(prefix="cape-beam-") as tmp:
        source = os.path.join(tmp, "input.parquet")
        ids = pa.array(range(table.num_rows), pa.int64())
        rows_per_group = max(1, min(100_000, math.ceil(table.num_rows / 3)))
        pq.write_table(table.append_column(ROW_ID, ids), source, row_group_size=rows_per_group)
        step = ApplyPolicy(
            policy,
            keys=keys,
            schema=table.schema,
            audit=audit or os.path.join(tmp, "audit.jsonl"),
            _carry_column=ROW_ID,
        )
        prefix = os.path.join(tmp, "out", "part")
        with beam.Pipeline(options=PipelineOptions(options or [])) as p:
            _ = (
                p
                | "Read" >> beam.io.ReadFromParquetBatched(source)
                | "Policy" >> step
                | "Write"
                >> beam.io.WriteToParquetBatched(
                    prefix, schema=step.output_schema, file_name_suffix=".parquet"
                )
            )
        shards = [pq.read_table(f) for f in sorted(glob.glob(prefix + "*.parquet"))]
        out = pa.concat_tables(shards) if shards else step.output_schema.empty_table()
    ordered = out.take(pc.sort_indices(out, [(ROW_ID, "ascending")]))
    return ordered.drop_columns([ROW_ID])


def _in_process(policy: Mapping[str, Any], table: pa.Table, keys: Any = None) -> pa.Table:
    return run_beam(policy, table, keys)


def _multi_process(policy: Mapping[str, Any], table: pa.Table, keys: Any = None) -> pa.Table:
    return run_beam(policy, table, keys, options=MULTI_PROCESS)


RUNNERS: dict[str, Runner] = {
    "beam-inprocess": _in_process,
    "beam-multiprocess": _multi_process,
}
