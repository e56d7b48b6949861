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


def pandas_schema(df: Any) -> pa.Schema:
    """The Arrow schema of a pandas frame, column by column (index left out).

    pandas' ``string`` dtype is read as ``string`` (not the ``large_string`` it
    stores), so a plan sees the same types whether the frame's strings are
    ``object`` or ``string[pyarrow]``.
    """
    fields = []
    if df.columns.has_duplicates:
        dupes = sorted({str(c) for c in df.columns[df.columns.duplicated()]})
        raise PlanError(f"input has duplicate column names: {', '.join(dupes)}")
    for name in df.columns:
        if not isinstance(name, str):
            raise TypeError(f"column names must be strings, found {name!r}")
        try:
            field = pa.Schema.from_pandas(df[[name]], preserve_index=False).field(name)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            # The Arrow message can quote a cell value; only its type is reported.
            raise DataError(
                f"column {name!r} ({df[name].dtype}) cannot be converted to Arrow "
                f"({type(exc).__name__}); give it one type"
            ) from None
        if isinstance(df[name].dtype, pd.StringDtype):
            field = field.with_type(pa.string())
        elif pa.types.is_null(field.type) and df[name].dtype == object:
            # An empty or all-None object column says nothing of its type; pandas object
            # columns hold strings, and a string plan also fits the batches that follow.
            field = field.with_type(pa.string())
        fields.append(field)
    return pa.schema(fields)


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
    series = array.to_pandas()
    if series.dtype != dtype:
        if dtype.kind in "iub" and array.null_count:
            raise TypeError(f"cannot hold nulls in a {dtype} column")
        series = series.astype(dtype)
    return series


__all__ = ["arrow_to_pandas", "pandas_dtype_for", "pandas_schema"]
