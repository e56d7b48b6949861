"""Dask <-> Arrow at the boundary: the Arrow schema of a Dask frame, and its string dtype.

A Dask frame's ``meta`` is an empty pandas frame, whose ``object`` columns say
nothing about their values; Dask's own convention (and its non-empty ``meta``)
is that they hold strings, so they are read as Arrow ``string``.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from ..pandas.convert import pandas_schema


def dask_schema(ddf: Any) -> pa.Schema:
    """The Arrow schema the plan is built on, from the frame's non-empty ``meta``."""
    return pandas_schema(ddf._meta_nonempty)


def new_string_dtype() -> Any:
    """The dtype of a column that becomes strings: what Dask itself gives strings."""
    import numpy as np
    import pandas as pd
    from dask.dataframe.utils import pyarrow_strings_enabled

    return pd.StringDtype("pyarrow") if pyarrow_strings_enabled() else np.dtype(object)
