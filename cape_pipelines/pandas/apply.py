"""The pandas adapter: ``apply_policy`` for pandas DataFrames and pyarrow Tables/RecordBatches.

In-memory data is one batch: the plan is built on the data's schema through
the seam (:func:`cape_pipelines.seam.bind`), applied by the core, and the run
recorded by the seam's :class:`~cape_pipelines.seam.Run`. :func:`apply_frame`
is the frame-level step Dask reuses on every partition.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Generator, Mapping, Sequence
from copy import copy
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
from typing_extensions import Unpack

from ..core import Counters, apply_batch, apply_table
from ..plan import DropStep, Plan, Step
from ..policy.load import PolicySource
from ..pool import ordered_map
from ..seam import Binding, BindOptions, bind
from .convert import arrow_to_pandas, pandas_dtype_for, pandas_schema

Data = TypeVar("Data")


def apply_frame(
    plan: Plan,
    df: pd.DataFrame,
    new_strings: Any = object,
    *,
    converted: Mapping[str, pa.Array] | None = None,
    string_dtype: Any = None,
    workers: int = 1,
) -> tuple[pd.DataFrame, Counters]:
    """Apply ``plan`` to one pandas frame; the frame's index follows its rows.

    Only the columns the plan reads go through Arrow; untouched columns keep
    their dtypes exactly. Dask calls this on every partition. ``converted``
    holds columns already converted to Arrow (by :func:`pandas_schema`), used
    where their type is the plan's. ``string_dtype``, when set, is the dtype
    of every transformed column that holds strings (see :func:`apply_policy`).
    With ``workers`` above 1 the rows are cut into slices that forked
    processes put through the core (:func:`cape_pipelines.pool.ordered_map`);
    the slices come back in order, so the result is the one ``workers=1`` gives.
    """
    needed = plan.used_columns
    if not needed:
        result = df.drop(columns=plan.dropped)
        return result, Counters.of_counts(plan, rows_in=len(df), rows_out=len(df), values={})
    part = _FramePart(plan, df, converted or {})
    n = len(df)

    def parts() -> Generator[tuple[pa.RecordBatch, Counters, np.ndarray], None, None]:
        if workers > 1 and n >= 2 * _MIN_SLICE:
            size = max(_MIN_SLICE, -(-n // (workers * _SLICES_PER_WORKER)))
            bounds = [(start, min(n, start + size)) for start in range(0, n, size)]
            yield from ordered_map(part, bounds, workers)
        else:
            yield part((0, n))

    # Columns of Python-object-free dtypes become pandas columns slice by slice, as the
    # slices arrive and while the workers still work on the next ones, rather than all
    # at the end in this process alone. Columns holding Python objects are converted
    # once, whole, as with one process: which values share one object depends on the
    # whole column (and shows in a pickle of the frame).
    # Closing stops the workers at once if a conversion fails.
    with contextlib.closing(parts()) as done:
        first = next(done)
        schema, counters = first[0].schema, first[1]
        dtypes = {
            c: _dtype_for(schema.field(c).type, df[c].dtype, new_strings, string_dtype)
            for c in plan.transformed_columns
        }
        early = {c for c, dtype in dtypes.items() if _holds_no_objects(dtype)}
        pieces: dict[str, list[Any]] = {c: [] for c in dtypes}
        kept_parts = []
        for i, (out, counted, kept_part) in enumerate(itertools.chain([first], done)):
            if i:
                counters.merge(counted)
            kept_parts.append(kept_part)
            for c in dtypes:
                col = out.column(c)
                pieces[c].append(arrow_to_pandas(col, dtypes[c]) if c in early else col)
    kept = kept_parts[0] if len(kept_parts) == 1 else np.concatenate(kept_parts)
    result = df.iloc[kept] if plan.filters_rows else df
    dropped = [c for c in plan.dropped if c in result.columns]
    # A shallow copy either way: the caller's frame is never modified.
    result = result.drop(columns=dropped) if dropped else result.copy(deep=False)
    for c, chunks in pieces.items():
        if c not in early:
            whole = chunks[0] if len(chunks) == 1 else pa.chunked_array(chunks)
            col = arrow_to_pandas(whole, dtypes[c])
        else:
            col = chunks[0] if len(chunks) == 1 else pd.concat(chunks, ignore_index=True)
        col.index = result.index
        result[c] = col
    counters.rows_in = len(df)
    counters.rows_out = len(result)
    names = plan.output_schema.names
    if list(result.columns) != names:
        result = result[names]
    return pd.DataFrame(result), counters


def _dtype_for(out_type: pa.DataType, in_dtype: Any, new_strings: Any, string_dtype: Any) -> Any:
    """The pandas dtype of a transformed column (``string_dtype`` first, for string columns)."""
    if string_dtype is not None and (
        pa.types.is_string(out_type) or pa.types.is_large_string(out_type)
    ):
        return string_dtype
    return pandas_dtype_for(out_type, in_dtype, new_strings)


def _holds_no_objects(dtype: Any) -> bool:
    """Whether a column of ``dtype`` holds no Python objects (so it converts slice by slice)."""
    if isinstance(dtype, np.dtype):
        return dtype.kind != "O"
    if isinstance(dtype, pd.StringDtype):
        return dtype.storage != "python"
    if isinstance(dtype, pd.ArrowDtype | pd.DatetimeTZDtype | pd.BooleanDtype):
        return True
    # pandas' nullable integers and floats (Int64, Float64, ...).
    return isinstance(dtype, pd.api.extensions.ExtensionDtype) and dtype.kind in "iuf"


# A frame is cut for workers only into slices of at least this many rows (fewer
# would cost more in start-up and pickling than the work they share).
_MIN_SLICE = 16_384
# Slices per worker: a few, so that one slow slice does not leave the others idle.
_SLICES_PER_WORKER = 4


class _FramePart:
    """Rows ``[start, stop)`` of a frame through the core: (output batch, counters, kept rows).

    A worker process inherits it (frame, plan and keys) when it is forked, so
    only the slice bounds go to the worker and only the transformed columns
    come back.
    """

    def __init__(self, plan: Plan, df: pd.DataFrame, converted: Mapping[str, pa.Array]):
        self.df = df
        needed = plan.used_columns
        self.fields = [plan.input_schema.field(c) for c in needed]
        self.converted = {
            f.name: converted[f.name]
            for f in self.fields
            if f.name in converted and converted[f.name].type == f.type
        }
        # Untouched columns never go through Arrow, so the frame keeps their dtypes exactly.
        self.narrow = _narrow_plan(plan, needed)

    def __call__(self, bounds: tuple[int, int]) -> tuple[pa.RecordBatch, Counters, np.ndarray]:
        start, stop = bounds
        whole = start == 0 and stop == len(self.df)
        rest = [f for f in self.fields if f.name not in self.converted]
        arrays: dict[str, Any] = {
            c: a if whole else a.slice(start, stop - start) for c, a in self.converted.items()
        }
        if rest:
            rows = self.df if whole else self.df.iloc[start:stop]
            table = pa.Table.from_pandas(
                rows[[f.name for f in rest]], preserve_index=False, schema=pa.schema(rest)
            )
            arrays.update(zip(table.column_names, table.columns, strict=True))
        schema = pa.schema(self.fields)
        table = pa.Table.from_arrays([arrays[f.name] for f in self.fields], schema=schema)
        batches = table.combine_chunks().to_batches()
        rb = batches[0] if batches else pa.RecordBatch.from_pylist([], schema=schema)
        out, counters, indices = apply_batch(self.narrow, rb, with_indices=True)
        assert indices is not None  # asked for with_indices
        kept = indices.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        return out, counters, kept + start if start else kept


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
    policy: PolicySource | Binding,
    data: Data,
    *,
    workers: int = 1,
    string_dtype: str | None = None,
    **options: Unpack[BindOptions],
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

    ``workers`` (pandas frames): with more than one, a large frame is cut
    into row slices that forked worker processes put through the core (they
    inherit the plan and its keys; only slice bounds go to them and only the
    transformed columns come back), reassembled in order: the same frame,
    index and audit counts as with one. Frames under 32,768 rows, and
    platforms without ``fork``, are done in this process.
    :func:`cape_pipelines.pool.default_workers` is this machine's cores.

    ``string_dtype`` (pandas frames only) is the dtype of the transformed
    columns that hold strings. None (the default) keeps each column's own
    string dtype (``object`` stays ``object``, ``string[pyarrow]`` stays
    ``string[pyarrow]``; a column that becomes text, a tokenized integer say,
    is ``object``). ``"string[pyarrow]"`` hands them back Arrow-backed, with
    no Python object made per value (the fastest way for large frames);
    ``"object"`` makes them all ``object``.

    >>> import pandas as pd
    >>> from cape_pipelines.audit import MemorySink
    >>> df = pd.DataFrame({"name": ["a", "b"], "ssn": ["1", "2"]})
    >>> pol = {"label": "demo", "rules": [{"match": {"name": "ssn"}, "actions": ["drop"]}]}
    >>> list(apply_policy(pol, df, audit=MemorySink()).columns)
    ['name']
    """
    strings = _string_dtype(string_dtype)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
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
            converted: dict[str, pa.Array] = {}
            run.plan = binding.build(pandas_schema(data, converted))
            result, counters = apply_frame(
                run.plan, data, converted=converted, string_dtype=strings, workers=workers
            )
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


def _string_dtype(name: str | None) -> Any:
    """The pandas dtype ``apply_policy(string_dtype=name)`` asks for (None: each column's own)."""
    if name is None:
        return None
    if name == "object":
        return np.dtype(object)
    if name == "string[pyarrow]":
        return pd.StringDtype("pyarrow")
    raise ValueError(f"string_dtype must be None, 'object' or 'string[pyarrow]', not {name!r}")


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
