"""Dask adapter: apply a policy to a Dask DataFrame, lazily, one partition at a time.

``apply_policy(ddf, policy)`` builds the plan once on the driver (schema from the
frame's ``meta``, keys resolved there) and returns a lazy frame made with
``map_partitions``; each partition goes through the one Arrow core. Importing
this package also registers the ``ddf.cape`` accessor (``df.cape`` is the
pandas adapter's). An
audited run is one call to :func:`compute` or :func:`run` (see docs/engines/dask.md).

>>> import dask.dataframe as dd, pandas as pd
>>> import cape_pipelines.dask as cdask
>>> from cape_pipelines.audit import MemorySink
>>> ddf = dd.from_pandas(pd.DataFrame({"name": ["a", "b"], "ssn": ["1", "2"]}), npartitions=2)
>>> pol = {"label": "demo", "rules": [{"match": {"name": "ssn"}, "actions": ["drop"]}]}
>>> out = cdask.apply_policy(ddf, pol, audit=MemorySink())
>>> list(cdask.compute(out).columns)
['name']
"""

from __future__ import annotations

try:
    import dask.dataframe  # noqa: F401
except ImportError as exc:
    raise ImportError(
        "cape_pipelines.dask needs Dask, which is not installed: pip install 'cape-pipelines[dask]'"
    ) from exc

from . import accessor  # noqa: F401  (registers the ``cape`` accessors)
from .apply import apply_policy, compute, run

__all__ = ["apply_policy", "compute", "run"]
