"""Arrow <-> Beam conversions: Row types to Arrow schemas and back, element lists to tables.

Beam 2.77's own Arrow batch converter (``typehints.arrow_type_compatibility``)
raises ``NotImplementedError`` for every Beam logical type, so timestamps,
dates and decimals would not cross it; this module maps the Python types Beam
schemas use (``int``, ``numpy.int32``, ``str``, ``Timestamp``, ``datetime.date``,
...) to Arrow types and converts a list of elements column by column. The
output Row type of :class:`~cape_pipelines.beam.ApplyPolicy` is derived here
from ``plan.output_schema``, the one place output types come from.
"""

from __future__ import annotations

import datetime
import decimal
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from apache_beam.pvalue import Row
from apache_beam.typehints import typehints
from apache_beam.typehints.row_type import RowTypeConstraint
from apache_beam.utils.timestamp import Timestamp

from ..errors import DataError, PlanError

# Beam's schema types (apache_beam.typehints.schemas) and their Arrow equivalents.
_PY_TO_ARROW: dict[Any, pa.DataType] = {
    int: pa.int64(),
    np.int64: pa.int64(),
    np.int32: pa.int32(),
    np.int16: pa.int16(),
    np.int8: pa.int8(),
    float: pa.float64(),
    np.float64: pa.float64(),
    np.float32: pa.float32(),
    bool: pa.bool_(),
    str: pa.string(),
    bytes: pa.binary(),
    datetime.date: pa.date32(),
    datetime.datetime: pa.timestamp("us"),
    # Beam's Timestamp is a UTC instant at microsecond precision.
    Timestamp: pa.timestamp("us", tz="UTC"),
}


def _unwrap_optional(hint: Any) -> Any:
    """``Optional[X]`` (typing or Beam form) -> ``X``; anything else unchanged."""
    if isinstance(hint, typehints.UnionConstraint):
        inner = [t for t in hint.union_types if t is not type(None)]
        return inner[0] if len(inner) == 1 else hint
    if typing.get_origin(hint) is typing.Union:
        inner = [t for t in typing.get_args(hint) if t is not type(None)]
        return inner[0] if len(inner) == 1 else hint
    return hint


def row_type_of(element_type: Any) -> RowTypeConstraint | None:
    """The Row type of a schema'd PCollection's element type, or ``None``."""
    if isinstance(element_type, RowTypeConstraint):
        return element_type
    if isinstance(element_type, type) and hasattr(element_type, "_fields"):
        return RowTypeConstraint.from_user_type(element_type)
    return None


def arrow_schema_from_row_type(row_type: RowTypeConstraint) -> pa.Schema:
    """The Arrow schema of a Beam Row type; :class:`PlanError` names a field it cannot map."""
    fields = []
    for name, hint in row_type._fields:
        inner = _unwrap_optional(hint)
        arrow = _PY_TO_ARROW.get(inner)
        if arrow is None:
            if inner is decimal.Decimal:
                raise PlanError(
                    f"Row field {name!r} is Decimal, whose precision and scale Beam does not "
                    "carry: pass schema= with its pa.decimal128(precision, scale) type"
                )
            raise PlanError(
                f"Row field {name!r} has type {hint}, which has no Arrow equivalent here; "
                "pass schema= (a pyarrow.Schema) to ApplyPolicy"
            )
        fields.append(pa.field(name, arrow))
    return pa.schema(fields)


def _python_type(arrow: pa.DataType, column: str) -> Any:
    if pa.types.is_timestamp(arrow):
        return Timestamp if arrow.tz is not None else datetime.datetime
    if pa.types.is_decimal(arrow):
        return decimal.Decimal
    if pa.types.is_large_string(arrow):
        return str
    if pa.types.is_large_binary(arrow):
        return bytes
    for py, candidate in _PY_TO_ARROW.items():
        if candidate.equals(arrow) and py not in (Timestamp, datetime.datetime):
            return py
    raise PlanError(f"output column {column!r} is {arrow}, which a Beam Row cannot carry")


def row_type_from_arrow_schema(schema: pa.Schema) -> RowTypeConstraint:
    """The Beam Row type (every field nullable) of an Arrow schema: the output's schema."""
    return RowTypeConstraint.from_fields(
        [(f.name, typing.Optional[_python_type(f.type, f.name)]) for f in schema]  # noqa: UP045
    )


def table_from_rows(rows: Sequence[Any], schema: pa.Schema) -> pa.Table:
    """One Arrow table from a list of Beam Rows (or NamedTuples), column by column."""
    arrays = []
    for f in schema:
        try:
            values = [getattr(r, f.name) for r in rows]
        except AttributeError:
            raise DataError(f"column {f.name!r} is missing from a Row of the input") from None
        arrays.append(_array(values, f))
    return pa.Table.from_arrays(arrays, schema=schema)


def _array(values: list[Any], f: pa.Field) -> pa.Array:
    try:
        if pa.types.is_timestamp(f.type) and any(isinstance(v, Timestamp) for v in values):
            micros = [None if v is None else v.micros for v in values]
            return pa.array(micros, pa.int64()).cast(f.type)
        return pa.array(values, f.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
        raise DataError(f"column {f.name!r} holds values that are not {f.type}: {exc}") from None


def table_from_dicts(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """One Arrow table from a list of dicts; every dict must have exactly the schema's keys.

    A key missing from a dict is an error (write ``None`` for a null), and so is
    a key the schema does not have: silently dropping or nulling columns would
    hide a mismatch between the data and the schema the policy was checked on.
    """
    names = schema.names
    seen = set().union(*rows) if rows else set()
    extra = sorted(str(k) for k in seen.difference(names))
    if extra:
        raise DataError(
            f"column(s) {', '.join(map(repr, extra))} are not in the schema ApplyPolicy was "
            f"built with ({', '.join(names)})"
        )
    if sum(map(len, rows)) != len(rows) * len(names):
        missing = [n for n in names if any(n not in r for r in rows)]
        raise DataError(
            f"column(s) {', '.join(map(repr, missing))} are missing from input element(s); "
            "every dict needs every column (use None for a null)"
        )
    return pa.Table.from_arrays(
        [_array([r[f.name] for r in rows], f) for f in schema], schema=schema
    )


def rows_from_table(table: pa.Table) -> list[Row]:
    """Beam Rows from an Arrow table (timestamps with a time zone become Beam ``Timestamp``)."""
    columns = []
    for f, col in zip(table.schema, table.columns, strict=True):
        if pa.types.is_timestamp(f.type) and f.type.tz is not None:
            micros = col.cast(pa.timestamp("us", tz=f.type.tz)).cast(pa.int64()).to_pylist()
            columns.append([None if m is None else Timestamp(micros=m) for m in micros])
        else:
            columns.append(col.to_pylist())
    names = table.schema.names
    return [Row(**dict(zip(names, values, strict=True))) for values in zip(*columns, strict=True)]
