"""Output writers for ``cape apply``, and the atomic temp-then-rename every output goes through.

Outputs are written to a temporary file beside the destination and renamed
into place only when the whole run succeeded: a failed or interrupted run
leaves no output behind. Parquet outputs are written in fixed-size row groups
(the bytes do not depend on the engine or the batch size) and carry the
policy's label, version, sha256 and the run id in their key-value metadata.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal, Protocol

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .errors import CapeError, DataError
from .inputs import Format, format_of

TimestampUnit = Literal["us", "ns"]

ROW_GROUP_SIZE = 131_072
"""Rows per Parquet row group of every output (fixed, so the bytes never depend on batching)."""

METADATA_KEYS = ("cape.policy.label", "cape.policy.version", "cape.policy.sha256", "cape.run_id")


class BatchWriter(Protocol):
    """Where output batches go."""

    def write(self, batch: pa.RecordBatch) -> None: ...

    def close(self) -> None: ...


def _file_schema(schema: pa.Schema, timestamp_unit: TimestampUnit) -> pa.Schema:
    if timestamp_unit == "ns":
        return schema
    fields = []
    for f in schema:
        if pa.types.is_timestamp(f.type) and f.type.unit == "ns":
            f = f.with_type(pa.timestamp("us", tz=f.type.tz))
        fields.append(f)
    return pa.schema(fields, metadata=schema.metadata)


class ParquetOut:
    """Writes fixed-size row groups (bytes independent of batching), timestamps Spark can read.

    Nanosecond timestamps are written as microseconds when ``timestamp_unit``
    is ``us`` (Spark cannot read Parquet nanoseconds by default); the cast is
    exact or the run stops, never truncating a value silently.
    """

    def __init__(
        self,
        path: Path,
        schema: pa.Schema,
        metadata: Mapping[str, str],
        *,
        timestamp_unit: TimestampUnit = "us",
        row_group_size: int = ROW_GROUP_SIZE,
    ):
        self.schema = _file_schema(schema, timestamp_unit).with_metadata(dict(metadata))
        self.row_group_size = row_group_size
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._writer = pq.ParquetWriter(
            path, self.schema, compression="snappy", allow_truncated_timestamps=False
        )
        self._rows_written = 0

    def _conform(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if batch.schema.equals(self.schema, check_metadata=False):
            return batch
        arrays = []
        for f, arr in zip(self.schema, batch.columns, strict=True):
            if not arr.type.equals(f.type):
                try:
                    arr = arr.cast(f.type, safe=True)
                except pa.ArrowInvalid:
                    raise DataError(
                        f"column {f.name!r} has timestamps with sub-microsecond precision; "
                        "Spark cannot read nanoseconds from Parquet, so they are written as "
                        "microseconds, which would lose data: pass --timestamp-unit ns to keep them"
                    ) from None
            arrays.append(arr)
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        self._pending.append(self._conform(batch))
        self._pending_rows += batch.num_rows
        while self._pending_rows >= self.row_group_size:
            self._flush(self.row_group_size)

    def _flush(self, rows: int) -> None:
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        head = table.slice(0, rows).combine_chunks()
        self._writer.write_table(head, row_group_size=rows)
        rest = table.slice(rows)
        self._pending = rest.combine_chunks().to_batches() if rest.num_rows else []
        self._pending_rows = rest.num_rows
        self._rows_written += rows

    def close(self) -> None:
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._writer.close()

    def abort(self) -> None:
        """Close the file handle without finishing (the caller deletes the file)."""
        with contextlib.suppress(Exception):
            self._writer.close()


class CsvOut:
    """Writes CSV with a header line; nulls as empty fields."""

    def __init__(self, path: Path, schema: pa.Schema, delimiter: str = ","):
        self._writer = pacsv.CSVWriter(
            str(path), schema, write_options=pacsv.WriteOptions(delimiter=delimiter)
        )

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)

    def close(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        """Close the file handle without finishing (the caller deletes the file)."""
        with contextlib.suppress(Exception):
            self._writer.close()


@contextlib.contextmanager
def open_writer(
    fmt: Format,
    path: Path,
    schema: pa.Schema,
    metadata: Mapping[str, str],
    timestamp_unit: TimestampUnit = "us",
    delimiter: str = ",",
) -> Iterator[ParquetOut | CsvOut]:
    """A writer of ``fmt`` to ``path``: finished if the block succeeds, else abandoned.

    On any exception the file handle is closed without finishing the file
    (the caller's :func:`atomic_path` then deletes it) and the exception
    propagates. ``metadata`` goes into a Parquet file's key-value metadata.
    """
    writer: ParquetOut | CsvOut
    if fmt == "parquet":
        writer = ParquetOut(path, schema, metadata, timestamp_unit=timestamp_unit)
    else:
        writer = CsvOut(path, schema, delimiter)
    try:
        yield writer
        writer.close()
    except BaseException:
        writer.abort()
        raise


@contextlib.contextmanager
def atomic_path(path: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed to ``path`` only if the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary file is
    removed and ``path`` is left as it was.
    """
    if path.is_dir():
        raise IsADirectoryError(f"output {path} is a directory; give a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output {path} already exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.cape-tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def output_format(path: Path, format: Format | None) -> Format:
    """The output format: ``format`` if given, else the one ``path``'s name announces."""
    fmt = format or format_of(path)
    if fmt is None:
        raise CapeError(
            f"cannot tell the output format from {path.name!r}; name it .csv or .parquet, "
            "or pass --format csv|parquet"
        )
    if fmt == "csv" and path.name.lower().endswith((".gz", ".bz2")):
        raise CapeError("compressed CSV output is not supported; write .csv or .parquet")
    return fmt


def read_output_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``cape.*`` key-value metadata stamped on an output Parquet file."""
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if k.decode().startswith("cape.")}


__all__ = [
    "METADATA_KEYS",
    "ROW_GROUP_SIZE",
    "BatchWriter",
    "CsvOut",
    "ParquetOut",
    "TimestampUnit",
    "atomic_path",
    "open_writer",
    "output_format",
    "read_output_metadata",
]
