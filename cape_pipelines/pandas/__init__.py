"""pandas adapter: apply a policy to a pandas DataFrame (or a pyarrow Table/RecordBatch).

Importing this package (``import cape_pipelines`` does) registers the
``df.cape`` accessor. Its files mirror the other adapters: ``apply.py`` (the
entry point), ``convert.py`` (schemas and dtypes), ``files.py`` (``cape apply
--engine pandas``) and ``accessor.py``.

>>> import pandas as pd
>>> import cape_pipelines.pandas as cpd
>>> from cape_pipelines.audit import MemorySink
>>> df = pd.DataFrame({"name": ["a", "b"], "ssn": ["1", "2"]})
>>> pol = {"label": "demo", "rules": [{"match": {"name": "ssn"}, "actions": ["drop"]}]}
>>> list(df.cape.apply(pol, audit=MemorySink()).columns)
['name']
"""

from __future__ import annotations

from . import accessor as _accessor  # noqa: F401  (registers the ``df.cape`` accessor)
from .apply import apply_frame, apply_policy
from .convert import pandas_schema

__all__ = ["apply_frame", "apply_policy", "pandas_schema"]
