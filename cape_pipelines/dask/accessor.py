"""The ``cape`` accessors: ``ddf.cape.apply(policy)`` (Dask) and ``df.cape.apply(policy)`` (pandas).

Registered when ``cape_pipelines.dask`` is imported. They only delegate to
:func:`cape_pipelines.dask.apply_policy` and :func:`cape_pipelines.apply_policy`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dask.dataframe as dd
import pandas as pd

from ..api import apply_policy as _apply_pandas_policy
from ..audit import AuditTarget
from ..policy.load import PolicySource
from ..source import CoordinatorClient
from .apply import apply_policy as _apply_dask_policy


@dd.extensions.register_dataframe_accessor("cape")
class DaskCapeAccessor:
    """``ddf.cape.apply(policy, keys=...)``: a lazy Dask frame with the policy applied."""

    def __init__(self, ddf: dd.DataFrame):
        self._ddf = ddf

    def apply(
        self,
        policy: PolicySource,
        *,
        keys: Mapping[str, bytes | str] | None = None,
        audit: AuditTarget = None,
        column_tags: Mapping[str, Sequence[str]] | None = None,
        client: CoordinatorClient | None = None,
    ) -> dd.DataFrame:
        """See :func:`cape_pipelines.dask.apply_policy`."""
        return _apply_dask_policy(
            self._ddf, policy, keys=keys, audit=audit, column_tags=column_tags, client=client
        )


@pd.api.extensions.register_dataframe_accessor("cape")
class PandasCapeAccessor:
    """``df.cape.apply(policy, keys=...)``: a new pandas frame with the policy applied."""

    def __init__(self, df: pd.DataFrame):
        self._df = df

    def apply(
        self,
        policy: PolicySource,
        *,
        keys: Mapping[str, bytes | str] | None = None,
        audit: AuditTarget = None,
        column_tags: Mapping[str, Sequence[str]] | None = None,
        client: CoordinatorClient | None = None,
    ) -> Any:
        """See :func:`cape_pipelines.apply_policy`."""
        return _apply_pandas_policy(
            policy, self._df, keys=keys, audit=audit, column_tags=column_tags, client=client
        )
