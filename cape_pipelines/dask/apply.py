"""``apply_policy`` for Dask DataFrames, and the audited run that computes the result.

The plan is built once, on the driver, from the frame's ``meta``: a missing
column, a type a transformation cannot take or a key no provider has fails
here, before any task runs. The plan (keys inside it) is shipped to the
workers as an argument of ``map_partitions``; each partition goes through
the same pandas<->Arrow path as :func:`cape_pipelines.apply_policy`.

Each output partition carries its :class:`~cape_pipelines.core.Counters` in
``DataFrame.attrs``; :func:`run` computes the requested collections together
with a small reduction over those counters in one pass, so the audit totals
are what the tasks actually returned (a retried task replaces its result, it
is never counted twice).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.dataframe as dd
import pandas as pd
from dask.base import tokenize

from ..api import _apply_pandas
from ..audit import AuditTarget, RunContext
from ..core import ColumnCounter, Counters
from ..keys import KeyResolver
from ..plan import ColumnStep, Plan, build_plan
from ..policy.load import PolicySource
from ..source import CoordinatorClient, resolve_policy
from .convert import dask_schema, new_string_dtype

COUNTERS_ATTR = "cape_pipelines.counters"

# Keys enter a task's name only through an HMAC under this per-process salt, so
# equal plans get equal names in this process and a name reveals nothing about a key.
_TOKEN_SALT = secrets.token_bytes(32)

_MAX_REMEMBERED_FRAMES = 1024


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
class _RunSpec:
    """What the driver keeps about a frame returned by :func:`apply_policy`."""

    label: str
    version: int
    sha256: str
    audit: AuditTarget
    columns: dict[str, str]
    source: str | None = None


_FRAMES: OrderedDict[str, _RunSpec] = OrderedDict()


def _remember(name: str, spec: _RunSpec) -> None:
    _FRAMES[name] = spec
    _FRAMES.move_to_end(name)
    while len(_FRAMES) > _MAX_REMEMBERED_FRAMES:
        _FRAMES.popitem(last=False)


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
    out, counters = _apply_pandas(_warm_plan(task), part, task.new_strings)
    out.attrs = {**out.attrs, COUNTERS_ATTR: counters.to_dict()}
    return out


def _partition_counters(part: pd.DataFrame) -> pd.Series:
    return pd.Series([part.attrs.get(COUNTERS_ATTR)], dtype=object)


def apply_policy(
    ddf: dd.DataFrame,
    policy: PolicySource,
    *,
    keys: Mapping[str, bytes | str] | None = None,
    audit: AuditTarget = None,
    column_tags: Mapping[str, Sequence[str]] | None = None,
    resolver: KeyResolver | None = None,
    client: CoordinatorClient | None = None,
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
    src = resolve_policy(policy, client=client, keys=keys, resolver=resolver, audit=audit)
    pol = src.policy
    plan = build_plan(
        pol, dask_schema(ddf), keys=keys, column_tags=column_tags, resolver=src.resolver
    )
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
    _remember(
        out._name,
        _RunSpec(
            pol.label,
            pol.version,
            pol.sha256,
            src.audit,
            dict(plan.transformed_columns),
            src.source,
        ),
    )
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
    spec = _FRAMES.get(getattr(frame, "_name", None))  # type: ignore[arg-type]
    if spec is None:
        raise TypeError(
            "run() takes the frame returned by cape_pipelines.dask.apply_policy; to compute "
            "something derived from it, pass it as a target: run(frame, derived)"
        )
    counts = frame.map_partitions(
        _partition_counters,
        meta=pd.Series([], dtype=object),
        enforce_metadata=False,
        token="cape-counters",  # noqa: S106  (a task-name prefix, not a secret)
    )
    ctx = RunContext(engine="dask", sink=spec.audit)
    ctx.set_policy(spec.label, spec.version, spec.sha256)
    ctx.started()
    try:
        if spec.source is not None:
            ctx.policy_fetched(spec.source)
        per_partition, *results = dask.compute(counts, *(targets or (frame,)), **compute_kwargs)
        totals = _totals(spec, per_partition)
    except BaseException as exc:
        ctx.failed(exc)
        raise
    ctx.completed(totals)
    for r in results:
        if isinstance(r, pd.DataFrame):
            r.attrs.pop(COUNTERS_ATTR, None)
    return tuple(results)


def _totals(spec: _RunSpec, per_partition: pd.Series) -> Counters:
    totals = Counters(columns={c: ColumnCounter(t) for c, t in spec.columns.items()})
    for d in per_partition:
        if d is None:
            raise RuntimeError("a partition came back without its counters")
        totals.merge(Counters.from_dict(d))
    return totals


def compute(frame: dd.DataFrame, **compute_kwargs: Any) -> pd.DataFrame:
    """One audited run that collects ``frame`` into a pandas DataFrame (see :func:`run`)."""
    return run(frame, **compute_kwargs)[0]
