"""``cape apply --engine dask``: the input read by Dask, the policy applied by this adapter.

Parquet inputs are read with ``dd.read_parquet`` (Arrow-backed dtypes, so every
type survives the trip through pandas exactly). CSV inputs are read with
``dd.from_map``, one partition per file, each file parsed by the same Arrow CSV
reader and pinned types as the local path: ``dd.read_csv`` parses with pandas,
whose rules differ (``N/A`` in an integer column, fractional seconds, quoted
empty strings), and would not give the same bytes. The frame goes through
:func:`cape_pipelines.dask.apply_policy` with its own records switched off
(``cape apply`` records the run), and the output partitions are computed a few
at a time, in order, and handed back as Arrow batches to the shared writer.
pyproject.toml names it in the ``cape_pipelines.engines`` entry-point group.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import dask.dataframe as dd
import pandas as pd
import pyarrow as pa

from .._engine_files import conform, count_output
from ..core import Counters
from ..inputs import InputSet
from ..io import FileJob
from .apply import COUNTERS_ATTR, apply_policy


def _read_csv_file(path: Path, inputs: InputSet, batch_size: int) -> pd.DataFrame:
    """One CSV file as an Arrow-backed pandas frame (a ``dd.from_map`` partition)."""
    batches = list(inputs.file_batches(path, batch_size))
    table = pa.Table.from_batches(batches, schema=inputs.schema)
    return table.to_pandas(types_mapper=pd.ArrowDtype)


def read_input(inputs: InputSet, batch_size: int) -> dd.DataFrame:
    """The input as a Dask frame whose partitions follow the input's order."""
    if inputs.format == "parquet":
        return dd.read_parquet(
            [str(f) for f in inputs.files],
            columns=inputs.schema.names,
            index=False,
            dtype_backend="pyarrow",
        )
    meta = inputs.schema.empty_table().to_pandas(types_mapper=pd.ArrowDtype)
    return dd.from_map(
        _read_csv_file,
        inputs.files,
        inputs=inputs,
        batch_size=batch_size,
        meta=meta,
        enforce_metadata=False,
    )


def _window() -> int:
    """How many partitions to compute at once: enough to keep the workers busy."""
    try:
        from distributed import default_client

        return max(1, sum(default_client().nthreads().values()))
    except (ImportError, ValueError):
        return max(1, os.cpu_count() or 1)


def apply_files_dask(job: FileJob) -> Iterator[pa.RecordBatch]:
    """The :data:`~cape_pipelines.io.ENGINE_GROUP` function for ``--engine dask``.

    Runs on Dask's current scheduler (threads, or a ``distributed`` client if
    one is active). Memory holds a window of output partitions at a time.
    """
    job.inputs.check_columns()
    frame = apply_policy(read_input(job.inputs, job.batch_size), job.binding.silent())
    parts = frame.to_delayed()
    step = _window()
    for start in range(0, len(parts), step):
        for part in dask.compute(*parts[start : start + step]):
            yield from _output(job, part)


def _output(job: FileJob, part: Any) -> Iterator[pa.RecordBatch]:
    produced = part.attrs.get(COUNTERS_ATTR)
    if produced is None:
        raise RuntimeError("a Dask partition came back without its counters")
    rows_in = int(produced["rows_in"])
    job.counters.rows_in += rows_in
    # What the transformations counted themselves (text-scrub findings) only the adapter knows.
    job.counters.merge(Counters(counts=Counters.from_dict(produced).counts))
    job.progress(rows_in)
    if len(part) == 0:
        return
    part.attrs.pop(COUNTERS_ATTR, None)
    batch = conform(job.plan, pa.Table.from_pandas(part, preserve_index=False))
    count_output(job.counters, job.plan, batch)
    yield batch


__all__ = ["apply_files_dask", "read_input"]
