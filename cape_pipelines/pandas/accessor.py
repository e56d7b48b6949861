"""``df.cape.apply(policy)``: the pandas accessor, registered when this module is imported.

``import cape_pipelines`` imports it, so every pandas frame has ``.cape``
without importing an engine. It only delegates to
:func:`cape_pipelines.pandas.apply_policy`.
"""

from __future__ import annotations

import pandas as pd
from typing_extensions import Unpack

from ..policy.load import PolicySource
from ..seam import BindOptions
from .apply import apply_policy


@pd.api.extensions.register_dataframe_accessor("cape")
class PandasCapeAccessor:
    """``df.cape.apply(policy, keys=...)``: the pandas frame with the policy applied."""

    def __init__(self, obj: pd.DataFrame):
        self._obj = obj

    def apply(self, policy: PolicySource, **options: Unpack[BindOptions]) -> pd.DataFrame:
        """See :func:`cape_pipelines.pandas.apply_policy` (``options``: its keywords)."""
        return apply_policy(policy, self._obj, **options)


__all__ = ["PandasCapeAccessor"]
