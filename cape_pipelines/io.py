"""Streaming file input and output for ``cape apply``: CSV and Parquet, files or directories.

Inputs are read batch by batch (``pyarrow.csv.open_csv``,
``ParquetFile.iter_batches``) so memory stays bounded whatever the input's
size; the plan is built once from the input's schema (for CSV: inferred from
the first block of the first file, then fixed for every later block and file,
so a column's type never changes half-way). Outputs are written to a temporary
file beside the destination and renamed into place only when the whole run
succeeded: a failed run leaves no output behind. Parquet outputs carry the
policy's label, version, sha256 and the run id in their key-value metadata.

The work itself goes through :data:`ENGINES`, a small table of engine
functions (``pandas``, the local Arrow path, built in); engine packages add
their own with :func:`register_engine`. Every engine hands its output batches,
in input order, to the same writer, which writes fixed-size row groups, so the
output file's bytes do not depend on the engine or the batch size.

>>> from cape_pipelines.io import apply_files
>>> keys = {"email-key": b"..."}
>>> apply_files("policy.yaml", "in.csv", "out.parquet", keys=keys)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, Protocol

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .audit import AuditTarget, RunContext
from .core import Counters, apply_batches
from .errors import CapeError, DataError, TransformError
from .keys import KeyResolver
from .plan import Plan, build_plan
from .policy.load import PolicySource, load_policy
from .policy.models import Policy

Format = Literal["csv", "parquet"]
TimestampUnit = Literal["us", "ns"]

DEFAULT_BATCH_SIZE = 65_536
"""Rows per batch handed to the core."""

ROW_GROUP_SIZE = 131_072
"""Rows per Parquet row group of every output (fixed, so the bytes never depend on batching)."""

CSV_INFER_BLOCK = 1 << 20
"""Bytes of the first CSV file from which column types are inferred."""

METADATA_KEYS = ("cape.policy.label", "cape.policy.version", "cape.policy.sha256", "cape.run_id")

_SUFFIXES: dict[str, Format] = {
    ".csv": "csv",
    ".csv.gz": "csv",
    ".csv.bz2": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def format_of(path: str | os.PathLike[str]) -> Format | None:
    """The format a file name announces (``.csv``, ``.csv.gz``, ``.parquet``, ``.pq``), or None."""
    name = Path(path).name.lower()
    for suffix, fmt in sorted(_SUFFIXES.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            return fmt
    return None


_TIMESTAMP_RE = re.compile(r"timestamp\[(s|ms|us|ns)(?:,\s*tz=([^\]]+))?\]")


def parse_arrow_type(text: str) -> pa.DataType:
    """An Arrow type from its name: ``string``, ``int64``, ``float64``, ``bool``, ``date``,
    ``date32``, ``timestamp[us]``, ``timestamp[us, tz=UTC]``, ...

    Used to pin CSV column types (``--csv-type zip=string``).
    """
    name = text.strip()
    if name == "date":
        return pa.date32()
    m = _TIMESTAMP_RE.fullmatch(name)
    if m:
        return pa.timestamp(m.group(1), tz=m.group(2).strip() if m.group(2) else None)
    try:
        return pa.type_for_alias(name)
    except (ValueError, KeyError):
        raise ValueError(
            f"unknown type {name!r}; use string, int64, float64, bool, date, "
            "timestamp[s|ms|us|ns] or timestamp[us, tz=UTC]"
        ) from None


@dataclass(frozen=True)
class CsvOptions:
    """How CSV inputs are parsed.

    ``column_types`` pins the type of some columns (others are inferred from
    the first block of the first file, then fixed for the whole run).
    """

    delimiter: str = ","
    column_types: Mapping[str, pa.DataType] = field(default_factory=dict)


@dataclass
class InputSet:
    """The files of one input (a file, or a directory of files of one format), in a fixed order."""

    root: Path
    format: Format
    files: list[Path]
    csv: CsvOptions = field(default_factory=CsvOptions)
    _schema: pa.Schema | None = field(default=None, repr=False)

    @property
    def schema(self) -> pa.Schema:
        """The input schema the plan is built on (read from footers or the first CSV block)."""
        if self._schema is None:
            self._schema = (
                self._parquet_schema() if self.format == "parquet" else self._csv_schema()
            )
        return self._schema

    def total_rows(self) -> int | None:
        """Total row count when the format records it (Parquet footers), else None."""
        if self.format != "parquet":
            return None
        total = 0
        for f in self.files:
            try:
                total += _parquet_file(f).metadata.num_rows
            except (pa.ArrowInvalid, OSError) as exc:
                raise DataError(f"{f}: not a readable Parquet file: {_first_line(exc)}") from None
        return total

    def _parquet_schema(self) -> pa.Schema:
        first = self.files[0]
        try:
            schema = _parquet_file(first).schema_arrow
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{first}: not a readable Parquet file: {_first_line(exc)}") from None
        return schema.remove_metadata()

    def _csv_schema(self) -> pa.Schema:
        first = self.files[0]
        pinned = dict(self.csv.column_types)
        try:
            reader = pacsv.open_csv(
                first,
                read_options=pacsv.ReadOptions(block_size=CSV_INFER_BLOCK, use_threads=False),
                parse_options=_parse_options(self.csv),
                convert_options=pacsv.ConvertOptions(column_types=pinned),
            )
        except pa.ArrowInvalid as exc:
            raise _csv_error(first, exc, self.csv, None) from None
        with contextlib.closing(reader):
            schema = reader.schema
        unknown = sorted(set(pinned) - set(schema.names))
        if unknown:
            raise DataError(f"{first}: pinned CSV column(s) not in the file: {', '.join(unknown)}")
        # A column empty in the whole first block infers as `null`; string is the only
        # type every later value can be read as.
        fields = [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in schema]
        return pa.schema(fields)

    def batches(
        self, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> Iterator[tuple[Path, pa.RecordBatch]]:
        """Every batch of every file, in order, with the file it came from."""
        for f in self.files:
            for batch in self.file_batches(f, batch_size):
                yield f, batch

    def file_batches(
        self, path: Path, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> Iterator[pa.RecordBatch]:
        """The batches of one file (at most ``batch_size`` rows each), checked for its columns."""
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        if self.format == "parquet":
            yield from self._parquet_batches(path, batch_size)
        else:
            yield from self._csv_batches(path, batch_size)

    def check_columns(self) -> None:
        """Check every file's column names against the first file's (footers and CSV headers
        only), so an engine that reads files in parallel fails before any data work."""
        for path in self.files[1:]:
            if self.format == "parquet":
                try:
                    names = _parquet_file(path).schema_arrow.names
                except (pa.ArrowInvalid, OSError) as exc:
                    raise DataError(
                        f"{path}: not a readable Parquet file: {_first_line(exc)}"
                    ) from None
            else:
                try:
                    reader = pacsv.open_csv(
                        path,
                        read_options=pacsv.ReadOptions(use_threads=False),
                        parse_options=_parse_options(self.csv),
                        convert_options=pacsv.ConvertOptions(
                            column_types={f.name: f.type for f in self.schema}
                        ),
                    )
                except pa.ArrowInvalid as exc:
                    raise _csv_error(path, exc, self.csv, self.schema) from None
                with contextlib.closing(reader):
                    names = reader.schema.names
            self._check_names(path, names)

    def _check_names(self, path: Path, names: Sequence[str]) -> None:
        expected = self.schema.names
        if list(names) == list(expected):
            return
        extra = [n for n in names if n not in expected]
        missing = [n for n in expected if n not in names]
        if extra or missing:
            parts = []
            if missing:
                parts.append(f"lacks column(s) {', '.join(map(repr, missing))}")
            if extra:
                parts.append(f"has extra column(s) {', '.join(map(repr, extra))}")
            raise DataError(
                f"{path}: {' and '.join(parts)} compared with {self.files[0]}; "
                "every file of one input must have the same columns"
            )

    def _parquet_batches(self, path: Path, batch_size: int) -> Iterator[pa.RecordBatch]:
        try:
            pf = _parquet_file(path)
            self._check_names(path, pf.schema_arrow.names)
            yield from pf.iter_batches(batch_size=batch_size)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{path}: cannot read Parquet: {_first_line(exc)}") from None

    def _csv_batches(self, path: Path, batch_size: int) -> Iterator[pa.RecordBatch]:
        schema = self.schema
        # Blocks of roughly one batch: memory follows --batch-size; types are fixed, so the
        # block size cannot change them.
        block = max(1 << 20, min(64 << 20, batch_size * 256))
        try:
            reader = pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=block, use_threads=False),
                parse_options=_parse_options(self.csv),
                convert_options=pacsv.ConvertOptions(column_types={f.name: f.type for f in schema}),
            )
            with contextlib.closing(reader):
                self._check_names(path, reader.schema.names)
                for batch in reader:
                    for start in range(0, batch.num_rows, batch_size):
                        yield batch.slice(start, batch_size)
        except pa.ArrowInvalid as exc:
            raise _csv_error(path, exc, self.csv, schema) from None


def _parquet_file(path: Path) -> pq.ParquetFile:
    # A small read buffer streams each column chunk page by page, so a huge row group
    # does not have to sit in memory whole.
    return pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)


def _parse_options(opts: CsvOptions) -> pacsv.ParseOptions:
    return pacsv.ParseOptions(delimiter=opts.delimiter)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


_PARSE_RE = re.compile(r"Expected (\d+) columns, got (\d+)")
_CONVERT_RE = re.compile(r"In CSV column #(\d+): (?:Row #(\d+): )?CSV conversion error to ([^:]+):")


def _csv_error(
    path: Path, exc: BaseException, opts: CsvOptions, schema: pa.Schema | None
) -> DataError:
    """A DataError naming the file, the line and the column, never the offending value."""
    text = str(exc)
    m = _PARSE_RE.search(text)
    if m:
        expected, found = int(m.group(1)), int(m.group(2))
        line = _find_bad_line(path, opts.delimiter, expected)
        where = f"line {line}" if line is not None else "a row"
        return DataError(
            f"{path}: malformed CSV at {where}: expected {expected} columns, found {found}"
        )
    m = _CONVERT_RE.search(text)
    if m:
        col_index, row, type_name = int(m.group(1)), m.group(2), m.group(3)
        col = schema.names[col_index] if schema is not None and col_index < len(schema) else None
        where = f"line {row}" if row else "a row"
        col_text = f"column {col!r}" if col else f"column #{col_index + 1}"
        pinned = col is not None and col in opts.column_types
        hint = (
            "its type is pinned"
            if pinned
            else "its type was inferred from the first rows; pin another with "
            f"--csv-type {col or 'COLUMN'}=string"
        )
        return DataError(f"{path}: {where}, {col_text}: value is not a valid {type_name} ({hint})")
    return DataError(f"{path}: cannot read CSV: {_first_line(exc)}")


def _find_bad_line(path: Path, delimiter: str, expected: int) -> int | None:
    """The line number of the first record whose field count is wrong (error path only)."""
    try:
        with pa.input_stream(str(path), compression="detect") as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")
            reader = csv.reader(text, delimiter=delimiter)
            for record in reader:
                if record and len(record) != expected:
                    return reader.line_num
    except (OSError, csv.Error, pa.ArrowException):
        return None
    return None


def open_inputs(
    path: str | os.PathLike[str],
    *,
    format: Format | None = None,
    csv_options: CsvOptions | None = None,
) -> InputSet:
    """The input at ``path``: one CSV/Parquet file, or a directory of them (searched recursively).

    In a directory, hidden files and names starting with ``_`` (``_SUCCESS``)
    are skipped, files are taken in sorted path order, and all must be of one
    format. Raises :class:`DataError` if there is nothing to read.
    """
    root = Path(path)
    opts = csv_options or CsvOptions()
    if not root.exists():
        raise DataError(f"input {root} does not exist")
    if root.is_file():
        fmt = format or format_of(root)
        if fmt is None:
            raise DataError(
                f"cannot tell the format of {root} from its name; "
                "name it .csv or .parquet, or pass the input format"
            )
        return InputSet(root, fmt, [root], opts)
    found: dict[Format, list[Path]] = {"csv": [], "parquet": []}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).parts
        if any(part.startswith((".", "_")) for part in rel) or not p.is_file():
            continue
        fmt = format_of(p)
        if fmt is not None and (format is None or fmt == format):
            found[fmt].append(p)
    kinds = [k for k, v in found.items() if v]
    if not kinds:
        raise DataError(f"input directory {root} holds no CSV or Parquet files")
    if len(kinds) > 1:
        raise DataError(
            f"input directory {root} mixes CSV and Parquet files; keep one format per input"
        )
    return InputSet(root, kinds[0], found[kinds[0]], opts)


# -- progress -------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on a terminal; silent when the stream is not one."""

    def __init__(self, stream: IO[str] | None, total: int | None, label: str = "cape apply"):
        self.stream = stream
        self.total = total
        self.label = label
        self.rows = 0
        self._last = 0.0
        self._shown = False

    @classmethod
    def auto(cls, total: int | None, enabled: bool | None = None) -> Progress:
        """A bar on stderr if ``enabled`` (None: only when stderr is a terminal)."""
        stream = sys.stderr
        if enabled is None:
            enabled = bool(getattr(stream, "isatty", lambda: False)())
        return cls(stream if enabled else None, total)

    def update(self, rows: int) -> None:
        """Count ``rows`` more rows read; redraw at most a few times a second."""
        self.rows += rows
        if self.stream is None:
            return
        now = time.monotonic()
        if now - self._last >= 0.2:
            self._last = now
            self._draw()

    def _draw(self) -> None:
        assert self.stream is not None
        if self.total:
            frac = min(1.0, self.rows / self.total)
            width = 30
            filled = int(frac * width)
            bar = "#" * filled + "-" * (width - filled)
            line = f"{self.label} [{bar}] {frac:4.0%} {self.rows:,}/{self.total:,} rows"
        else:
            line = f"{self.label} {self.rows:,} rows"
        self.stream.write("\r" + line)
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        """Draw the final state and end the line (only if anything was drawn)."""
        if self.stream is None:
            return
        self._draw()
        self.stream.write("\n")
        self.stream.flush()


# -- writers --------------------------------------------------------------------------------


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


# -- engines --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnginePolicy:
    """What an engine adapter needs to build its own plan: the policy, the run's key
    resolver (the very one ``plan`` was built with, so every key, and a per-run random
    key, resolves to the same bytes) and the column tags."""

    policy: Policy
    resolver: KeyResolver
    column_tags: Mapping[str, Sequence[str]] = field(default_factory=dict)


class EngineFn(Protocol):
    """An engine: applies ``plan`` to every batch of ``inputs`` and yields the output batches
    in input order, adding each batch's counts into ``counters`` and its input rows into
    ``progress``. The caller writes the batches (so every engine gives the same file).
    ``policy`` is for engines that run the policy through their own adapter."""

    def __call__(
        self,
        plan: Plan,
        inputs: InputSet,
        *,
        batch_size: int,
        counters: Counters,
        progress: Progress,
        policy: EnginePolicy,
    ) -> Iterator[pa.RecordBatch]: ...


def _apply_files_local(
    plan: Plan,
    inputs: InputSet,
    *,
    batch_size: int,
    counters: Counters,
    progress: Progress,
    policy: EnginePolicy | None = None,
) -> Iterator[pa.RecordBatch]:
    """The built-in engine: the core over the input's batches, in this process."""
    for path in inputs.files:
        # Rows of this file read so far and the size of the current batch, so that an error
        # can say which rows of the file it is about (transformations count within a batch).
        where = {"start": 0, "rows": 0}

        def counted(p: Path = path, w: dict[str, int] = where) -> Iterator[pa.RecordBatch]:
            for batch in inputs.file_batches(p, batch_size):
                w["start"] += w["rows"]
                w["rows"] = batch.num_rows
                progress.update(batch.num_rows)
                yield batch

        try:
            yield from apply_batches(plan, counted(), counters)
        except TransformError as exc:
            first, last = where["start"] + 1, where["start"] + where["rows"]
            raise TransformError(
                f"{path}, in the batch of data rows {first}-{last}: {exc}"
            ) from None


ENGINES: dict[str, EngineFn] = {"pandas": _apply_files_local}
"""Engine name -> function; ``cape apply --engine NAME`` picks one."""

_OPTIONAL_ENGINES = ("beam", "dask", "spark")


def register_engine(name: str, fn: EngineFn) -> None:
    """Make ``fn`` available as ``cape apply --engine name`` (engine packages call this)."""
    ENGINES[name] = fn


def get_engine(name: str) -> EngineFn:
    """The engine called ``name``; an optional one is imported on first use
    (``cape_pipelines.<name>.files`` registers it). Unknown names list the known ones."""
    if name not in ENGINES and name in _OPTIONAL_ENGINES:
        try:
            __import__(f"cape_pipelines.{name}.files")
        except ImportError as exc:
            raise CapeError(
                f"engine {name!r} is not available ({_first_line(exc)}); install the '{name}' extra"
            ) from None
    try:
        return ENGINES[name]
    except KeyError:
        raise CapeError(
            f"unknown engine {name!r}; available: {', '.join(sorted(ENGINES))}"
        ) from None


# -- the whole job --------------------------------------------------------------------------


@dataclass
class ApplyResult:
    """What one :func:`apply_files` run did."""

    output: Path
    run_id: str
    counters: Counters
    plan: Plan


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


def apply_files(
    policy: PolicySource,
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    keys: Mapping[str, bytes | str] | None = None,
    resolver: KeyResolver | None = None,
    audit: AuditTarget = None,
    format: Format | None = None,
    input_format: Format | None = None,
    csv_options: CsvOptions | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    engine: str = "pandas",
    timestamp_unit: TimestampUnit = "us",
    overwrite: bool = False,
    progress: bool | None = False,
    run_id: str | None = None,
    policy_source: str | None = None,
    column_tags: Mapping[str, Sequence[str]] | None = None,
) -> ApplyResult:
    """Apply ``policy`` to a CSV/Parquet file or directory and write one output file.

    Streams batches of ``batch_size`` rows, so memory does not grow with the
    input. The output appears only if the whole run succeeds. One audit run
    is recorded: ``run.started``, ``policy.fetched``, then ``run.completed`` or
    ``run.failed`` with the counts of the rows written.
    ``progress``: True/False, or None for "only if stderr is a terminal".
    """
    src = Path(input)
    dst = Path(output)
    run = RunContext(engine=engine, sink=audit, run_id=run_id)
    try:
        pol = load_policy(policy)
    except BaseException as exc:
        run.started()
        run.failed(exc)
        raise
    # The policy is known before the first record, so every record of the run names it.
    run.set_policy(pol.label, pol.version, pol.sha256)
    run.started()
    counters: Counters | None = None
    try:
        if policy_source is None:
            policy_source = str(policy) if isinstance(policy, str | os.PathLike) else "inline"
        run.policy_fetched(policy_source)
        if batch_size < 1:
            raise CapeError("batch size must be at least 1")
        fmt = output_format(dst, format)
        if dst.exists() and not overwrite:
            raise FileExistsError(f"output {dst} already exists; pass --overwrite to replace it")
        run_engine = get_engine(engine)
        inputs = open_inputs(src, format=input_format, csv_options=csv_options)
        _refuse_overlap(inputs, dst)
        resolver = resolver or KeyResolver(keys)
        plan = build_plan(pol, inputs.schema, resolver=resolver, column_tags=column_tags)
        counters = Counters.empty_for(plan)
        bar = Progress.auto(inputs.total_rows(), progress)
        metadata = {
            "cape.policy.label": pol.label,
            "cape.policy.version": str(pol.version),
            "cape.policy.sha256": pol.sha256,
            "cape.run_id": run.run_id,
        }
        with atomic_path(dst, overwrite=overwrite) as tmp:
            writer: ParquetOut | CsvOut
            if fmt == "parquet":
                writer = ParquetOut(
                    tmp, plan.output_schema, metadata, timestamp_unit=timestamp_unit
                )
            else:
                delim = (csv_options or CsvOptions()).delimiter
                writer = CsvOut(tmp, plan.output_schema, delim)
            try:
                for out in run_engine(
                    plan,
                    inputs,
                    batch_size=batch_size,
                    counters=counters,
                    progress=bar,
                    policy=EnginePolicy(pol, resolver, dict(column_tags or {})),
                ):
                    writer.write(out)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            finally:
                bar.close()
    except BaseException as exc:
        run.failed(exc, counters)
        raise
    run.completed(counters)
    return ApplyResult(output=dst, run_id=run.run_id, counters=counters, plan=plan)


def _refuse_overlap(inputs: InputSet, dst: Path) -> None:
    target = dst.resolve()
    if any(f.resolve() == target for f in inputs.files):
        raise CapeError(f"output {dst} is one of the input files; write somewhere else")
    if inputs.root.is_dir() and inputs.root.resolve() in target.parents:
        raise CapeError(
            f"output {dst} is inside the input directory {inputs.root}; write somewhere else"
        )


def read_output_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``cape.*`` key-value metadata stamped on an output Parquet file."""
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if k.decode().startswith("cape.")}


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "ENGINES",
    "METADATA_KEYS",
    "ROW_GROUP_SIZE",
    "ApplyResult",
    "CsvOptions",
    "CsvOut",
    "EngineFn",
    "EnginePolicy",
    "InputSet",
    "ParquetOut",
    "Progress",
    "apply_files",
    "atomic_path",
    "format_of",
    "get_engine",
    "open_inputs",
    "output_format",
    "parse_arrow_type",
    "read_output_metadata",
    "register_engine",
]
