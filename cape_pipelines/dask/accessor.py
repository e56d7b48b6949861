"""``ddf.cape.apply(policy)``: the Dask accessor, registered on ``import cape_pipelines.dask``.

It only delegates to :func:`cape_pipelines.dask.apply_policy`. The pandas
accessor (``df.cape``) is the pandas adapter's, registered by
``import cape_pipelines``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import dask.dataframe as dd

from ..audit import AuditTarget
from ..policy.load import PolicySource
from ..source import CoordinatorClient
from .apply import apply_policy


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
        return apply_policy(
            self._ddf, policy, keys=keys, audit=audit, column_tags=column_tags, client=client
        )


__all__ = ["DaskCapeAccessor"]
