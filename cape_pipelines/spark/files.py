"""``cape apply --engine spark``: the input read by Spark, the policy applied by this adapter.

The session is ``SparkSession.builder.getOrCreate()``: an active session is
reused (``spark-submit``, a notebook, a test's session), otherwise a
``local[*]`` one is started. Parquet files are read with
:func:`cape_pipelines.spark.read_parquet`; CSV files with ``spark.read.csv``
and an explicit schema in which every column is text, then converted to the
input's types (inferred or pinned by ``cape apply``) by Spark expressions that
follow the Arrow CSV reader's rules: an empty field is an empty string in a
text column, Arrow's null spellings (``NA``, ``N/A``, ``null``, ``NaN``, ...)
are null elsewhere, Arrow's true/false spellings, and a value that does not
parse stops the run. Spark's own typed CSV parsing differs on each of these,
and the output would not be the same bytes as the other engines'.

Files are read one DataFrame each and unioned in input order; nothing
shuffles, so Spark's partitions, and the rows within each, keep the input's
order. The result of :func:`cape_pipelines.spark.apply_policy` (its records
switched off: ``cape apply`` records the run) is streamed to the driver one
partition at a time as Arrow IPC batches, in order, and handed to the shared
writer. The session time zone is set to the input's time zone for the run,
so that Spark's plan sees the zone the input holds. pyproject.toml names it in the
``cape_pipelines.engines`` entry-point group.

Reading Parquet (:func:`read_parquet`, public), where Spark refuses nanosecond timestamps.

pyarrow writes timestamps as Parquet ``TIMESTAMP(NANOS)`` by default, and
Spark fails on them (``PARQUET_TYPE_ILLEGAL``). :func:`read_parquet` looks at
the file's schema with pyarrow first; if it holds nanosecond timestamps, it
turns on Spark's ``spark.sql.legacy.parquet.nanosAsLong`` for the session
(the columns then arrive as nanoseconds since the epoch, and the setting only
changes files Spark would otherwise refuse) and converts each such column to a
Spark timestamp floored to the microsecond, with exact integer arithmetic:
``TIMESTAMP`` for UTC-adjusted columns, ``TIMESTAMP_NTZ`` for the others.
Sub-microsecond digits are lost; Spark cannot hold them.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator, Mapping
from functools import reduce
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from .. import errors
from .._engine_files import conform, count_output, first_line
from ..core import Counters
from ..errors import CapeError, DataError
from ..inputs import InputSet
from ..io import FileJob
from .apply import apply_policy, plan_of, provided_counts
from .convert import to_spark

NANOS_AS_LONG = "spark.sql.legacy.parquet.nanosAsLong"


def nanosecond_columns(path: str) -> dict[str, bool]:
    """Top-level nanosecond timestamp columns of a Parquet file or directory -> UTC-adjusted?"""
    schema = ds.dataset(path, format="parquet").schema
    return {
        f.name: f.type.tz is not None
        for f in schema
        if pa.types.is_timestamp(f.type) and f.type.unit == "ns"
    }


def _nanos_to_timestamp(name: str, utc: bool) -> Column:
    quoted = "`" + name.replace("`", "``") + "`"
    # Integer arithmetic only: a double would lose digits of a nanosecond count.
    micros = f"(({quoted} - pmod({quoted}, 1000L)) div 1000L)"
    if utc:
        return F.expr(f"timestamp_micros({micros})")
    return F.expr(f"timestampadd(MICROSECOND, {micros}, TIMESTAMP_NTZ'1970-01-01 00:00:00')")


def read_parquet(spark: SparkSession, path: str) -> DataFrame:
    """``spark.read.parquet(path)``, also for files with ``TIMESTAMP(NANOS)`` columns.

    >>> df = read_parquet(spark, "events.parquet")  # doctest: +SKIP
    """
    nanos = nanosecond_columns(path)
    if not nanos:
        return spark.read.parquet(path)
    spark.conf.set(NANOS_AS_LONG, "true")
    df = spark.read.parquet(path)
    return df.select(
        *[
            _nanos_to_timestamp(c, nanos[c]).alias(c) if c in nanos else F.col(f"`{c}`")
            for c in df.columns
        ]
    )


_DEFAULTS = pacsv.ConvertOptions()
NULL_SPELLINGS = tuple(_DEFAULTS.null_values)
"""Text Arrow's CSV reader reads as null in a non-text column."""
TRUE_SPELLINGS = tuple(_DEFAULTS.true_values)
FALSE_SPELLINGS = tuple(_DEFAULTS.false_values)

_IPC_COLUMN = "arrow_ipc"


def session(console_progress: bool = True) -> SparkSession:
    """The active SparkSession, or a new ``local[*]`` one when there is none and no master is
    configured (``spark-submit`` sets one).

    ``console_progress=False`` keeps a new session's ``[Stage 0:>`` console bar off
    (PySpark counts as a shell, where Spark turns it on), as ``--no-progress`` promises.
    """
    from pyspark import SparkConf, SparkContext

    builder = SparkSession.builder
    if not console_progress:
        builder = builder.config("spark.ui.showConsoleProgress", "false")
    if SparkContext._active_spark_context is None:
        # Python workers must run this interpreter, which has Cape Pipelines installed.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        if not SparkConf().contains("spark.master"):
            builder = builder.master("local[*]").appName("cape apply")
    return builder.getOrCreate()


def _quoted(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _convert(name: str, typ: pa.DataType, path: Path) -> Column:
    """The Spark expression turning CSV text column ``name`` into ``typ`` as Arrow would."""
    text = F.col(_quoted(name))
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        # Spark reads an unquoted empty field as null; Arrow reads it as "" in a text column.
        return F.coalesce(text, F.lit("")).alias(name)
    is_null = text.isNull() | text.isin(*NULL_SPELLINGS)
    # The message names the file and column, never the value (it may be personal data).
    bad = F.raise_error(
        F.lit(
            f"<cape>{path}: column {name!r}: a value is not a valid {typ} (pin another type "
            f"with --csv-type {name}=string)</cape>"
        )
    )
    if pa.types.is_boolean(typ):
        value = (
            F.when(text.isin(*TRUE_SPELLINGS), F.lit(True))
            .when(text.isin(*FALSE_SPELLINGS), F.lit(False))
            .otherwise(bad.cast("boolean"))
        )
    else:
        spark_type = to_spark(typ, name)
        parsed = text.try_cast(spark_type)
        value = F.when(parsed.isNull(), bad.cast(spark_type)).otherwise(parsed)
    return F.when(is_null, F.lit(None).cast(to_spark(typ, name))).otherwise(value).alias(name)


def _read_csv(spark: SparkSession, path: Path, inputs: InputSet) -> DataFrame:
    text_schema = T.StructType([T.StructField(n, T.StringType()) for n in inputs.schema.names])
    raw = spark.read.csv(
        str(path),
        schema=text_schema,
        header=True,
        enforceSchema=False,
        sep=inputs.csv.delimiter,
        quote='"',
        escape='"',
        mode="FAILFAST",
        ignoreLeadingWhiteSpace=False,
        ignoreTrailingWhiteSpace=False,
    )
    return raw.select(*[_convert(f.name, f.type, path) for f in inputs.schema])


def read_input(spark: SparkSession, inputs: InputSet) -> DataFrame:
    """The input as one DataFrame: each file read in its format, unioned in input order."""
    names = inputs.schema.names
    frames = []
    for path in inputs.files:
        if inputs.format == "parquet":
            df = read_parquet(spark, str(path)).select(*[F.col(_quoted(n)) for n in names])
        else:
            df = _read_csv(spark, path, inputs)
        frames.append(df)
    return reduce(DataFrame.union, frames)


def _time_zone(schema: pa.Schema) -> str | None:
    """The one time zone of the input's zoned timestamps (None if none); several is refused."""
    zones = {f.type.tz for f in schema if pa.types.is_timestamp(f.type) and f.type.tz}
    if len(zones) > 1:
        raise CapeError(
            f"the input has timestamps in several time zones ({', '.join(sorted(zones))}); "
            "Spark has one session time zone: use another engine"
        )
    return zones.pop() if zones else None


@contextlib.contextmanager
def _session_conf(spark: SparkSession, conf: Mapping[str, str]) -> Iterator[None]:
    saved = {k: spark.conf.get(k, None) for k in conf}
    for k, v in conf.items():
        spark.conf.set(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, v)


def _to_ipc(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Each Arrow batch as one row holding its IPC stream, so whole batches reach the driver."""
    for batch in batches:
        if batch.num_rows == 0:
            continue
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        payload = sink.getvalue()
        offsets = pa.array([0, payload.size], pa.int32()).buffers()[1]
        cell = pa.Array.from_buffers(pa.binary(), 1, [None, offsets, payload])
        yield pa.RecordBatch.from_arrays([cell], [_IPC_COLUMN])


_CAPE_ERROR_RE = re.compile(r"cape_pipelines\.errors\.(\w+): (.+)")
_RAISED_RE = re.compile(r"<cape>(.*?)</cape>")
_PYTHON_ERROR_RE = re.compile(r"^((?:\w+\.)*\w*(?:Error|Exception)): (.+)$", re.MULTILINE)
_SPARK_ERROR_RE = re.compile(r"\[([A-Z][A-Z_.]+)\] ([^\n]+)")


def _cape_error(exc: Exception) -> CapeError:
    """A one-line :class:`CapeError` for an error raised inside a Spark job.

    Spark wraps a worker's exception in JVM errors whose text holds both stack
    traces; the message kept is our own error's, else the Python worker's
    innermost exception, else Spark's error class and message.
    """
    text = str(exc)
    m = _CAPE_ERROR_RE.search(text)
    if m:
        cls = getattr(errors, m.group(1), CapeError)
        if isinstance(cls, type) and issubclass(cls, CapeError):
            return cls(m.group(2).strip())
    m = _RAISED_RE.search(text)
    if m:
        return DataError(m.group(1))
    python = [
        p
        for p in _PYTHON_ERROR_RE.findall(text)
        if not p[0].startswith(("org.", "java.", "scala.", "py4j."))
    ]
    if python:
        name, message = python[-1]
        return DataError(f"Spark failed: {name.rsplit('.', 1)[-1]}: {message.strip()[:300]}")
    m = _SPARK_ERROR_RE.search(text)
    if m:
        return DataError(f"Spark failed: [{m.group(1)}] {m.group(2).strip()[:300]}")
    return DataError(f"Spark failed: {first_line(text)[:300]}")


def apply_files_spark(job: FileJob) -> Iterator[pa.RecordBatch]:
    """The :data:`~cape_pipelines.io.ENGINE_GROUP` function for ``--engine spark``.

    The driver holds one partition's output at a time. ``counters.rows_in``
    is a count of the input (a second scan, only when the policy removes rows).
    """
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException

    plan, counters, inputs = job.plan, job.counters, job.inputs
    inputs.check_columns()
    # The run's own bar is off (--no-progress, or stderr not a terminal): so is Spark's.
    spark = session(console_progress=getattr(job.progress, "stream", None) is not None)
    conf = {"spark.sql.execution.arrow.maxRecordsPerBatch": str(job.batch_size)}
    zone = _time_zone(inputs.schema)
    if zone is not None:
        conf["spark.sql.session.timeZone"] = zone
    with _session_conf(spark, conf):
        try:
            source = read_input(spark, inputs)
            out = apply_policy(source, job.binding.silent())
            blobs = out.mapInArrow(
                _to_ipc, T.StructType([T.StructField(_IPC_COLUMN, T.BinaryType())])
            )
            for row in blobs.toLocalIterator():
                with pa.ipc.open_stream(row[_IPC_COLUMN]) as reader:
                    for produced in reader:
                        batch = conform(plan, produced)
                        count_output(counters, plan, batch)
                        job.progress(batch.num_rows)
                        yield batch
            rows_in = int(source.count()) if plan.filters_rows else counters.rows_out
            counters.merge(Counters(counts=provided_counts(plan_of(out), source)))
        except (PySparkException, Py4JJavaError) as exc:
            raise _cape_error(exc) from None
    counters.rows_in += rows_in
    job.progress(rows_in - counters.rows_out)


__all__ = ["apply_files_spark", "nanosecond_columns", "read_input", "read_parquet", "session"]
