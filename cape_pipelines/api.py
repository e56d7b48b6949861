"""``apply_policy`` for in-memory data: pandas DataFrames and pyarrow Tables/RecordBatches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import pyarrow as pa

from .audit import AuditTarget, RunContext
from .core import Counters, apply_batch, apply_table
from .keys import KeyResolver
from .plan import Plan, build_plan
from .policy.load import PolicySource, load_policy

Data = TypeVar("Data")


def pandas_schema(df: Any) -> pa.Schema:
    """The Arrow schema of a pandas frame, column by column (index left out)."""
    fields = []
    for name in df.columns:
        if not isinstance(name, str):
            raise TypeError(f"column names must be strings, found {name!r}")
        fields.append(pa.Schema.from_pandas(df[[name]], preserve_index=False).field(name))
    return pa.schema(fields)


def _apply_pandas(plan: Plan, df: Any) -> tuple[Any, Counters]:
    import pandas as pd

    needed = plan.used_columns
    if not needed:
        result = df.drop(columns=plan.dropped)
        counters = Counters(rows_in=len(df), rows_out=len(df))
        return result, counters
    table = pa.Table.from_pandas(df[needed], preserve_index=False, schema=pa.schema(
        [plan.input_schema.field(c) for c in needed]
    ))
    batch = table.combine_chunks().to_batches()
    if batch:
        rb = batch[0]
    else:
        rb = pa.RecordBatch.from_pylist([], schema=table.schema)
    # Untouched columns never go through Arrow, so the frame keeps their dtypes exactly.
    narrow = _narrow_plan(plan, needed)
    out, counters, indices = apply_batch(narrow, rb, with_indices=True)
    result = df.iloc[indices.to_numpy()] if plan.filters_rows else df.copy(deep=False)
    result = result.drop(columns=[c for c in plan.dropped if c in result.columns])
    transformed = out.select([c for c in plan.transformed_columns]).to_pandas(
        types_mapper=None, split_blocks=True
    )
    transformed.index = result.index
    result = result.copy(deep=False)
    for c in transformed.columns:
        result[c] = transformed[c]
    counters.rows_in = len(df)
    counters.rows_out = len(result)
    return pd.DataFrame(result)[plan.output_schema.names], counters


def _narrow_plan(plan: Plan, needed: Sequence[str]) -> Plan:
    """The same plan over only the columns it reads (untouched columns stay outside Arrow)."""
    from copy import copy

    from .plan import DropStep

    keep = set(needed)
    narrow = copy(plan)
    narrow.input_schema = pa.schema([plan.input_schema.field(c) for c in needed])
    steps = []
    for s in plan.steps:
        if isinstance(s, DropStep):
            cols = tuple(c for c in s.columns if c in keep)
            if cols:
                steps.append(DropStep(cols, s.location))
        else:
            steps.append(s)
    narrow.steps = steps
    survivors = [c for c in needed if c not in plan.dropped]
    narrow.output_schema = pa.schema([plan.output_schema.field(c) for c in survivors])
    narrow._state = plan._state
    return narrow


def apply_policy(
    policy: PolicySource,
    data: Data,
    *,
    keys: Mapping[str, bytes | str] | None = None,
    audit: AuditTarget = None,
    column_tags: Mapping[str, Sequence[str]] | None = None,
    resolver: KeyResolver | None = None,
) -> Data:
    """Apply ``policy`` to a pandas DataFrame or a pyarrow Table/RecordBatch; same type back.

    The input is never modified; a pandas frame keeps its index (rows removed
    by ``row-redact`` take their index labels with them). One audit run is
    recorded (``run.started`` then ``run.completed`` or ``run.failed``).

    >>> import pandas as pd
    >>> from cape_pipelines.audit import MemorySink
    >>> df = pd.DataFrame({"name": ["a", "b"], "ssn": ["1", "2"]})
    >>> pol = {"label": "demo", "rules": [{"match": {"name": "ssn"}, "actions": ["drop"]}]}
    >>> list(apply_policy(pol, df, audit=MemorySink()).columns)
    ['name']
    """
    pol = load_policy(policy)
    engine = "pandas" if type(data).__module__.startswith("pandas") else "pyarrow"
    run = RunContext(engine=engine, sink=audit)
    run.set_policy(pol.label, pol.version, pol.sha256)
    run.started()
    counters: Counters | None = None
    try:
        if isinstance(data, pa.Table):
            plan = build_plan(pol, data.schema, keys=keys, column_tags=column_tags, resolver=resolver)
            result, counters = apply_table(plan, data)
        elif isinstance(data, pa.RecordBatch):
            plan = build_plan(pol, data.schema, keys=keys, column_tags=column_tags, resolver=resolver)
            result, counters, _ = apply_batch(plan, data)
        elif engine == "pandas":
            plan = build_plan(
                pol, pandas_schema(data), keys=keys, column_tags=column_tags, resolver=resolver
            )
            result, counters = _apply_pandas(plan, data)
        else:
            raise TypeError(
                f"apply_policy takes a pandas DataFrame or a pyarrow Table/RecordBatch, "
                f"not {type(data).__name__}; for Beam, Dask and Spark use cape_pipelines.beam, "
                ".dask or .spark"
            )
    except BaseException as exc:
        run.failed(exc)
        raise
    run.completed(counters)
    return result  # type: ignore[return-value]
