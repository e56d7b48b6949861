"""Arrow <-> Spark type conversion: the one place the Spark adapter maps types.

Three views of a column exist: the Spark SQL type; the Arrow type the plan is
built on (a Spark ``TIMESTAMP`` becomes ``timestamp[us, tz=<session time
zone>]``, so truncating to a day means the session's day, as Spark's own
``date_trunc`` does); and the Arrow type on the wire between the JVM and
Python (``mapInArrow`` hands ``TIMESTAMP`` values as ``timestamp[us, tz=UTC]``
and expects them back so). Spark has no unsigned integers and no nanosecond
timestamps: an unsigned Arrow type is refused with the column named, and a
nanosecond timestamp maps to Spark's microsecond ``TIMESTAMP`` (the value is
floored to the microsecond, as ``createDataFrame`` itself does).
"""

from __future__ import annotations

import pyarrow as pa
from pyspark.sql import types as T

from ..errors import PlanError

WIRE_TZ = "UTC"

_SIMPLE_TO_SPARK: dict[pa.DataType, T.DataType] = {
    pa.bool_(): T.BooleanType(),
    pa.int8(): T.ByteType(),
    pa.int16(): T.ShortType(),
    pa.int32(): T.IntegerType(),
    pa.int64(): T.LongType(),
    pa.float32(): T.FloatType(),
    pa.float64(): T.DoubleType(),
    pa.string(): T.StringType(),
    pa.large_string(): T.StringType(),
    pa.string_view(): T.StringType(),
    pa.binary(): T.BinaryType(),
    pa.large_binary(): T.BinaryType(),
    pa.date32(): T.DateType(),
    pa.date64(): T.DateType(),
    pa.null(): T.NullType(),
}

_SIMPLE_TO_ARROW: dict[type[T.DataType], pa.DataType] = {
    T.BooleanType: pa.bool_(),
    T.ByteType: pa.int8(),
    T.ShortType: pa.int16(),
    T.IntegerType: pa.int32(),
    T.LongType: pa.int64(),
    T.FloatType: pa.float32(),
    T.DoubleType: pa.float64(),
    T.StringType: pa.string(),
    T.BinaryType: pa.binary(),
    T.DateType: pa.date32(),
    T.NullType: pa.null(),
    T.TimestampNTZType: pa.timestamp("us"),
}


def to_spark(arrow_type: pa.DataType, column: str = "?") -> T.DataType:
    """The Spark SQL type for an Arrow type; :class:`PlanError` names the column if none fits."""
    simple = _SIMPLE_TO_SPARK.get(arrow_type)
    if simple is not None:
        return simple
    if pa.types.is_timestamp(arrow_type):
        return T.TimestampType() if arrow_type.tz is not None else T.TimestampNTZType()
    if pa.types.is_decimal(arrow_type) and arrow_type.precision <= 38:
        return T.DecimalType(arrow_type.precision, arrow_type.scale)
    if pa.types.is_dictionary(arrow_type):
        return to_spark(arrow_type.value_type, column)
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return T.ArrayType(to_spark(arrow_type.value_type, column), True)
    if pa.types.is_struct(arrow_type):
        fields = [T.StructField(f.name, to_spark(f.type, f"{column}.{f.name}")) for f in arrow_type]
        return T.StructType(fields)
    raise PlanError(f"column {column!r}: Spark has no type for Arrow {arrow_type}")


def to_arrow(spark_type: T.DataType, tz: str, column: str = "?") -> pa.DataType:
    """The Arrow type a plan sees for a Spark type (``TIMESTAMP`` in the session zone ``tz``)."""
    simple = _SIMPLE_TO_ARROW.get(type(spark_type))
    if simple is not None:
        return simple
    if isinstance(spark_type, T.TimestampType):
        return pa.timestamp("us", tz=tz)
    if isinstance(spark_type, T.DecimalType):
        return pa.decimal128(spark_type.precision, spark_type.scale)
    if isinstance(spark_type, T.ArrayType):
        return pa.list_(to_arrow(spark_type.elementType, tz, column))
    if isinstance(spark_type, T.StructType):
        return pa.struct(
            [pa.field(f.name, to_arrow(f.dataType, tz, f"{column}.{f.name}")) for f in spark_type]
        )
    name = spark_type.simpleString()
    raise PlanError(f"column {column!r}: the Spark type {name} is not supported")


def schema_to_arrow(schema: T.StructType, tz: str) -> pa.Schema:
    """The Arrow schema a plan is built on, for a Spark DataFrame schema."""
    return pa.schema([pa.field(f.name, to_arrow(f.dataType, tz, f.name)) for f in schema])


def schema_to_spark(schema: pa.Schema) -> T.StructType:
    """The Spark schema for an Arrow schema (every field nullable, as Arrow output is)."""
    return T.StructType([T.StructField(f.name, to_spark(f.type, f.name), True) for f in schema])


def wire_type(arrow_type: pa.DataType) -> pa.DataType:
    """The Arrow type Spark exchanges with Python for a column of ``arrow_type``."""
    if pa.types.is_timestamp(arrow_type):
        return pa.timestamp("us", tz=WIRE_TZ if arrow_type.tz is not None else None)
    if pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type):
        return pa.string()
    if pa.types.is_large_binary(arrow_type):
        return pa.binary()
    if pa.types.is_date64(arrow_type):
        return pa.date32()
    if pa.types.is_dictionary(arrow_type):
        return wire_type(arrow_type.value_type)
    return arrow_type


def wire_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` with every field in its :func:`wire_type`."""
    return pa.schema([pa.field(f.name, wire_type(f.type)) for f in schema])


def floor_to_micros(array: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """A nanosecond timestamp array floored to microseconds (Spark's rule; Arrow truncates)."""
    import pyarrow.compute as pc

    typ = array.type
    if not pa.types.is_timestamp(typ) or typ.unit != "ns":
        return array
    ints = array.cast(pa.int64())
    rem = pc.subtract(ints, pc.multiply(pc.divide(ints, 1000), 1000))
    # Arrow's integer division truncates toward zero; step back one microsecond below it.
    micros = pc.subtract(pc.divide(ints, 1000), pc.cast(pc.less(rem, 0), pa.int64()))
    return micros.cast(pa.timestamp("us", tz=typ.tz))


def cast_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` with each column cast to ``schema``'s type where they differ (by position)."""
    if batch.schema.equals(schema):
        return batch
    arrays = []
    for arr, field in zip(batch.columns, schema, strict=True):
        if not arr.type.equals(field.type):
            arr = arr.cast(field.type)
        arrays.append(arr)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
