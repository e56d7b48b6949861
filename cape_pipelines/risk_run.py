"""A policy's ``risk:`` section in a run: measure the output, suppress small classes, count it.

Every engine does the same three things with :class:`~cape_pipelines.transforms.risk.RiskCheck`:
count the equivalence classes of its output globally (however the rows are
split), remove the rows whose *global* class is smaller than ``k`` when the
action is ``suppress``, and put :func:`~cape_pipelines.transforms.risk.risk_record`
of those counts in ``run.completed``. This module holds the pieces that work
on Arrow tables and pandas frames (pandas, ``cape apply``, Dask partitions,
Beam bundles); Spark's are Spark expressions in its adapter.

Suppressed rows are counted like rows removed by ``row-redact``: ``rows_out``
drops, so ``rows_redacted`` (``rows_in - rows_out``) includes them, and the
per-column value and null counts are those of the rows kept. Transformation
counts (``counts``) are what the transformations did, before suppression.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .core import Counters
from .errors import PlanError
from .plan import Plan
from .transforms.risk import ClassCounts, RiskCheck, below_k, risk_record


def _check(plan: Plan) -> RiskCheck:
    if plan.risk is None:
        raise ValueError("the plan has no risk section")
    return plan.risk


def frame_table(plan: Plan, df: pd.DataFrame) -> pa.Table:
    """The risk columns of a pandas frame as Arrow, in the plan's output types where they fit.

    Every partition must give the same types (an all-null partition too), so
    that class counts merge; the plan's output schema fixes them.
    """
    cols = _check(plan).columns
    schema = pa.schema([plan.output_schema.field(c).remove_metadata() for c in cols])
    try:
        return pa.Table.from_pandas(df[cols], schema=schema, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return pa.Table.from_pandas(df[cols], preserve_index=False).cast(schema)


def frame_counts(plan: Plan, df: pd.DataFrame) -> ClassCounts:
    """The class counts of one pandas frame (a whole output, or a Dask partition)."""
    return _check(plan).counts_of(frame_table(plan, df))


def merge_counts(plan: Plan, parts: list[ClassCounts]) -> ClassCounts:
    """Partial class counts (one per partition or batch) merged into the global ones."""
    total = _check(plan).empty_counts()
    return total.merge(*parts) if parts else total


def _kept_counters(plan: Plan, counters: Counters, kept: pa.Table) -> Counters:
    """``counters`` after a suppression: rows out and per-column values of the rows kept."""
    out = Counters.of_batch(plan, kept, rows_in=counters.rows_in, counts=counters.counts)
    out.risk = counters.risk
    return out


def finish_table(
    plan: Plan, table: pa.Table, counters: Counters, counts: ClassCounts | None = None
) -> tuple[pa.Table, Counters]:
    """A whole output table through the risk section: measured, suppressed if asked, counted.

    ``counts``: the global class counts when ``table`` is only part of the
    output (default: those of ``table``). Returns the table written and the
    run's counters with ``risk`` set.
    """
    check = _check(plan)
    if counts is None:
        counts = check.counts_of(table)
    if check.suppress and counts.any_below(check.k):
        small = below_k(table, counts, check.k)
        if pc.any(small).as_py():
            table = table.filter(pc.invert(small))
            counters = _kept_counters(plan, counters, table)
    counters.risk = risk_record(check, counts)
    return table, counters


def suppress_frame(
    plan: Plan, df: pd.DataFrame, counts: ClassCounts
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``df`` split into (rows kept, rows suppressed) by the global ``counts``; order kept."""
    check = _check(plan)
    if not counts.any_below(check.k):
        return df, df.iloc[:0]
    small = below_k(frame_table(plan, df), counts, check.k).to_numpy(zero_copy_only=False)
    return df[~small], df[small]


def values_in(plan: Plan, df: pd.DataFrame) -> dict[str, int]:
    """Non-null values per transformed column of a pandas frame (as Arrow counts them)."""
    out: dict[str, int] = {}
    for c in plan.transformed_columns:
        if c in df.columns:
            out[c] = len(df) - pa.array(df[c], from_pandas=True).null_count
    return out


def finish_frame(
    plan: Plan, df: pd.DataFrame, counters: Counters, counts: ClassCounts | None = None
) -> tuple[pd.DataFrame, Counters]:
    """:func:`finish_table` for a pandas frame (the index follows the rows kept)."""
    check = _check(plan)
    if counts is None:
        counts = frame_counts(plan, df)
    if check.suppress:
        kept, removed = suppress_frame(plan, df, counts)
        if len(removed):
            counters = subtract_rows(plan, counters, removed)
            df = kept
    counters.risk = risk_record(check, counts)
    return df, counters


def subtract_rows(plan: Plan, counters: Counters, removed: pd.DataFrame) -> Counters:
    """``counters`` less the suppressed rows ``removed`` (rows out, values, nulls)."""
    gone = values_in(plan, removed)
    values = {c: col.values - gone.get(c, 0) for c, col in counters.columns.items()}
    out = Counters.of_counts(
        plan,
        rows_in=counters.rows_in,
        rows_out=counters.rows_out - len(removed),
        values=values,
        counts=counters.counts,
    )
    out.risk = counters.risk
    return out


def risk_of(plan: Plan, counts: ClassCounts) -> dict[str, Any]:
    """The ``run.completed`` ``risk`` field for the global ``counts`` of ``plan``'s output."""
    return risk_record(_check(plan), counts)


# Partial class counts are merged every this many batches, so memory follows the classes.
_MERGE_EVERY = 64


def _counted(
    check: RiskCheck, batches: Iterable[pa.RecordBatch]
) -> Iterator[tuple[pa.RecordBatch, ClassCounts]]:
    for batch in batches:
        yield batch, check.counts_of(batch.select(check.columns))


def stream_with_risk(
    plan: Plan,
    batches: Iterable[pa.RecordBatch],
    write: Callable[[pa.RecordBatch], Any],
    counters: Counters,
    spool_dir: Path,
) -> Counters:
    """Write a stream of output batches (``cape apply``) through the risk section.

    ``report``: each batch is written as it comes and counted. ``suppress``
    needs the global counts before the first row can be written, so the
    batches are spooled to an Arrow IPC stream in ``spool_dir`` (next to the
    output, and no more readable than it: it holds the same transformed
    data), counted, then read back in order with the small classes'
    rows removed: a second pass over the output, never over the input, so
    what is counted is exactly what is written. Returns the run's counters.
    """
    check = _check(plan)
    total = check.empty_counts()
    parts: list[ClassCounts] = []

    def add(part: ClassCounts) -> None:
        parts.append(part)
        if len(parts) >= _MERGE_EVERY:
            total.merge(*parts)
            parts.clear()

    if not check.suppress:
        for batch, part in _counted(check, batches):
            write(batch)
            add(part)
        total.merge(*parts)
        counters.risk = risk_record(check, total)
        return counters
    with tempfile.TemporaryDirectory(dir=spool_dir, prefix=".cape-risk-") as tmp:
        spool = Path(tmp) / "output.arrows"
        with pa.OSFile(str(spool), "wb") as sink, pa.ipc.new_stream(sink, plan.output_schema) as w:
            for batch, part in _counted(check, batches):
                w.write_batch(batch)
                add(part)
        total.merge(*parts)
        kept_counters = Counters.of_counts(
            plan, rows_in=counters.rows_in, rows_out=0, values={}, counts=counters.counts
        )
        removes = total.any_below(check.k)
        with pa.OSFile(str(spool), "rb") as source:
            for batch in pa.ipc.open_stream(source):
                kept = batch
                if removes:
                    small = below_k(pa.Table.from_batches([batch]), total, check.k)
                    kept = batch.filter(pc.invert(small))
                if kept.num_rows:
                    write(kept)
                    kept_counters.merge(Counters.of_batch(plan, kept, rows_in=0))
    kept_counters.risk = risk_record(check, total)
    return kept_counters


class StreamRisk:
    """The risk report of an output that is streamed out batch by batch (Arrow Flight).

    Only ``action: report`` can stream: a suppression needs every class counted
    before the first row leaves, so :meth:`refuse_suppress` stops such a run
    before it starts.
    """

    def __init__(self, plan: Plan):
        self.check = plan.risk
        self.total = self.check.empty_counts() if self.check is not None else None
        self.parts: list[ClassCounts] = []

    @staticmethod
    def refuse_suppress(plan: Plan, where: str) -> None:
        """Raise :class:`~cape_pipelines.errors.PlanError` for a suppressing policy on a stream."""
        if plan.risk is not None and plan.risk.suppress:
            raise PlanError(
                f"risk.action: suppress cannot run on {where}: it needs every row counted "
                "before the first one is sent; use action: report there, or cape apply / an "
                "engine adapter"
            )

    def add(self, batch: pa.RecordBatch) -> None:
        """Count one output batch."""
        if self.check is None or self.total is None:
            return
        self.parts.append(self.check.counts_of(batch.select(self.check.columns)))
        if len(self.parts) >= _MERGE_EVERY:
            self.total.merge(*self.parts)
            self.parts.clear()

    def finish(self, counters: Counters | None) -> None:
        """Put the figure into the run's ``counters``."""
        if self.check is None or self.total is None or counters is None:
            return
        self.total.merge(*self.parts)
        self.parts.clear()
        counters.risk = risk_record(self.check, self.total)
