"""``apply_policy`` for Dask DataFrames, and the audited run that computes the result.

The plan is built once, on the driver, from the frame's ``meta``: a missing
column, a type a transformation cannot take or a key no provider has fails
here, before any task runs. The plan (keys inside it) is shipped to the
workers as an argument of ``map_partitions``; each partition goes through
the same pandas<->Arrow path as :func:`cape_pipelines.apply_policy`.

The binding and the run are the seam's (:mod:`cape_pipelines.seam`); the frame
returned is remembered by identity, as Spark's are. Each output partition
carries its :class:`~cape_pipelines.core.Counters` in
``DataFrame.attrs``; :func:`run` computes the requested collections together
with a small reduction over those counters in one pass, so the audit totals
are what the tasks actually returned (a retried task replaces its result, it
is never counted twice).

A policy with a ``risk:`` section adds two steps to the graph: each output
partition's equivalence classes, merged into the global counts by one
reduction task (the groupby of the classes, done on Arrow); and, for
``action: suppress``, a second ``map_partitions`` over the same output
partitions that removes the rows whose global class is below ``k`` (the
counts enter each partition task as a Delayed argument). The counts come from
the very partition results that are then filtered and written, inside the one
graph :func:`run` computes; Dask keeps those partitions in memory until the
reduction is done.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

import dask
import dask.dataframe as dd
import pandas as pd
from dask.base import tokenize
from typing_extensions import Unpack

from .._workers import dask_workers
from ..core import Counters
from ..pandas.apply import apply_frame
from ..plan import ColumnStep, Plan
from ..policy.load import PolicySource
from ..seam import Binding, BindOptions, Tracked, bind
from ..transforms.risk import ClassCounts
from .convert import dask_schema, new_string_dtype

COUNTERS_ATTR = "cape_pipelines.counters"

# Keys enter a task's name only through an HMAC under this per-process salt, so
# equal plans get equal names in this process and a name reveals nothing about a key.
_TOKEN_SALT = secrets.token_bytes(32)


class PlanTask:
    """What each partition task receives: the plan and the dtype for new string columns.

    Picklable; Dask tokenizes it by a fingerprint of the plan that holds no key bytes.
    """

    def __init__(self, plan: Plan, new_strings: Any):
        self.plan = plan
        self.new_strings = new_strings
        self.fingerprint = _fingerprint(plan)

    def __repr__(self) -> str:
        return f"PlanTask({self.plan!r})"

    def __dask_tokenize__(self) -> str:
        return self.fingerprint


def _fingerprint(plan: Plan) -> str:
    h = hashlib.sha256()
    for part in (plan.sha256, str(plan.input_schema), str(plan.output_schema)):
        h.update(part.encode("utf-8") + b"\x00")
    for step in plan.steps:
        # Step reprs show transformation parameters but never key material.
        h.update(repr(step).encode("utf-8") + b"\x00")
        if isinstance(step, ColumnStep) and step.key_id is not None:
            h.update(hmac.digest(_TOKEN_SALT, plan.keys[step.key_id], "sha256"))
    return h.hexdigest()


@dataclass(frozen=True)
class _Bound:
    """What the driver keeps about a frame returned by :func:`apply_policy`."""

    binding: Binding
    plan: Plan
    # The global class counts of the output (a Delayed), when the policy has a risk: section.
    classes: Any = None


_FRAMES: Tracked[_Bound] = Tracked(
    "run() takes the frame returned by cape_pipelines.dask.apply_policy; to compute "
    "something derived from it, pass it as a target: run(frame, derived)"
)


# Per worker process: the first copy of each plan seen, so that its memo (keyed HMAC
# states, ciphers) is built once per process, not once per task's unpickled copy.
_WARM_PLANS: dict[str, Plan] = {}
_MAX_WARM_PLANS = 16


def _warm_plan(task: PlanTask) -> Plan:
    plan = _WARM_PLANS.get(task.fingerprint)
    if plan is None:
        if len(_WARM_PLANS) >= _MAX_WARM_PLANS:
            _WARM_PLANS.clear()
        plan = _WARM_PLANS.setdefault(task.fingerprint, task.plan)
    return plan


def _apply_partition(part: pd.DataFrame, task: PlanTask) -> pd.DataFrame:
    out, counters = apply_frame(_warm_plan(task), part, task.new_strings)
    out.attrs = {**out.attrs, COUNTERS_ATTR: counters.to_dict()}
    return out


def _partition_classes(part: pd.DataFrame, task: PlanTask) -> pd.Series:
    from ..risk_run import frame_counts

    return pd.Series([frame_counts(task.plan, part)], dtype=object)


def _merge_classes(parts: pd.Series | pd.DataFrame, task: PlanTask) -> pd.Series:
    from ..risk_run import merge_counts

    # Dask hands a reduction step its inputs concatenated, as a Series or a frame.
    found = [c for c in parts.to_numpy().ravel() if isinstance(c, ClassCounts)]
    return pd.Series([merge_counts(task.plan, found)], dtype=object)


def _only(parts: pd.Series) -> ClassCounts:
    found: ClassCounts = parts.iloc[0]
    return found


def _suppress_partition(part: pd.DataFrame, task: PlanTask, classes: ClassCounts) -> pd.DataFrame:
    from ..risk_run import subtract_rows, suppress_frame

    counted = part.attrs.get(COUNTERS_ATTR)
    kept, removed = suppress_frame(task.plan, part, classes)
    kept = kept.copy(deep=False)
    if counted is not None:
        counters = subtract_rows(task.plan, Counters.from_dict(counted), removed)
        kept.attrs = {**part.attrs, COUNTERS_ATTR: counters.to_dict()}
    return kept


def _with_risk(out: dd.DataFrame, task: PlanTask, meta: pd.DataFrame) -> tuple[dd.DataFrame, Any]:
    """``out`` with the risk section's steps (see the module docstring), and the global counts."""
    risk = task.plan.risk
    assert risk is not None
    partial = out.map_partitions(
        _partition_classes,
        task,
        meta=pd.Series([], dtype=object),
        enforce_metadata=False,
        token=f"cape-classes-{tokenize(task.fingerprint, out._name)}",
    )
    # A tree reduction: partial counts merged in groups, then once more (Dask Scalar).
    classes = partial.reduction(
        _merge_classes,
        aggregate=lambda parts: _only(_merge_classes(parts, task)),
        chunk_kwargs={"task": task},
        combine_kwargs={"task": task},
        combine=_merge_classes,
        meta=object,
    )
    if risk.suppress:
        out = out.map_partitions(
            _suppress_partition,
            task,
            classes,
            meta=meta,
            enforce_metadata=False,
            transform_divisions=False,
            align_dataframes=False,
            token=f"cape-suppress-{tokenize(task.fingerprint, out._name)}",
        )
    return out, classes


def _partition_counters(part: pd.DataFrame) -> pd.Series:
    return pd.Series([part.attrs.get(COUNTERS_ATTR)], dtype=object)


def apply_policy(
    ddf: dd.DataFrame, policy: PolicySource | Binding, **options: Unpack[BindOptions]
) -> dd.DataFrame:
    """Apply ``policy`` to a Dask DataFrame; a lazy Dask DataFrame comes back.

    Nothing is computed here, but everything that can be checked without data
    is: the plan is built now, so a bad column, type or key raises now. The
    result keeps each partition's index (rows removed by ``row-redact`` take
    their labels with them) and its ``meta`` has the output's columns and
    dtypes. Compute it with :func:`compute` or :func:`run` for an audited run
    (``audit`` says where its records go); a plain ``.compute()`` gives the
    same data without audit records. With ``client=`` (a
    ``coordinator_client.Client``), ``policy`` is a label: policy and keys come
    from the coordinator now, and the run's records go to it (see
    :mod:`cape_pipelines.source`).

    >>> import dask.dataframe as dd, pandas as pd
    >>> ddf = dd.from_pandas(pd.DataFrame({"a": [1, 2], "ssn": ["x", "y"]}), npartitions=1)
    >>> pol = {"label": "d", "rules": [{"match": {"name": "ssn"}, "actions": ["drop"]}]}
    >>> list(apply_policy(ddf, pol).columns)
    ['a']
    """
    if not isinstance(ddf, dd.DataFrame):
        raise TypeError(
            f"cape_pipelines.dask.apply_policy takes a dask DataFrame, not {type(ddf).__name__}; "
            "for pandas use cape_pipelines.apply_policy"
        )
    binding = bind(policy, engine="dask", **options)
    plan = binding.plan(dask_schema(ddf), workers=dask_workers())
    task = PlanTask(plan, new_string_dtype())
    # The empty meta, not the non-empty one: Dask's fake values are not valid
    # input for every transformation (a token-reverser cannot authenticate
    # "foo"), and the dtypes come from types alone (api.pandas_dtype_for).
    meta = _apply_partition(ddf._meta, task)
    meta.attrs.pop(COUNTERS_ATTR, None)
    out = ddf.map_partitions(
        _apply_partition,
        task,
        meta=meta,
        token=f"cape-apply-{tokenize(task.fingerprint, ddf._name)}",
        enforce_metadata=False,
        transform_divisions=False,
        align_dataframes=False,
    )
    classes = None
    if plan.risk is not None:
        out, classes = _with_risk(out, task, meta)
    _FRAMES.remember(out, _Bound(binding, plan, classes))
    return out


def run(frame: dd.DataFrame, *targets: Any, **compute_kwargs: Any) -> tuple[Any, ...]:
    """One audited run: compute ``targets`` (default: ``frame`` itself) in one pass.

    ``frame`` is a frame returned by :func:`apply_policy`; ``targets`` are any
    Dask collections built from it, such as ``frame.to_parquet(path,
    compute=False)`` to write without collecting to the driver. Emits
    ``run.started``, then ``run.completed`` with totals over every partition
    of ``frame`` (or ``run.failed`` and re-raises). ``compute_kwargs`` go to
    :func:`dask.compute` (``scheduler=...``). Returns the targets' results.
    """
    bound = _FRAMES[frame]
    counts = frame.map_partitions(
        _partition_counters,
        meta=pd.Series([], dtype=object),
        enforce_metadata=False,
        token="cape-counters",  # noqa: S106  (a task-name prefix, not a secret)
    )
    with bound.binding.run(bound.plan) as audited:
        per_partition, classes, *results = dask.compute(
            counts, bound.classes, *(targets or (frame,)), **compute_kwargs
        )
        audited.counters = _totals(bound.plan, per_partition)
        if bound.plan.risk is not None:
            from ..risk_run import risk_of

            audited.counters.risk = risk_of(bound.plan, classes)
    for r in results:
        if isinstance(r, pd.DataFrame):
            r.attrs.pop(COUNTERS_ATTR, None)
    return tuple(results)


def _totals(plan: Plan, per_partition: pd.Series) -> Counters:
    totals = Counters.empty_for(plan)
    for d in per_partition:
        if d is None:
            raise RuntimeError("a partition came back without its counters")
        totals.merge(Counters.from_dict(d))
    return totals


def compute(frame: dd.DataFrame, **compute_kwargs: Any) -> pd.DataFrame:
    """One audited run that collects ``frame`` into a pandas DataFrame (see :func:`run`)."""
    return run(frame, **compute_kwargs)[0]
