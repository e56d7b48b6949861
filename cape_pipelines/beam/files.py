"""``cape apply --engine beam``: the input read inside a Beam pipeline, the policy by ApplyPolicy.

The pipeline runs on the DirectRunner, in this process. Its source is the list
of the input's read units (a Parquet row group, or a whole CSV file); a DoFn
reads each with the same Arrow readers and types as the local path and emits
Arrow tables, which :class:`~cape_pipelines.beam.ApplyPolicy` (its records
switched off: ``cape apply`` records the run) transforms with no per-row
Python. ``ReadFromParquetBatched`` is not used: it does not say where in the
input a table came from, and Beam does not keep element order.

Order is restored without looking at any data value: each row carries a
hidden ``int64`` row id (file index in the high bits, row number in the file
below), which ApplyPolicy carries past the policy, as the parity suite's Beam
runner does. Each output table (one per input table, its rows in order) is
written to a scratch directory under the id of its first row; the driver reads
them back in id order, so it holds one table at a time, and hands them to the
shared writer. The input row count comes from the pipeline too: the read DoFn
counts the rows it emits and a global combine sums them. pyproject.toml names it in the
``cape_pipelines.engines`` entry-point group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions

from .._engine_files import conform, count_output, first_line
from ..core import Counters
from ..errors import CapeError, DataError
from ..inputs import InputSet
from ..io import FileJob
from ..seam import Binding
from .apply import ApplyPolicy

ROW_ID = "__cape_files_row_id__"
FILE_SHIFT = 40
"""Row ids are ``file_index << FILE_SHIFT | row_in_file``: 2**40 rows per file, 2**23 files."""

_ROWS_IN_TAG = "rows_in"
_ROWS_IN_FILE = "rows_in.json"
# The adapter's own records, kept only for what the transformations counted (text-scrub).
_RECORDS_FILE = "records.jsonl"


@dataclass(frozen=True)
class ReadUnit:
    """One piece of the input read by one DoFn call: a Parquet row group or a whole CSV file."""

    file_index: int
    path: str
    row_group: int | None = None
    first_row: int = 0


def read_units(inputs: InputSet) -> list[ReadUnit]:
    """The input's read units, in input order (Parquet row groups from the footers)."""
    units = []
    for i, path in enumerate(inputs.files):
        if inputs.format == "parquet":
            meta = pq.ParquetFile(path).metadata
            first = 0
            for rg in range(meta.num_row_groups):
                units.append(ReadUnit(i, str(path), rg, first))
                first += meta.row_group(rg).num_rows
        else:
            units.append(ReadUnit(i, str(path)))
    return units


class ReadUnitFn(beam.DoFn):
    """Read one unit as Arrow tables of at most ``batch_size`` rows, each with its row ids."""

    def __init__(self, inputs: InputSet, batch_size: int):
        self.inputs = inputs
        self.batch_size = batch_size

    def process(self, unit: ReadUnit) -> Iterator[Any]:
        path = Path(unit.path)
        if unit.row_group is None:
            batches = self.inputs.file_batches(path, self.batch_size)
        else:
            pf = pq.ParquetFile(path)
            batches = pf.iter_batches(
                batch_size=self.batch_size,
                row_groups=[unit.row_group],
                columns=self.inputs.schema.names,
            )
        row = (unit.file_index << FILE_SHIFT) + unit.first_row
        rows = 0
        for batch in batches:
            ids = pa.array(range(row, row + batch.num_rows), pa.int64())
            table = pa.Table.from_batches([batch]).append_column(ROW_ID, ids)
            row += batch.num_rows
            rows += batch.num_rows
            yield table
        yield beam.pvalue.TaggedOutput(_ROWS_IN_TAG, rows)


class WriteTableFn(beam.DoFn):
    """Write one output table to the scratch directory, named by its first row id."""

    def __init__(self, directory: str):
        self.directory = directory

    def process(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        first = table.column(ROW_ID)[0].as_py()
        final = os.path.join(self.directory, f"{first:020d}.arrow")
        # Written whole, then renamed: a retried bundle replaces the file, never half-writes it.
        tmp = f"{final}.{uuid.uuid4().hex}.tmp"
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, final)


class WriteCountFn(beam.DoFn):
    """Write the run's input row count (one element, after the global combine)."""

    def __init__(self, directory: str):
        self.directory = directory

    def process(self, rows: int) -> None:
        with open(os.path.join(self.directory, _ROWS_IN_FILE), "w", encoding="utf-8") as fh:
            json.dump({"rows_in": int(rows)}, fh)


def run_pipeline(
    inputs: InputSet,
    policy: Binding,
    directory: str,
    *,
    batch_size: int,
    options: list[str] | None = None,
) -> None:
    """Run the Beam pipeline that reads ``inputs``, applies the policy and fills ``directory``."""
    records = os.path.join(directory, _RECORDS_FILE)
    step = ApplyPolicy(
        dataclasses.replace(policy.silent(), audit=records),
        schema=inputs.schema,
        batch_size=batch_size,
        _carry_column=ROW_ID,
    )
    with beam.Pipeline(options=PipelineOptions(options or [])) as p:
        read = (
            p
            | "Units" >> beam.Create(read_units(inputs))
            | "Read"
            >> beam.ParDo(ReadUnitFn(inputs, batch_size))
            .with_output_types(pa.Table)
            .with_outputs(_ROWS_IN_TAG, main="tables")
        )
        _ = read.tables | "Policy" >> step | "Write" >> beam.ParDo(WriteTableFn(directory))
        _ = (
            read[_ROWS_IN_TAG]
            | "CountRows" >> beam.CombineGlobally(sum)
            | "WriteCount" >> beam.ParDo(WriteCountFn(directory))
        )


def _provided_counts(directory: str) -> dict[str, dict[str, int]]:
    """What the transformations counted, from the adapter's ``run.completed`` in ``directory``."""
    path = os.path.join(directory, _RECORDS_FILE)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            if record.get("event") == "run.completed":
                return dict(record.get("counts", {}))
    return {}


def _read_back(directory: str) -> Iterator[pa.Table]:
    """The output tables in row id order, each with its rows in order."""
    for name in sorted(n for n in os.listdir(directory) if n.endswith(".arrow")):
        with pa.memory_map(os.path.join(directory, name)) as source:
            table = pa.ipc.open_file(source).read_all()
        ids = table.column(ROW_ID)
        if len(ids) > 1 and not pc.all(pc.greater(ids[1:], ids[:-1])).as_py():
            table = table.take(pc.sort_indices(ids))
        yield table.drop_columns([ROW_ID])


@contextlib.contextmanager
def _quiet_beam() -> Iterator[None]:
    """Beam logs a failing DoFn's traceback before re-raising its error; the error is
    reported once, by ``cape``, so Beam's own log of it is held back (``--debug`` keeps it)."""
    logger = logging.getLogger("apache_beam")
    if logging.getLogger("cape_pipelines").isEnabledFor(logging.DEBUG):
        yield
        return
    saved = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(saved)


def _cape_error(exc: Exception) -> CapeError:
    """A one-line error for an exception a DoFn raised (Beam appends the step's name)."""
    text = first_line(str(exc))
    text = text.split(" [while running", 1)[0]
    if isinstance(exc, CapeError):
        return type(exc)(text)
    return DataError(f"Beam failed: {type(exc).__name__}: {text[:300]}")


def apply_files_beam(job: FileJob) -> Iterator[pa.RecordBatch]:
    """The :data:`~cape_pipelines.io.ENGINE_GROUP` function for ``--engine beam``.

    The whole pipeline runs first (its output waits in a scratch directory
    under the system's temporary directory, removed afterwards); the batches
    are then read back in input order.
    """
    plan, counters = job.plan, job.counters
    job.inputs.check_columns()
    directory = tempfile.mkdtemp(prefix="cape-beam-")
    try:
        try:
            with _quiet_beam():
                run_pipeline(job.inputs, job.binding, directory, batch_size=job.batch_size)
        except CapeError as exc:
            raise _cape_error(exc) from None
        except Exception as exc:
            # Beam re-raises a DoFn's error wrapped, or as the original type with its step name.
            cause = exc.__cause__ if isinstance(exc.__cause__, CapeError) else exc
            raise _cape_error(cause) from None
        with open(os.path.join(directory, _ROWS_IN_FILE), encoding="utf-8") as fh:
            rows_in = int(json.load(fh)["rows_in"])
        counters.merge(Counters(counts=_provided_counts(directory)))
        for table in _read_back(directory):
            for produced in table.to_batches(max_chunksize=job.batch_size):
                batch = conform(plan, produced)
                count_output(counters, plan, batch)
                yield batch
        counters.rows_in += rows_in
        job.progress(rows_in)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


__all__ = ["ROW_ID", "ReadUnit", "apply_files_beam", "read_units", "run_pipeline"]
