"""The pandas adapter: ``apply_policy`` for pandas DataFrames and pyarrow Tables/RecordBatches.

In-memory data is one batch: the plan is built on the data's schema through
the seam (:func:`cape_pipelines.seam.bind`), applied by the core, and the run
recorded by the seam's :class:`~cape_pipelines.seam.Run`. :func:`apply_frame`
is the frame-level step Dask reuses on every partition.
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import copy
from typing import Any, TypeVar

import pandas as pd
import pyarrow as pa
from typing_extensions import Unpack

from ..core import Counters, apply_batch, apply_table
from ..plan import DropStep, Plan, Step
from ..policy.load import PolicySource
from ..seam import Binding, BindOptions, bind
from .convert import arrow_to_pandas, pandas_dtype_for, pandas_schema

Data = TypeVar("Data")


def apply_frame(
    plan: Plan, df: pd.DataFrame, new_strings: Any = object
) -> tuple[pd.DataFrame, Counters]:
    """Apply ``plan`` to one pandas frame; the frame's index follows its rows.

    Only the columns the plan reads go through Arrow; untouched columns keep
    their dtypes exactly. Dask calls this on every partition.
    """
    needed = plan.used_columns
    if not needed:
        result = df.drop(columns=plan.dropped)
        return result, Counters.of_counts(plan, rows_in=len(df), rows_out=len(df), values={})
    table = pa.Table.from_pandas(
        df[needed],
        preserve_index=False,
        schema=pa.schema([plan.input_schema.field(c) for c in needed]),
    )
    batch = table.combine_chunks().to_batches()
    if batch:
        rb = batch[0]
    else:
        rb = pa.RecordBatch.from_pylist([], schema=table.schema)
    # Untouched columns never go through Arrow, so the frame keeps their dtypes exactly.
    narrow = _narrow_plan(plan, needed)
    out, counters, indices = apply_batch(narrow, rb, with_indices=True)
    assert indices is not None  # asked for with_indices
    result = df.iloc[indices.to_numpy()] if plan.filters_rows else df.copy(deep=False)
    result = result.drop(columns=[c for c in plan.dropped if c in result.columns])
    result = result.copy(deep=False)
    for c in plan.transformed_columns:
        col = arrow_to_pandas(
            out.column(c), pandas_dtype_for(out.schema.field(c).type, df[c].dtype, new_strings)
        )
        col.index = result.index
        result[c] = col
    counters.rows_in = len(df)
    counters.rows_out = len(result)
    return pd.DataFrame(result)[plan.output_schema.names], counters


def _narrow_plan(plan: Plan, needed: Sequence[str]) -> Plan:
    """The same plan over only the columns it reads (untouched columns stay outside Arrow)."""
    keep = set(needed)
    narrow = copy(plan)
    narrow.input_schema = pa.schema([plan.input_schema.field(c) for c in needed])
    steps: list[Step] = []
    for s in plan.steps:
        if isinstance(s, DropStep):
            # An empty step is kept so that step indices (and their state memo) stay aligned.
            steps.append(DropStep(tuple(c for c in s.columns if c in keep), s.location))
        else:
            steps.append(s)
    narrow.steps = steps
    survivors = [c for c in needed if c not in plan.dropped]
    narrow.output_schema = pa.schema([plan.output_schema.field(c) for c in survivors])
    narrow._state = plan._state
    return narrow


def apply_policy(
    policy: PolicySource | Binding, data: Data, **options: Unpack[BindOptions]
) -> Data:
    """Apply ``policy`` to a pandas DataFrame or a pyarrow Table/RecordBatch; same type back.

    The input is never modified; a pandas frame keeps its index (rows removed
    by ``row-redact`` take their index labels with them). One audit run is
    recorded (``run.started`` then ``run.completed`` or ``run.failed``).
    ``options`` are :class:`~cape_pipelines.seam.BindOptions` (``keys``,
    ``audit``, ``column_tags``, ``resolver``, ``client``). With ``client=`` (a
    ``coordinator_client.Client``), ``policy`` is a label: policy and keys come
    from the coordinator, records go to it, and the run also records
    ``policy.fetched`` (see :mod:`cape_pipelines.source`).

    >>> import pandas as pd
    >>> from cape_pipelines.audit import MemorySink
    >>> df = pd.DataFrame({"name": ["a", "b"], "ssn": ["1", "2"]})
    >>> pol = {"label": "demo", "rules": [{"match": {"name": "ssn"}, "actions": ["drop"]}]}
    >>> list(apply_policy(pol, df, audit=MemorySink()).columns)
    ['name']
    """
    engine = "pandas" if type(data).__module__.startswith("pandas") else "pyarrow"
    binding = bind(policy, engine=engine, **options)
    with binding.run() as run:
        result: Any
        if isinstance(data, pa.Table):
            run.plan = binding.build(data.schema)
            result, counters = apply_table(run.plan, data)
        elif isinstance(data, pa.RecordBatch):
            run.plan = binding.build(data.schema)
            result, counters, _ = apply_batch(run.plan, data)
        elif isinstance(data, pd.DataFrame):
            run.plan = binding.build(pandas_schema(data))
            result, counters = apply_frame(run.plan, data)
        else:
            raise TypeError(
                f"apply_policy takes a pandas DataFrame or a pyarrow Table/RecordBatch, "
                f"not {type(data).__name__}; for Beam, Dask and Spark use cape_pipelines.beam, "
                ".dask or .spark"
            )
        if run.plan.risk is not None:
            result, counters = _finish_risk(run.plan, result, counters)
        run.counters = counters
    return result


def _finish_risk(plan: Plan, result: Any, counters: Counters) -> tuple[Any, Counters]:
    """The policy's ``risk:`` section over the whole output (see :mod:`cape_pipelines.risk_run`)."""
    from ..risk_run import finish_frame, finish_table

    if isinstance(result, pd.DataFrame):
        return finish_frame(plan, result, counters)
    if isinstance(result, pa.RecordBatch):
        table, counters = finish_table(plan, pa.Table.from_batches([result]), counters)
        return table.combine_chunks().to_batches()[0] if table.num_rows else result.slice(
            0, 0
        ), counters
    return finish_table(plan, result, counters)


__all__ = ["apply_frame", "apply_policy"]
