"""``apply_policy`` for Spark DataFrames, and the audited actions that make a run.

The plan is built once, on the driver, from the DataFrame's schema (converted
to Arrow), with every key resolved there: a missing column, a type a
transformation cannot take, a missing key or a policy that drops every column
fail when :func:`apply_policy` is called, before any job runs. The returned
DataFrame is lazy; its rows go through the one core in ``mapInArrow``, a whole
Arrow batch at a time. The plan, keys included, is pickled into that function
and shipped to the executors.

A run on Spark is one action. :func:`write` and :func:`collect` are the
audited actions: each emits ``run.started``, runs the action, then
``run.completed`` with counts taken from the data the action produced (the
collected table, or the written files read back) — never from accumulators,
which a retried task or a recomputed stage counts twice — or ``run.failed``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ..audit import AuditTarget, RunContext
from ..core import ColumnCounter, Counters, apply_batch
from ..keys import KeyResolver
from ..plan import ColumnStep, FilterStep, Plan, build_plan
from ..policy.load import PolicySource
from ..source import CoordinatorClient, resolve_policy
from .types import cast_batch, schema_to_arrow, schema_to_spark, wire_schema

ENGINE = "spark"


class PolicyFunction:
    """The ``mapInArrow`` function: Spark's Arrow batches through the core and back.

    Batches arrive in Spark's wire types (timestamps in UTC); they are cast to
    the plan's input types, transformed, and cast back to the wire types of the
    output schema. An empty partition yields nothing, which Spark accepts.
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        self.wire_out = wire_schema(plan.output_schema)

    def __repr__(self) -> str:
        return f"PolicyFunction({self.plan!r})"

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            batch = cast_batch(batch, self.plan.input_schema)
            out, _, _ = apply_batch(self.plan, batch)
            if out.num_rows:
                yield cast_batch(out, self.wire_out)


@dataclass
class _Binding:
    """What an audited action needs to know about a DataFrame made by :func:`apply_policy`."""

    plan: Plan
    source: DataFrame
    audit: AuditTarget
    fetched_from: str | None = None

    def new_run(self) -> RunContext:
        run = RunContext(engine=ENGINE, sink=self.audit)
        run.set_policy(self.plan.label, self.plan.version, self.plan.sha256)
        return run

    def start(self, run: RunContext) -> None:
        """Emit ``run.started`` (and ``policy.fetched`` for a policy from a coordinator)."""
        run.started()
        if self.fetched_from is not None:
            run.policy_fetched(self.fetched_from)


# Keyed by the returned DataFrame object; an entry lives as long as that object.
_BINDINGS: weakref.WeakKeyDictionary[DataFrame, _Binding] = weakref.WeakKeyDictionary()


def session_time_zone(sdf: DataFrame) -> str:
    """The session time zone, which plays the role of a Spark ``TIMESTAMP``'s zone."""
    return sdf.sparkSession.conf.get("spark.sql.session.timeZone") or "UTC"


def plan_for(
    sdf: DataFrame,
    policy: PolicySource,
    *,
    keys: Mapping[str, bytes | str] | None = None,
    column_tags: Mapping[str, Sequence[str]] | None = None,
    resolver: KeyResolver | None = None,
) -> Plan:
    """Build the plan for ``sdf`` on the driver (keys resolved here, not on executors)."""
    schema = schema_to_arrow(sdf.schema, session_time_zone(sdf))
    return build_plan(policy, schema, keys=keys, column_tags=column_tags, resolver=resolver)


def apply_policy(
    sdf: DataFrame,
    policy: PolicySource,
    *,
    keys: Mapping[str, bytes | str] | None = None,
    audit: AuditTarget = None,
    column_tags: Mapping[str, Sequence[str]] | None = None,
    resolver: KeyResolver | None = None,
    client: CoordinatorClient | None = None,
) -> DataFrame:
    """Apply ``policy`` to a Spark DataFrame; returns a lazy DataFrame with the output schema.

    Every check is done now, on the driver; an error here also emits
    ``run.started`` and ``run.failed`` to ``audit``. Run the result with
    :func:`write` or :func:`collect` to audit it (a plain Spark action on it
    runs the policy but records nothing). With ``client=`` (a
    ``coordinator_client.Client``), ``policy`` is a label: policy and keys come
    from the coordinator now, and the run's records go to it (see
    :mod:`cape_pipelines.source`).

    >>> out = apply_policy(df, {"label": "d", "rules": [  # doctest: +SKIP
    ...     {"match": {"name": "ssn"}, "actions": ["drop"]}]})
    >>> write(out, "/tmp/out.parquet")  # doctest: +SKIP
    """
    src = resolve_policy(policy, client=client, keys=keys, resolver=resolver, audit=audit)
    pol, audit = src.policy, src.audit
    try:
        plan = plan_for(sdf, pol, keys=keys, column_tags=column_tags, resolver=src.resolver)
    except BaseException as exc:
        run = RunContext(engine=ENGINE, sink=audit)
        run.set_policy(pol.label, pol.version, pol.sha256)
        run.started()
        if src.source is not None:
            run.policy_fetched(src.source)
        run.failed(exc)
        raise
    if all(not isinstance(s, ColumnStep | FilterStep) for s in plan.steps):
        # Only columns removed: Spark's own projection is exactly that, and costs nothing.
        out = sdf.select(*[F.col(f"`{c}`") for c in plan.output_schema.names])
    else:
        out = sdf.mapInArrow(PolicyFunction(plan), schema_to_spark(plan.output_schema))
    _BINDINGS[out] = _Binding(plan, sdf, audit, src.source)
    return out


def plan_of(out: DataFrame) -> Plan:
    """The plan behind a DataFrame returned by :func:`apply_policy`."""
    return _binding(out).plan


def _binding(out: DataFrame) -> _Binding:
    try:
        return _BINDINGS[out]
    except (KeyError, TypeError):
        raise TypeError(
            "not a DataFrame returned by cape_pipelines.spark.apply_policy; audited actions "
            "take that DataFrame itself (a DataFrame derived from it has lost its plan)"
        ) from None


def _rows_in(binding: _Binding, rows_out: int) -> int:
    """Rows read: ``rows_out`` unless the plan removes rows, then a count of the input."""
    if not binding.plan.filters_rows:
        return rows_out
    return int(binding.source.count())


def counters_from_table(plan: Plan, table: pa.Table) -> Counters:
    """Output counts of a produced table: rows, and non-null/null values per transformed column."""
    counters = Counters(rows_out=table.num_rows)
    for col, types in plan.transformed_columns.items():
        nulls = table.column(col).null_count
        counters.columns[col] = ColumnCounter(types, table.num_rows - nulls, nulls)
    return counters


def counters_from_dataframe(plan: Plan, produced: DataFrame) -> Counters:
    """The same counts as :func:`counters_from_table`, by one aggregation over ``produced``."""
    cols = list(plan.transformed_columns)
    aggs = [F.count(F.lit(1)).alias("rows")]
    aggs += [F.count(F.col(f"`{c}`")).alias(f"v{i}") for i, c in enumerate(cols)]
    row = produced.agg(*aggs).collect()[0]
    rows = int(row["rows"])
    counters = Counters(rows_out=rows)
    for i, c in enumerate(cols):
        values = int(row[f"v{i}"])
        counters.columns[c] = ColumnCounter(plan.transformed_columns[c], values, rows - values)
    return counters


def collect(out: DataFrame) -> pa.Table:
    """Run ``out`` and return it as a pyarrow Table in the plan's output types: one audited run."""
    binding = _binding(out)
    run = binding.new_run()
    binding.start(run)
    try:
        table = _to_arrow(out)
        table = table.cast(binding.plan.output_schema)
        counters = counters_from_table(binding.plan, table)
        counters.rows_in = _rows_in(binding, counters.rows_out)
    except BaseException as exc:
        run.failed(exc)
        raise
    run.completed(counters)
    return table


def _to_arrow(sdf: DataFrame) -> pa.Table:
    table = sdf.toArrow()
    if table.num_columns != len(sdf.columns):
        # Older Spark versions return no columns for an empty result.
        table = pa.Table.from_batches([], schema=wire_schema(schema_to_arrow(sdf.schema, "UTC")))
    return table


_READ_BACK_MODES = {"error", "errorifexists", "overwrite"}


def write(
    out: DataFrame,
    path: str,
    *,
    format: str = "parquet",
    mode: str = "errorifexists",
    partition_by: Sequence[str] | None = None,
    **options: Any,
) -> Counters:
    """Write ``out`` to ``path`` with Spark's writer: one audited run; returns its counts.

    After the write, the counts come from the files just written, read back in
    one aggregation (for ``mode="append"`` the path also holds older data, so
    ``out`` is aggregated again instead; the policy is deterministic, so that
    recomputation yields the same rows). ``mode="ignore"`` is refused: it may
    write nothing, and the run could not say so.
    """
    if mode == "ignore":
        raise ValueError("write(mode='ignore') is not supported: a run must know what it wrote")
    binding = _binding(out)
    run = binding.new_run()
    binding.start(run)
    try:
        writer = out.write.format(format).mode(mode).options(**options)
        if partition_by:
            writer = writer.partitionBy(*partition_by)
        writer.save(path)
        if mode in _READ_BACK_MODES:
            produced = out.sparkSession.read.format(format).options(**options).load(path)
        else:
            produced = out
        counters = counters_from_dataframe(binding.plan, produced)
        counters.rows_in = _rows_in(binding, counters.rows_out)
    except BaseException as exc:
        run.failed(exc)
        raise
    run.completed(counters)
    return counters
