"""``df.cape.apply(policy)``: the pandas accessor, registered when this module is imported.

``import cape_pipelines`` imports it, so every pandas frame has ``.cape``
without importing an engine. It only delegates to
:func:`cape_pipelines.pandas.apply_policy`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from ..audit import AuditTarget
from ..policy.load import PolicySource
from ..source import CoordinatorClient
from .apply import apply_policy


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
    ) -> pd.DataFrame:
        """See :func:`cape_pipelines.pandas.apply_policy`."""
        return apply_policy(
            policy, self._df, keys=keys, audit=audit, column_tags=column_tags, client=client
        )


__all__ = ["PandasCapeAccessor"]
