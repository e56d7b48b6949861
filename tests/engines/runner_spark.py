"""Spark runner for the cross-engine parity suite: Arrow in, ``apply_policy``, Arrow out.

The input table becomes a DataFrame with ``createDataFrame`` (one Arrow batch
per partition; the runner makes batches of 3 rows, so even small cases span
several partitions and a ``context`` entity is split across them), goes
through :func:`cape_pipelines.spark.apply_policy`, and comes back with the
audited :func:`cape_pipelines.spark.collect`. Nothing shuffles, so Spark keeps
the input row order and no hidden row id is needed.

Types Spark cannot represent are normalised here, and only here
(:func:`normalise`): nanosecond timestamps (Spark holds microseconds; the
values are floored to the microsecond on the way in, so parity holds for
values at whole microseconds and the case table should keep sub-microsecond
digits out of Spark's cases), time zones (a Spark ``TIMESTAMP`` has none: the
session time zone is set to the table's zone for the run), ``large_string``
/``large_binary``/``date64`` (Spark has one string, binary and date type).
Naive timestamps go in as ``TIMESTAMP_NTZ``, so wall-clock semantics hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa

try:
    from _spark import get_spark
except ImportError:  # imported as tests.engines.runner_spark from the repository root
    from tests._spark import get_spark

BATCH_ROWS = "3"
MICROS_ONLY = {"spark"}
_CONFS = ("spark.sql.session.timeZone", "spark.sql.execution.arrow.maxRecordsPerBatch")


def table_time_zone(table: pa.Table) -> str:
    """The session time zone for a table: its zoned timestamps' one zone, else UTC.

    Every transformation works on instants (truncation in UTC wall time), so a
    table with zones that differ by column runs in UTC and the zone names are
    restored by :func:`normalise`.
    """
    zones = {f.type.tz for f in table.schema if pa.types.is_timestamp(f.type) and f.type.tz}
    return zones.pop() if len(zones) == 1 else "UTC"


def to_spark_input(table: pa.Table) -> pa.Table:
    """The table as Spark will hold it: nanosecond timestamps floored to microseconds."""
    from cape_pipelines.spark.convert import floor_to_micros

    return pa.table([floor_to_micros(c) for c in table.columns], names=table.column_names)


def normalise(result: pa.Table, expected: pa.Schema) -> pa.Table:
    """Cast columns back to ``expected`` where the difference is only Spark's representation."""
    from cape_pipelines.spark.convert import wire_type

    arrays = []
    for field, col in zip(result.schema, result.columns, strict=True):
        want = expected.field(field.name).type if field.name in expected.names else None
        if (
            want is not None
            and not col.type.equals(want)
            and _spark_form(want, wire_type).equals(_spark_form(col.type, wire_type))
        ):
            col = col.cast(want)
        arrays.append(col)
    return pa.table(arrays, names=result.column_names)


def _spark_form(typ: pa.DataType, wire_type: Any) -> pa.DataType:
    """What Spark keeps of a type: timestamps lose unit and zone name (kept: zoned or not)."""
    if pa.types.is_timestamp(typ):
        return pa.timestamp("us", tz="UTC" if typ.tz else None)
    return wire_type(typ)


def run_spark(
    policy: Mapping[str, Any],
    table: pa.Table,
    keys: Mapping[str, bytes] | None = None,
    *,
    audit: Any = None,
) -> pa.Table:
    """Apply ``policy`` to ``table`` on the shared local SparkSession; the output as Arrow."""
    from cape_pipelines import build_plan
    from cape_pipelines.audit import MemorySink
    from cape_pipelines.spark import apply_policy, collect
    from cape_pipelines.spark.convert import schema_to_spark

    spark = get_spark()
    saved = {k: spark.conf.get(k, None) for k in _CONFS}
    spark.conf.set("spark.sql.session.timeZone", table_time_zone(table))
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", BATCH_ROWS)
    try:
        source = to_spark_input(table)
        sdf = spark.createDataFrame(source, schema=schema_to_spark(source.schema))
        out = apply_policy(sdf, policy, keys=keys, audit=audit or MemorySink())
        result = collect(out)
        return normalise(result, build_plan(policy, table.schema, keys=keys).output_schema)
    finally:
        for k, v in saved.items():
            if v is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, v)


RUNNERS = {"spark": run_spark}
