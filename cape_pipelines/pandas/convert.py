"""pandas <-> Arrow for the pandas adapter (and Dask, whose partitions are pandas frames).

The Arrow schema of a frame is read column by column; a transformed column's
pandas dtype is derived from types alone (never from values), so every
partition of a Dask frame gets the same dtype and ``meta`` can be computed on
an empty frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ..errors import DataError, PlanError
from ..transforms._text import estimated_distinct_fraction


def pandas_schema(df: Any, converted: dict[str, pa.Array] | None = None) -> pa.Schema:
    """The Arrow schema of a pandas frame, column by column (index left out).

    Types come from the dtypes where they say everything (numpy numbers,
    booleans, datetimes and durations, pandas' string and Arrow dtypes); only
    ``object`` columns, whose dtype says nothing, are converted to learn their
    type. Pass a dict as ``converted`` to keep those conversions: the caller
    (:func:`~cape_pipelines.pandas.apply.apply_frame`) then converts each column
    once, not twice. pandas' ``string`` dtype is read as ``string`` (not the
    ``large_string`` it stores), so a plan sees the same types whether the
    frame's strings are ``object`` or ``string[pyarrow]``.
    """
    fields = []
    if df.columns.has_duplicates:
        dupes = sorted({str(c) for c in df.columns[df.columns.duplicated()]})
        raise PlanError(f"input has duplicate column names: {', '.join(dupes)}")
    for name in df.columns:
        if not isinstance(name, str):
            raise TypeError(f"column names must be strings, found {name!r}")
        fields.append(_field_of(df[name], name, converted))
    return pa.schema(fields)


# numpy kinds whose Arrow type the dtype alone fixes: bool, ints, floats, datetimes, durations.
_NUMPY_KINDS = frozenset("biufmM")


def _field_of(column: Any, name: str, converted: dict[str, pa.Array] | None) -> pa.Field:
    dtype = column.dtype
    if isinstance(dtype, np.dtype) and dtype.kind in _NUMPY_KINDS:
        return pa.field(name, pa.from_numpy_dtype(dtype))
    if isinstance(dtype, pd.StringDtype):
        return pa.field(name, pa.string())
    if isinstance(dtype, pd.ArrowDtype):
        return pa.field(name, dtype.pyarrow_dtype)
    try:
        if dtype == np.dtype(object):
            # The values decide the type: convert once (as pyarrow's own schema
            # inference does) and keep the array for the caller.
            array = pa.array(column, from_pandas=True)
            if converted is not None:
                converted[name] = array
            field = pa.field(name, array.type)
        else:
            field = pa.Schema.from_pandas(column.to_frame(), preserve_index=False).field(name)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        # The Arrow message can quote a cell value; only its type is reported.
        raise DataError(
            f"column {name!r} ({dtype}) cannot be converted to Arrow "
            f"({type(exc).__name__}); give it one type"
        ) from None
    if pa.types.is_null(field.type) and dtype == np.dtype(object):
        # An empty or all-None object column says nothing of its type; pandas object
        # columns hold strings, and a string plan also fits the batches that follow.
        field = field.with_type(pa.string())
    return field


def pandas_dtype_for(out_type: pa.DataType, in_dtype: Any, new_strings: Any = object) -> Any:
    """The pandas dtype a transformed column gets: from its Arrow type and its input dtype.

    It depends on types only, never on the values (an integer column with
    nulls stays an integer column), so every partition of a frame gets the same
    dtype and a Dask ``meta`` can be computed on an empty frame. Arrow-backed
    input stays Arrow-backed; ``new_strings`` is the dtype of a column that
    becomes a string column (a tokenized integer, say).
    """
    if isinstance(in_dtype, pd.ArrowDtype):
        return pd.ArrowDtype(out_type)
    if pa.types.is_string(out_type) or pa.types.is_large_string(out_type):
        if isinstance(in_dtype, pd.StringDtype) or in_dtype == np.dtype(object):
            return in_dtype
        return new_strings
    numpy_input = isinstance(in_dtype, np.dtype)
    if pa.types.is_integer(out_type):
        dt = np.dtype(out_type.to_pandas_dtype())
        # A numpy integer column holds no nulls, and no transformation makes a null from a value.
        if numpy_input and in_dtype.kind in "iu":
            return dt
        nullable = "I" + dt.name[1:] if dt.kind == "i" else "UI" + dt.name[2:]
        return pd.api.types.pandas_dtype(nullable)
    if pa.types.is_boolean(out_type):
        return np.dtype(bool) if numpy_input and in_dtype.kind == "b" else pd.BooleanDtype()
    if pa.types.is_floating(out_type):
        return np.dtype(out_type.to_pandas_dtype())
    if pa.types.is_timestamp(out_type):
        if out_type.tz is not None:
            return pd.DatetimeTZDtype(unit=out_type.unit, tz=out_type.tz)
        return np.dtype(f"datetime64[{out_type.unit}]")
    if pa.types.is_duration(out_type):
        return np.dtype(f"timedelta64[{out_type.unit}]")
    return np.dtype(object)


def arrow_to_pandas(array: pa.Array | pa.ChunkedArray, dtype: Any) -> Any:
    """An Arrow column as a pandas Series of exactly ``dtype`` (from :func:`pandas_dtype_for`)."""
    if isinstance(dtype, pd.api.extensions.ExtensionDtype):
        return pd.Series(dtype.__from_arrow__(array), copy=False)
    if dtype == np.dtype(object) and (
        pa.types.is_string(array.type) or pa.types.is_large_string(array.type)
    ):
        return pd.Series(array.to_pandas(deduplicate_objects=_shares_objects(array)), copy=False)
    series = array.to_pandas()
    if series.dtype != dtype:
        if dtype.kind in "iub" and array.null_count:
            raise TypeError(f"cannot hold nulls in a {dtype} column")
        series = series.astype(dtype)
    return series


def _shares_objects(array: pa.Array | pa.ChunkedArray) -> bool:
    """Whether equal strings should share one Python object in an ``object`` column.

    Sharing (pyarrow's ``deduplicate_objects``) hashes every value: about 0.5
    us per row when most values are distinct, ten times the conversion itself,
    for little memory saved; when few are distinct it saves most of the
    column's memory. A sample of the rows decides; either way the values are
    the same.
    """
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    return estimated_distinct_fraction(array) <= _SHARE_BELOW


# At or below this estimated share of distinct values, equal strings share one object.
_SHARE_BELOW = 0.5


__all__ = ["arrow_to_pandas", "pandas_dtype_for", "pandas_schema"]
