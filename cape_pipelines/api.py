"""The in-memory entry point, ``cape_pipelines.apply_policy``: the pandas adapter's.

Kept as a module so ``cape_pipelines.api.apply_policy`` and the pandas helpers
(``pandas_schema``, ``pandas_dtype_for``, ``arrow_to_pandas``) stay importable
from where they were; the code lives in :mod:`cape_pipelines.pandas`.
"""

from __future__ import annotations

from .pandas.apply import apply_policy
from .pandas.convert import arrow_to_pandas, pandas_dtype_for, pandas_schema

__all__ = ["apply_policy", "arrow_to_pandas", "pandas_dtype_for", "pandas_schema"]
