"""Input discovery and streaming reads for ``cape apply``: CSV and Parquet, files or directories.

Inputs are read batch by batch (``pyarrow.csv.open_csv``,
``ParquetFile.iter_batches``) so memory stays bounded whatever the input's
size; the schema the plan is built on is read once (for CSV: inferred from the
first block of the first file, then fixed for every later block and file, so a
column's type never changes half-way). Reader errors are mapped to a
:class:`~cape_pipelines.errors.DataError` naming the file and, where Arrow
says, the line and column.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .errors import DataError

Format = Literal["csv", "parquet"]

DEFAULT_BATCH_SIZE = 65_536
"""Rows per batch handed to the core."""

CSV_INFER_BLOCK = 1 << 20
"""Bytes of the first CSV file from which column types are inferred."""

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
    encoding: str = "utf-8"
    """The files' text encoding (any Python codec name); read as UTF-8 otherwise."""


@dataclass(frozen=True)
class ParquetSlice:
    """Rows ``[start, start + rows)`` of one Parquet file, described rather than read.

    ``row_groups`` are the row groups holding them, ``skip`` the rows of the
    first of those before ``start``. ``cape apply --workers N`` sends these to
    its workers, which read the rows themselves (see
    :meth:`InputSet.parquet_slices`), so the parent never decodes the input.
    """

    path: Path
    start: int
    rows: int
    row_groups: tuple[int, ...]
    skip: int


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
                read_options=_read_options(self.csv, CSV_INFER_BLOCK),
                parse_options=_parse_options(self.csv),
                convert_options=pacsv.ConvertOptions(column_types=pinned),
            )
            with contextlib.closing(reader):
                schema = reader.schema
                names = schema.names  # decodes the header: a UnicodeError here
        except pa.ArrowInvalid as exc:
            header = _header_names(first, self.csv)
            names_only = pa.schema([(n, pa.string()) for n in header]) if header else None
            raise _csv_error(first, exc, self.csv, names_only) from None
        except UnicodeError:
            raise _encoding_error(first, self.csv, "header") from None
        unknown = sorted(set(pinned) - set(names))
        if unknown:
            raise DataError(f"{first}: pinned CSV column(s) not in the file: {', '.join(unknown)}")
        # Arrow infers `binary` for a column whose bytes are not UTF-8 text.
        binary = [f.name for f in schema if pa.types.is_binary(f.type) and f.name not in pinned]
        if binary:
            raise _encoding_error(first, self.csv, f"column {binary[0]!r}")
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
                        read_options=_read_options(self.csv),
                        parse_options=_parse_options(self.csv),
                        convert_options=pacsv.ConvertOptions(
                            column_types={f.name: f.type for f in self.schema}
                        ),
                    )
                    with contextlib.closing(reader):
                        names = reader.schema.names
                except pa.ArrowInvalid as exc:
                    raise _csv_error(path, exc, self.csv, self.schema) from None
                except UnicodeError:
                    raise _encoding_error(path, self.csv, "header") from None
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

    def parquet_slices(self, path: Path, batch_size: int) -> list[ParquetSlice] | None:
        """``path``'s batches as :class:`ParquetSlice` s a worker process reads itself, or None.

        The slices are the batches :meth:`file_batches` gives (rows ``[k * batch_size,
        (k + 1) * batch_size)``), so counts and error messages do not change. Only the
        footer is read here. None when a row group holds more rows than a batch: a
        worker would then decode up to a whole row group to reach its rows, so the
        file is better read in one pass by :meth:`file_batches`.
        """
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        try:
            meta = _parquet_file(path).metadata
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{path}: cannot read Parquet: {_first_line(exc)}") from None
        self._check_names(path, meta.schema.to_arrow_schema().names)
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        if any(n > batch_size for n in sizes):
            return None
        firsts = [0]
        for n in sizes:
            firsts.append(firsts[-1] + n)
        slices = []
        for start in range(0, firsts[-1], batch_size):
            stop = min(start + batch_size, firsts[-1])
            groups = tuple(
                i for i, n in enumerate(sizes) if n and firsts[i] < stop and firsts[i + 1] > start
            )
            skip = start - firsts[groups[0]]
            slices.append(ParquetSlice(path, start, stop - start, groups, skip))
        return slices

    def read_slice(self, part: ParquetSlice) -> pa.RecordBatch:
        """The rows of ``part`` as one batch (what :meth:`file_batches` gives for them)."""
        try:
            pf = _parquet_file(part.path)
            pieces = []
            skip, want = part.skip, part.rows
            # One thread: the other cores run the other workers.
            rows = pf.iter_batches(
                batch_size=part.rows, row_groups=list(part.row_groups), use_threads=False
            )
            for batch in rows:
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                piece = batch.slice(skip, want)
                skip = 0
                pieces.append(piece)
                want -= piece.num_rows
                if not want:
                    break
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{part.path}: cannot read Parquet: {_first_line(exc)}") from None
        if want:
            raise DataError(f"{part.path}: changed while it was read (rows missing)")
        if len(pieces) == 1:
            return pieces[0]
        return pa.Table.from_batches(pieces).combine_chunks().to_batches()[0]

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
                read_options=_read_options(self.csv, block),
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
        except UnicodeError:
            raise _encoding_error(path, self.csv, "header") from None


def _parquet_file(path: Path) -> pq.ParquetFile:
    # A small read buffer streams each column chunk page by page, so a huge row group
    # does not have to sit in memory whole.
    return pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)


def _read_options(opts: CsvOptions, block_size: int | None = None) -> pacsv.ReadOptions:
    extra = {} if block_size is None else {"block_size": block_size}
    encoding = opts.encoding.lower().replace("_", "-")
    if encoding in ("utf-8", "utf8"):
        return pacsv.ReadOptions(use_threads=False, **extra)
    return pacsv.ReadOptions(use_threads=False, encoding=opts.encoding, **extra)


def _first_bad_byte(path: Path, encoding: str) -> int | None:
    """The offset of the first byte of ``path`` that ``encoding`` cannot decode (error path)."""
    decoder = codecs.getincrementaldecoder(encoding)()
    offset = 0
    try:
        with pa.input_stream(str(path), compression="detect") as raw:
            while chunk := raw.read(1 << 20):
                pending = len(decoder.getstate()[0])
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    return offset - pending + exc.start
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        return offset - len(exc.object) + exc.start
    except (OSError, pa.ArrowException, LookupError):
        return None
    return None


def _encoding_error(path: Path, opts: CsvOptions, part: str) -> DataError:
    """A DataError naming the file, the byte offset and the option that reads such files."""
    at = _first_bad_byte(path, opts.encoding)
    where = f"byte {at}" if at is not None else f"its {part}"
    hint = "pass --encoding (e.g. --encoding latin-1, --encoding utf-16)"
    with contextlib.suppress(OSError, pa.ArrowException):
        with pa.input_stream(str(path), compression="detect") as raw:
            head = raw.read(4)
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            hint = "it starts with a UTF-16 byte-order mark: pass --encoding utf-16"
    return DataError(f"{path}: not {opts.encoding} text at {where} ({part}); {hint}")


def _parse_options(opts: CsvOptions) -> pacsv.ParseOptions:
    return pacsv.ParseOptions(delimiter=opts.delimiter)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


_UTF8_RE = re.compile(r"In CSV column #(\d+): CSV conversion error to \w*string: invalid UTF8")
_PARSE_RE = re.compile(r"Expected (\d+) columns, got (\d+)")
_CONVERT_RE = re.compile(r"In CSV column #(\d+): (?:Row #(\d+): )?CSV conversion error to ([^:]+):")


def _csv_error(
    path: Path, exc: BaseException, opts: CsvOptions, schema: pa.Schema | None
) -> DataError:
    """A DataError naming the file, the line and the column, never the offending value."""
    if opts.encoding.lower().replace("_", "-") in ("utf-8", "utf8"):
        with contextlib.suppress(OSError, pa.ArrowException):
            with pa.input_stream(str(path), compression="detect") as raw:
                head = raw.read(4)
            if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                # UTF-16 read as UTF-8 parses as one broken column; say what it is.
                return _encoding_error(path, opts, "header")
    text = str(exc)
    m = _UTF8_RE.search(text)
    if m:
        col_index = int(m.group(1))
        col = schema.names[col_index] if schema is not None and col_index < len(schema) else None
        return _encoding_error(path, opts, f"column {col!r}" if col else "data")
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
            f"its type is pinned by --csv-type {col}=..."
            if pinned
            else "its type was inferred from the first rows; pin another with "
            f"--csv-type {col or 'COLUMN'}=string"
        )
        return DataError(f"{path}: {where}, {col_text}: value is not a valid {type_name} ({hint})")
    return DataError(f"{path}: cannot read CSV: {_first_line(exc)}")


def _header_names(path: Path, opts: CsvOptions) -> list[str] | None:
    """The column names of a CSV file's header, for error messages (error path only)."""
    try:
        with pa.input_stream(str(path), compression="detect") as raw:
            text = io.TextIOWrapper(raw, encoding=opts.encoding, errors="replace", newline="")
            return next(csv.reader(text, delimiter=opts.delimiter), None)
    except (OSError, csv.Error, pa.ArrowException, LookupError):
        return None


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
    if not root.is_file() and not root.is_dir():
        # A pipe or a device (/dev/stdin): cape reads an input twice (its types, then
        # its data) and measures it for progress, which a stream cannot give.
        raise DataError(
            f"input {root} is not a regular file or a directory (a pipe or a device?); "
            "save it to a file first, e.g. cat > in.csv"
        )
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


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (Arrow's carry context on later lines)."""
    return _first_line(exc)


__all__ = [
    "CSV_INFER_BLOCK",
    "DEFAULT_BATCH_SIZE",
    "CsvOptions",
    "Format",
    "InputSet",
    "ParquetSlice",
    "format_of",
    "open_inputs",
    "parse_arrow_type",
]
