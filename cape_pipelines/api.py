"""``apply_policy`` for in-memory data: pandas DataFrames and pyarrow Tables/RecordBatches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import pyarrow as pa

from .audit import AuditTarget, RunContext
from .core import Counters, apply_batch, apply_table
from .errors import DataError, PlanError
from .keys import KeyResolver
from .plan import Plan, build_plan
from .policy.load import PolicySource
from .source import CoordinatorClient, resolve_policy

Data = TypeVar("Data")


def pandas_schema(df: Any) -> pa.Schema:
    """The Arrow schema of a pandas frame, column by column (index left out).

    pandas' ``string`` dtype is read as ``string`` (not the ``large_string`` it
    stores), so a plan sees the same types whether the frame's strings are
    ``object`` or ``string[pyarrow]``.
    """
    import pandas as pd

    fields = []
    if df.columns.has_duplicates:
        dupes = sorted({str(c) for c in df.columns[df.columns.duplicated()]})
        raise PlanError(f"input has duplicate column names: {', '.join(dupes)}")
    for name in df.columns:
        if not isinstance(name, str):
            raise TypeError(f"column names must be strings, found {name!r}")
        try:
            field = pa.Schema.from_pandas(df[[name]], preserve_index=False).field(name)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            # The Arrow message can quote a cell value; only its type is reported.
            raise DataError(
                f"column {name!r} ({df[name].dtype}) cannot be converted to Arrow "
                f"({type(exc).__name__}); give it one type"
            ) from None
        if isinstance(df[name].dtype, pd.StringDtype):
            field = field.with_type(pa.string())
        elif pa.types.is_null(field.type) and df[name].dtype == object:
            # An empty or all-None object column says nothing of its type; pandas object
            # columns hold strings, and a string plan also fits the batches that follow.
            field = field.with_type(pa.string())
        fields.append(field)
    return pa.schema(fields)


def pandas_dtype_for(out_type: pa.DataType, in_dtype: Any, new_strings: Any = object) -> Any:
    """The pandas dtype a transformed column gets: from its Arrow type and its input dtype.

    It depends on types only, never on the values (an integer column with
    nulls stays an integer column), so every partition of a frame gets the same
    dtype and a Dask ``meta`` can be computed on an empty frame. Arrow-backed
    input stays Arrow-backed; ``new_strings`` is the dtype of a column that
    becomes a string column (a tokenized integer, say).
    """
    import numpy as np
    import pandas as pd

    if isinstance(in_dtype, pd.ArrowDtype):
        return pd.ArrowDtype(out_type)
    if pa.types.is_string(out_type) or pa.types.is_large_string(out_type):
        if isinstance(in_dtype, pd.StringDtype) or in_dtype == np.dtype(object):
            return in_dtype
        return new_strings
    numpy_input = isinstance(in_dtype, np.dtype)
    if pa.types.is_integer(out_type):
        dt = np.dtype(out_type.to_pandas_dtype())
        # A numpy integer column holds no nulls, and no transformation makes a null from a value.
        if numpy_input and in_dtype.kind in "iu":
            return dt
        nullable = "I" + dt.name[1:] if dt.kind == "i" else "UI" + dt.name[2:]
        return pd.api.types.pandas_dtype(nullable)
    if pa.types.is_boolean(out_type):
        return np.dtype(bool) if numpy_input and in_dtype.kind == "b" else pd.BooleanDtype()
    if pa.types.is_floating(out_type):
        return np.dtype(out_type.to_pandas_dtype())
    if pa.types.is_timestamp(out_type):
        if out_type.tz is not None:
            return pd.DatetimeTZDtype(unit=out_type.unit, tz=out_type.tz)
        return np.dtype(f"datetime64[{out_type.unit}]")
    if pa.types.is_duration(out_type):
        return np.dtype(f"timedelta64[{out_type.unit}]")
    return np.dtype(object)


def arrow_to_pandas(array: pa.Array | pa.ChunkedArray, dtype: Any) -> Any:
    """An Arrow column as a pandas Series of exactly ``dtype`` (from :func:`pandas_dtype_for`)."""
    import pandas as pd

    if isinstance(dtype, pd.api.extensions.ExtensionDtype):
        return pd.Series(dtype.__from_arrow__(array), copy=False)
    series = array.to_pandas()
    if series.dtype != dtype:
        if dtype.kind in "iub" and array.null_count:
            raise TypeError(f"cannot hold nulls in a {dtype} column")
        series = series.astype(dtype)
    return series


def _apply_pandas(plan: Plan, df: Any, new_strings: Any = object) -> tuple[Any, Counters]:
    import pandas as pd

    needed = plan.used_columns
    if not needed:
        result = df.drop(columns=plan.dropped)
        counters = Counters(rows_in=len(df), rows_out=len(df))
        return result, counters
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
    from copy import copy

    from .plan import DropStep

    keep = set(needed)
    narrow = copy(plan)
    narrow.input_schema = pa.schema([plan.input_schema.field(c) for c in needed])
    steps = []
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
    policy: PolicySource,
    data: Data,
    *,
    keys: Mapping[str, bytes | str] | None = None,
    audit: AuditTarget = None,
    column_tags: Mapping[str, Sequence[str]] | None = None,
    resolver: KeyResolver | None = None,
    client: CoordinatorClient | None = None,
) -> Data:
    """Apply ``policy`` to a pandas DataFrame or a pyarrow Table/RecordBatch; same type back.

    The input is never modified; a pandas frame keeps its index (rows removed
    by ``row-redact`` take their index labels with them). One audit run is
    recorded (``run.started`` then ``run.completed`` or ``run.failed``).
    With ``client=`` (a ``coordinator_client.Client``), ``policy`` is a label:
    policy and keys come from the coordinator, records go to it, and the run
    also records ``policy.fetched`` (see :mod:`cape_pipelines.source`).

    >>> import pandas as pd
    >>> from cape_pipelines.audit import MemorySink
    >>> df = pd.DataFrame({"name": ["a", "b"], "ssn": ["1", "2"]})
    >>> pol = {"label": "demo", "rules": [{"match": {"name": "ssn"}, "actions": ["drop"]}]}
    >>> list(apply_policy(pol, df, audit=MemorySink()).columns)
    ['name']
    """
    src = resolve_policy(policy, client=client, keys=keys, resolver=resolver, audit=audit)
    pol, resolver = src.policy, src.resolver
    engine = "pandas" if type(data).__module__.startswith("pandas") else "pyarrow"
    run = RunContext(engine=engine, sink=src.audit)
    run.set_policy(pol.label, pol.version, pol.sha256)
    run.started()
    counters: Counters | None = None
    try:
        if src.source is not None:
            run.policy_fetched(src.source)
        if isinstance(data, pa.Table):
            plan = build_plan(
                pol, data.schema, keys=keys, column_tags=column_tags, resolver=resolver
            )
            result, counters = apply_table(plan, data)
        elif isinstance(data, pa.RecordBatch):
            plan = build_plan(
                pol, data.schema, keys=keys, column_tags=column_tags, resolver=resolver
            )
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
