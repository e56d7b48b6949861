"""``ddf.cape.apply(policy)``: the Dask accessor, registered on ``import cape_pipelines.dask``.

It only delegates to :func:`cape_pipelines.dask.apply_policy`. The pandas
accessor (``df.cape``) is the pandas adapter's, registered by
``import cape_pipelines``.
"""

from __future__ import annotations

import dask.dataframe as dd
from typing_extensions import Unpack

from ..policy.load import PolicySource
from ..seam import BindOptions
from .apply import apply_policy


@dd.extensions.register_dataframe_accessor("cape")
class DaskCapeAccessor:
    """``ddf.cape.apply(policy, keys=...)``: the Dask frame with the policy applied."""

    def __init__(self, obj: dd.DataFrame):
        self._obj = obj

    def apply(self, policy: PolicySource, **options: Unpack[BindOptions]) -> dd.DataFrame:
        """See :func:`cape_pipelines.dask.apply_policy` (``options``: its keywords)."""
        return apply_policy(self._obj, policy, **options)


__all__ = ["DaskCapeAccessor"]
