"""Reading Parquet into Spark at the boundary: nanosecond timestamps that Spark refuses.

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

import pyarrow as pa
import pyarrow.dataset as ds
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

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
