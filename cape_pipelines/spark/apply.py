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
``run.completed`` with counts of the data the action produced, or
``run.failed``. :func:`collect` counts the collected table. :func:`write`
counts the rows flowing into Spark's writer with observed metrics
(``DataFrame.observe``), computed in the write's own job; the rows read, when
the policy removes rows, are observed below ``mapInArrow`` in that same job.
The observations sit in the action's result stage, where Spark merges the
metrics of one successful attempt per partition and none of a failed attempt
(and Spark 4.3 by default keeps only the last successful attempt of each
partition in any stage), so a retried task or a speculative copy is not
counted twice. Where Spark does not report the metrics, or the session asked
for the legacy all-attempts metrics, the written files are read back and
counted instead. See docs/engines/spark.md for the evidence.

Counts a transformation provides itself (``text-scrub``'s findings per
entity type) exist only inside ``mapInArrow``; when the plan has any, the
audited action runs one more job over the source that applies the plan and
returns just those counts (one row per partition), summed on the driver.

A policy's ``risk:`` section: the report groups the policy's output by the
quasi-identifiers (and the sensitive column) with ``groupBy`` in a job of its
own, and the driver turns the grouped rows into the figure. ``action:
suppress`` is part of the lazy DataFrame :func:`apply_policy` returns: the
output anti-joined (null-safe) with its own classes below ``k``. Both sides
of that join, and the report, are computed from the same source by the same
deterministic policy, so they describe the same rows; a source that can
change between two scans (a table being appended to) should be cached or
checkpointed first. As with any Spark join, the output's row order is not
defined.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

import pyarrow as pa
from pyspark.sql import DataFrame, Observation
from pyspark.sql import functions as F
from typing_extensions import Unpack

from .._workers import spark_workers
from ..core import Counters, apply_batch, counted_names
from ..plan import ColumnStep, FilterStep, Plan
from ..policy.load import PolicySource
from ..seam import Binding, BindOptions, Tracked, bind
from ..transforms.risk import ClassCounts, RiskCheck
from .convert import cast_batch, schema_to_arrow, schema_to_spark, wire_schema

ENGINE = "spark"


class PolicyFunction:
    """The ``mapInArrow`` function: Spark's Arrow batches through the core and back.

    Batches arrive in Spark's wire types (timestamps in UTC); consecutive ones
    are joined up to :attr:`coalesce_rows` rows, cast to the plan's input
    types, transformed, and cast back to the wire types of the output schema.
    Joining matters because Spark's batches are small
    (``spark.sql.execution.arrow.maxRecordsPerBatch``, 10,000 rows by default)
    and the core has a cost per batch (the cardinality sample, per-step
    set-up): the bench policy took 1.27 CPU s per million rows in 10,000-row
    batches against 1.00 s in 125,000-row ones. The output does not depend on
    how rows are batched (see docs/engines/spark.md, "Scaling on a cluster"),
    so it is the same bytes; a Python worker holds at most one joined batch
    and its output at a time.
    An empty partition yields nothing, which Spark accepts.
    """

    coalesce_rows = 131_072
    """Rows of consecutive Spark batches joined before the core runs (fewer at the end)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.wire_out = wire_schema(plan.output_schema)

    def __repr__(self) -> str:
        return f"PolicyFunction({self.plan!r})"

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        pending: list[pa.RecordBatch] = []
        rows = 0
        for batch in batches:
            if batch.num_rows == 0:
                continue
            pending.append(batch)
            rows += batch.num_rows
            if rows >= self.coalesce_rows:
                yield from self._apply(pending)
                pending, rows = [], 0
        if pending:
            yield from self._apply(pending)

    def _apply(self, pending: list[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        batch = pending[0] if len(pending) == 1 else pa.concat_batches(pending)
        batch = cast_batch(batch, self.plan.input_schema)
        out, _, _ = apply_batch(self.plan, batch)
        if out.num_rows:
            yield cast_batch(out, self.wire_out)


class CountFunction:
    """A ``mapInArrow`` function that applies the plan and yields only what its
    transformations counted: one JSON row per partition."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def __repr__(self) -> str:
        return f"CountFunction({self.plan!r})"

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        total = Counters()
        for batch in batches:
            if batch.num_rows == 0:
                continue
            _, counters, _ = apply_batch(self.plan, cast_batch(batch, self.plan.input_schema))
            total.merge(Counters(counts=counters.counts))
        yield pa.RecordBatch.from_pydict({"counts": [json.dumps(total.counts)]})


def provided_counts(plan: Plan, source: DataFrame) -> dict[str, dict[str, int]]:
    """The transformation-provided counts of applying ``plan`` to ``source`` (a job of its
    own; nothing to run when the plan's transformations count nothing)."""
    if not counted_names(plan):
        return {}
    from pyspark.sql import types as T

    schema = T.StructType([T.StructField("counts", T.StringType())])
    total = Counters()
    for row in source.mapInArrow(CountFunction(plan), schema).collect():
        total.merge(Counters(counts=json.loads(row["counts"])))
    return total.counts


def _risk_classes(check: RiskCheck, produced: DataFrame) -> ClassCounts:
    """The global class counts of ``produced`` (the output before suppression): a groupBy."""
    grouped = produced.groupBy(*[F.col(_quoted(c)) for c in check.columns]).agg(
        F.count(F.lit(1)).alias("__cape_rows")
    )
    table = grouped.toArrow()
    return ClassCounts.of_grouped(table, check.quasi_identifiers, check.sensitive, "__cape_rows")


def _suppressed(check: RiskCheck, produced: DataFrame) -> DataFrame:
    """``produced`` without the rows in classes below ``k``: a null-safe anti-join with them."""
    qis = check.quasi_identifiers
    small = (
        produced.groupBy(*[F.col(_quoted(q)) for q in qis])
        .agg(F.count(F.lit(1)).alias("__cape_rows"))
        .filter(F.col("__cape_rows") < check.k)
        .select(*[F.col(_quoted(q)).alias(f"__cape_qi{i}") for i, q in enumerate(qis)])
    )
    same = [F.col(_quoted(q)).eqNullSafe(F.col(f"__cape_qi{i}")) for i, q in enumerate(qis)]
    return produced.join(small, on=reduce(lambda a, b: a & b, same), how="left_anti")


def _finish_counters(bound: _Bound, counters: Counters) -> Counters:
    """Add the transformation counts and the risk figure (each a job of its own) to ``counters``."""
    provided = provided_counts(bound.plan, bound.source)
    if provided:
        counters.merge(Counters(counts=provided))
    check = bound.plan.risk
    if check is not None:
        from ..risk_run import risk_of

        counters.risk = risk_of(bound.plan, _risk_classes(check, bound.produced))
    return counters


@dataclass(frozen=True)
class _Bound:
    """What an audited action needs to know about a DataFrame made by :func:`apply_policy`."""

    binding: Binding
    plan: Plan
    source: DataFrame
    # The policy's output before a risk suppression (the DataFrame itself without one).
    produced: DataFrame


# Keyed by the returned DataFrame object; an entry lives as long as that object.
_BINDINGS: Tracked[_Bound] = Tracked(
    "not a DataFrame returned by cape_pipelines.spark.apply_policy; audited actions "
    "take that DataFrame itself (a DataFrame derived from it has lost its plan)"
)


def session_time_zone(sdf: DataFrame) -> str:
    """The session time zone, which plays the role of a Spark ``TIMESTAMP``'s zone."""
    return sdf.sparkSession.conf.get("spark.sql.session.timeZone") or "UTC"


def apply_policy(
    sdf: DataFrame, policy: PolicySource | Binding, **options: Unpack[BindOptions]
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
    binding = bind(policy, engine=ENGINE, **options)
    plan = binding.plan(
        lambda: schema_to_arrow(sdf.schema, session_time_zone(sdf)), workers=spark_workers(sdf)
    )
    produced = _policy_frame(plan, sdf)
    out = produced
    if plan.risk is not None and plan.risk.suppress:
        out = _suppressed(plan.risk, produced)
    _BINDINGS.remember(out, _Bound(binding, plan, sdf, produced))
    return out


def _quoted(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _policy_frame(plan: Plan, sdf: DataFrame) -> DataFrame:
    """``sdf`` with ``plan`` applied: the lazy DataFrame :func:`apply_policy` returns."""
    if all(not isinstance(s, ColumnStep | FilterStep) for s in plan.steps):
        # Only columns removed: Spark's own projection is exactly that, and costs nothing.
        return sdf.select(*[F.col(_quoted(c)) for c in plan.output_schema.names])
    return sdf.mapInArrow(PolicyFunction(plan), schema_to_spark(plan.output_schema))


def plan_of(out: DataFrame) -> Plan:
    """The plan behind a DataFrame returned by :func:`apply_policy`."""
    return _BINDINGS[out].plan


LEGACY_ALL_ATTEMPTS = "spark.sql.legacy.observeMetricsAggregateAllAttempts"
"""Spark's switch back to observed metrics summed over every successful task attempt."""


class _Observed:
    """The DataFrame an audited action runs, with its counts observed in that same action.

    ``frame`` returns the same rows as the DataFrame :func:`apply_policy` made.
    With ``output``, the rows it produces and their non-null values per
    transformed column are observed on top of it. When the plan removes rows,
    the rows going into the policy are observed too, below ``mapInArrow`` and
    so in the same stage: ``frame`` is then a fresh copy of the policy over
    the source (an observation can be attached only once), unless the
    DataFrame is cached, whose cache a copy would miss. Nothing is observed
    when ``trusted`` is false; the caller then counts another way.
    """

    def __init__(self, binding: _Bound, out: DataFrame, *, output: bool, trusted: bool = True):
        self.plan = binding.plan
        self.source = binding.source
        self.columns = list(self.plan.transformed_columns)
        self.into: Observation | None = None
        self.out: Observation | None = None
        self.frame = out
        if not trusted:
            return
        self.suppress = self.plan.risk is not None and self.plan.risk.suppress
        # Under a suppression the source is scanned twice (both sides of the join): an
        # observation there would see it twice, so rows in are counted on their own.
        if self.plan.filters_rows and not self.suppress and not getattr(out, "is_cached", False):
            self.into = Observation()
            observed_in = self.source.observe(self.into, F.count(F.lit(1)).alias("rows"))
            self.frame = _policy_frame(self.plan, observed_in)
        if output:
            self.out = Observation()
            counts = [F.count(F.col(_quoted(c))).alias(f"v{i}") for i, c in enumerate(self.columns)]
            self.frame = self.frame.observe(self.out, F.count(F.lit(1)).alias("rows"), *counts)

    def rows_in(self, rows_out: int) -> int:
        """Rows read: ``rows_out`` unless the plan removes rows, then observed (or counted)."""
        if not self.plan.filters_rows and not self.suppress:
            return rows_out
        seen = _metrics(self.into, ["rows"]) if self.into is not None else None
        return seen["rows"] if seen is not None else int(self.source.count())

    def output_counters(self) -> Counters | None:
        """The output counts observed in the action, or None if there are none."""
        names = [f"v{i}" for i in range(len(self.columns))]
        seen = _metrics(self.out, ["rows", *names]) if self.out is not None else None
        if seen is None:
            return None
        values = {c: seen[name] for c, name in zip(self.columns, names, strict=True)}
        return Counters.of_counts(self.plan, rows_in=0, rows_out=seen["rows"], values=values)


def _legacy_all_attempts(sdf: DataFrame) -> bool:
    """Whether the session sums observed metrics over all successful attempts (legacy mode).

    The write's observation is in its result stage, where even that mode
    merges one attempt per partition; but a writer that adds a shuffle above
    it (some table formats' optimised writes) would put it in a map stage, in
    which a recomputed stage is counted again. Reading back is exact there.
    """
    value = sdf.sparkSession.conf.get(LEGACY_ALL_ATTEMPTS, "false")
    return str(value).strip().lower() == "true"


def _metrics(obs: Observation, names: Sequence[str]) -> dict[str, int] | None:
    """The integer metrics ``names`` that ``obs`` saw in the action just run, or None.

    ``Observation.get`` blocks until the action reports the metrics; a
    command that does not report them would block forever. Classic PySpark
    exposes the JVM side's future, which is checked first; Spark completes it
    before the action returns. Spark reports an empty row for an observation
    its plan did not hold.
    """
    jo = getattr(obs, "_jo", None)
    if jo is not None:
        try:
            if not jo.future().isCompleted():
                return None
        except Exception:  # an internal API: without it, do not risk blocking
            return None
    try:
        seen = obs.get
    except Exception:
        return None
    if any(not isinstance(seen.get(n), int) for n in names):
        return None
    return {n: int(seen[n]) for n in names}


def counters_from_dataframe(plan: Plan, produced: DataFrame) -> Counters:
    """Output counts of ``produced`` (rows, non-null values per transformed column), by one
    aggregation; ``rows_in`` is left at 0 for the caller."""
    cols = list(plan.transformed_columns)
    aggs = [F.count(F.lit(1)).alias("rows")]
    aggs += [F.count(F.col(_quoted(c))).alias(f"v{i}") for i, c in enumerate(cols)]
    row = produced.agg(*aggs).collect()[0]
    values = {c: int(row[f"v{i}"]) for i, c in enumerate(cols)}
    return Counters.of_counts(plan, rows_in=0, rows_out=int(row["rows"]), values=values)


def collect(out: DataFrame) -> pa.Table:
    """Run ``out`` and return it as a pyarrow Table in the plan's output types: one audited run.

    The output counts come from the table; when the plan removes rows, the
    rows read are observed in the same job.
    """
    bound = _BINDINGS[out]
    with bound.binding.run(bound.plan) as run:
        observed = _Observed(bound, out, output=False)
        table = _to_arrow(observed.frame).cast(bound.plan.output_schema)
        counters = Counters.of_batch(bound.plan, table, rows_in=0)
        counters.rows_in = observed.rows_in(counters.rows_out)
        run.counters = _finish_counters(bound, counters)
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

    The counts are observed on the rows Spark's writer receives, in the
    write's own job (see the module docstring). If Spark does not report them,
    or ``spark.sql.legacy.observeMetricsAggregateAllAttempts`` is on, the
    files just written are read back in one aggregation instead (for
    ``mode="append"`` the path also holds older data, so ``out`` is aggregated
    again; the policy is deterministic, so that recomputation yields the same
    rows). ``mode="ignore"`` is refused: it may write nothing, and the run
    could not say so.
    """
    if mode == "ignore":
        raise ValueError("write(mode='ignore') is not supported: a run must know what it wrote")
    bound = _BINDINGS[out]
    with bound.binding.run(bound.plan) as run:
        observed = _Observed(bound, out, output=True, trusted=not _legacy_all_attempts(out))
        writer = observed.frame.write.format(format).mode(mode).options(**options)
        if partition_by:
            writer = writer.partitionBy(*partition_by)
        writer.save(path)
        counters = observed.output_counters()
        if counters is None:
            if mode in _READ_BACK_MODES:
                produced = out.sparkSession.read.format(format).options(**options).load(path)
            else:
                produced = out
            counters = counters_from_dataframe(bound.plan, produced)
        counters.rows_in = observed.rows_in(counters.rows_out)
        run.counters = counters = _finish_counters(bound, counters)
    return counters
