"""The DoFns and CombineFn that :class:`~cape_pipelines.beam.ApplyPolicy` wires together.

Everything here is picklable and holds no driver state: the plan (with its
resolved keys) and the audit sink travel inside the DoFns; per-process state
(the transformations' memo, metric handles) is rebuilt in ``setup``. Counts for
the audit record leave :class:`ApplyPlanFn` as a tagged output, so Beam commits
them together with the bundle's data (a retried bundle's counts are discarded
with its data), and are merged inside the pipeline by :class:`MergeCounters`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.pvalue import Row

from ..audit import RunContext, Sink, error_info
from ..core import Counters, apply_batch
from ..errors import CapeError, DataError
from ..plan import Plan
from .schema import rows_from_table, table_from_dicts, table_from_rows

COUNTERS_TAG = "counters"

# Record ids derived from the run id make a record emitted twice (a retried
# bundle) the same record, which the coordinator stores once.
_RECORD_NAMESPACE = uuid.UUID("4f1e0c52-7d3b-4d0e-9a57-5a7c2b8e1d10")


def record_id(run_id: str, event: str) -> str:
    """The deterministic id of ``event``'s record in run ``run_id``."""
    return str(uuid.uuid5(_RECORD_NAMESPACE, f"{run_id}/{event}"))


def element_weight(element: Any) -> int:
    """BatchElements' size of an element: a table's rows, else one row."""
    return int(getattr(element, "num_rows", 1))


class RunAudit:
    """What a worker needs to write this step's audit records: sink, policy, principal.

    ``source`` is where the policy came from when that was a coordinator; the
    run then records ``policy.fetched`` too.
    """

    def __init__(
        self, sink: Sink, policy: Mapping[str, Any], principal: str, source: str | None = None
    ):
        self.sink = sink
        self.policy = dict(policy)
        self.principal = principal
        self.source = source

    def context(self, run_id: str) -> RunContext:
        run = RunContext(engine="beam", sink=self.sink, principal=self.principal, run_id=run_id)
        run.set_policy(self.policy["label"], self.policy["version"], self.policy["sha256"])
        return run


class StartRunFn(beam.DoFn):
    """On the run's single Impulse element: make the run id and emit ``run.started``
    (and ``policy.fetched`` for a policy from a coordinator)."""

    def __init__(self, audit: RunAudit):
        self.audit = audit

    def process(self, _impulse: bytes) -> Iterator[str]:
        run_id = str(uuid.uuid4())
        run = self.audit.context(run_id)
        run.emit("run.started", record_id=record_id(run_id, "run.started"))
        if self.audit.source is not None:
            run.emit(
                "policy.fetched",
                record_id=record_id(run_id, "policy.fetched"),
                source=self.audit.source,
            )
        yield run_id


class ApplyPlanFn(beam.DoFn):
    """Apply the plan to one batch (a list of dicts, of Rows, or of Arrow tables).

    Yields the batch's output in the form it came in (dicts, Rows, tables), and
    its :class:`~cape_pipelines.core.Counters` as a dict on the ``counters``
    tag. A :class:`~cape_pipelines.errors.CapeError` (bad data, a failing
    transformation) emits ``run.failed`` before it fails the bundle.
    """

    def __init__(self, plan: Plan, audit: RunAudit, carry: str | None = None):
        self.plan = plan
        self.audit = audit
        self.carry = carry

    def setup(self) -> None:
        ns = f"cape_pipelines:{self.plan.label}"
        self._rows_in = Metrics.counter(ns, "rows_in")
        self._rows_out = Metrics.counter(ns, "rows_out")
        self._rows_redacted = Metrics.counter(ns, "rows_redacted")
        self._columns = {
            col: (
                Metrics.counter(ns, f"{col}.values"),
                Metrics.counter(ns, f"{col}.nulls"),
            )
            for col in self.plan.transformed_columns
        }

    def process(self, batch: list[Any], run_id: str) -> Iterator[Any]:
        try:
            yield from self._process(batch)
        except CapeError as exc:
            run = self.audit.context(run_id)
            run.emit(
                "run.failed",
                record_id=record_id(run_id, "run.failed"),
                error=error_info(exc),
            )
            raise

    def _process(self, batch: list[Any]) -> Iterator[Any]:
        if not batch:
            # BatchElements flushes an empty list when one element outweighs a batch.
            return
        total = Counters.empty_for(self.plan)
        first = batch[0]
        if isinstance(first, pa.Table | pa.RecordBatch):
            for element in batch:
                table = _as_table(element)
                out = self._apply(table, total)
                if out.num_rows:
                    yield (
                        out
                        if isinstance(element, pa.Table)
                        else out.combine_chunks().to_batches()[0]
                    )
        elif isinstance(first, Mapping):
            out = self._apply(table_from_dicts(batch, self.plan.input_schema), total)
            yield from out.to_pylist()
        elif isinstance(first, Row) or hasattr(first, "_fields"):
            out = self._apply(table_from_rows(batch, self.plan.input_schema), total)
            yield from rows_from_table(out)
        else:
            raise DataError(
                f"ApplyPolicy takes dicts, Beam Rows, or pyarrow Tables/RecordBatches, "
                f"not {type(first).__name__}"
            )
        self._report(total)
        yield beam.pvalue.TaggedOutput(COUNTERS_TAG, total.to_dict())

    def _apply(self, table: pa.Table, total: Counters) -> pa.Table:
        carried = None
        if self.carry is not None:
            carried = table.column(self.carry)
            table = table.drop_columns([self.carry])
        extra = [c for c in table.schema.names if c not in self.plan.input_schema.names]
        if extra:
            raise DataError(
                f"column(s) {', '.join(map(repr, extra))} are not in the schema ApplyPolicy was "
                f"built with ({', '.join(self.plan.input_schema.names)})"
            )
        outs = []
        offset = 0
        for rb in table.to_batches() or [_empty_batch(self.plan.input_schema)]:
            out, counters, kept = apply_batch(self.plan, rb, with_indices=carried is not None)
            total.merge(counters)
            if carried is not None:
                ids = carried.slice(offset, rb.num_rows).take(kept)
                out = out.append_column(self.carry, ids.combine_chunks())
            offset += rb.num_rows
            outs.append(out)
        return pa.Table.from_batches(outs)

    def _report(self, total: Counters) -> None:
        self._rows_in.inc(total.rows_in)
        self._rows_out.inc(total.rows_out)
        self._rows_redacted.inc(total.rows_redacted)
        for col, counter in total.columns.items():
            values, nulls = self._columns[col]
            values.inc(counter.values)
            nulls.inc(counter.nulls)


def _as_table(element: pa.Table | pa.RecordBatch) -> pa.Table:
    return element if isinstance(element, pa.Table) else pa.Table.from_batches([element])


def _empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=schema)


class MergeCounters(beam.CombineFn):
    """Merge per-batch counter dicts into the run's totals (Counters as plain dicts)."""

    def __init__(self, empty: dict[str, Any]):
        self.empty = empty

    def create_accumulator(self) -> dict[str, Any]:
        return self.empty

    def add_input(self, acc: dict[str, Any], counters: dict[str, Any]) -> dict[str, Any]:
        return Counters.from_dict(acc).merge(Counters.from_dict(counters)).to_dict()

    def merge_accumulators(self, accs: Any) -> dict[str, Any]:
        total = Counters.from_dict(self.empty)
        for acc in accs:
            total.merge(Counters.from_dict(acc))
        return total.to_dict()

    def extract_output(self, acc: dict[str, Any]) -> dict[str, Any]:
        return acc


class FinishRunFn(beam.DoFn):
    """On the run's single merged counters element: emit ``run.completed``."""

    def __init__(self, audit: RunAudit):
        self.audit = audit

    def process(self, totals: dict[str, Any], run_id: str) -> Iterator[dict[str, Any]]:
        counters = Counters.from_dict(totals)
        run = self.audit.context(run_id)
        yield run.emit(
            "run.completed", record_id=record_id(run_id, "run.completed"), **counters.to_dict()
        )


__all__ = [
    "COUNTERS_TAG",
    "ApplyPlanFn",
    "FinishRunFn",
    "MergeCounters",
    "RunAudit",
    "StartRunFn",
    "element_weight",
    "record_id",
]
