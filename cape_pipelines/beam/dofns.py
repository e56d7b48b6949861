"""The DoFns that :class:`~cape_pipelines.beam.ApplyPolicy` wires together.

Everything here is picklable and holds no driver state: the plan (with its
resolved keys) and the audit sink travel inside the DoFns; per-process state
(the transformations' memo, metric handles) is rebuilt in ``setup``. Counts for
the audit record leave :class:`ApplyPlanFn` as a tagged output, so Beam commits
them together with the bundle's data (a retried bundle's counts are discarded
with its data), once per bundle and window; :class:`FinishRunFn` reads them all
as a side input and merges them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NoReturn

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.pvalue import Row, TaggedOutput
from apache_beam.transforms.window import BoundedWindow
from apache_beam.utils.windowed_value import WindowedValue

from ..core import Counters, apply_batch
from ..errors import CapeError, DataError
from ..plan import Plan
from ..seam import RemoteRun
from .convert import rows_from_table, table_from_dicts, table_from_rows

COUNTERS_TAG = "counters"


def element_weight(element: Any) -> int:
    """BatchElements' size of an element: a table's rows, else one row."""
    return int(getattr(element, "num_rows", 1))


class StartRunFn(beam.DoFn):
    """On the run's single Impulse element: make the run id and record the run's start.
    Yields the run id."""

    def __init__(self, audit: RemoteRun):
        self.audit = audit

    def process(self, _impulse: bytes) -> Iterator[str]:
        run_id = str(uuid.uuid4())
        self.audit.started(run_id)
        yield run_id


class ApplyPlanFn(beam.DoFn):
    """Apply the plan to Arrow tables as they come, and to batches of dicts or Rows.

    An element is a ``pyarrow.Table`` or ``RecordBatch``, which is already a
    batch: it is transformed on its own, with no copy or regrouping, and its
    output (same type) emitted at once. Or it is a list from ``BatchElements``
    (used for input not known to be Arrow): of dicts or Rows, turned into one
    Arrow table, transformed, and emitted as dicts or Rows again; or of tables,
    each transformed on its own. Each transformed batch adds its
    :class:`~cape_pipelines.core.Counters` to the Beam metrics (one update per
    counter per batch); the bundle's counts per window leave at the end of the
    bundle as one dict on the ``counters`` tag. A
    :class:`~cape_pipelines.errors.CapeError` (bad data, a failing
    transformation) emits ``run.failed`` before it fails the bundle.
    """

    def __init__(self, plan: Plan, audit: RemoteRun, carry: str | None = None):
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

    def start_bundle(self) -> None:
        self._counts: dict[BoundedWindow, Counters] = {}
        self._run_id = ""

    def process(
        self, element: Any, run_id: str, window: BoundedWindow = beam.DoFn.WindowParam
    ) -> Iterator[Any]:
        self._run_id = run_id
        if isinstance(element, pa.Table | pa.RecordBatch):
            yield from self._guarded(self._arrow, element, window)
            return
        if not isinstance(element, list):
            self._refuse(element)
        if not element:
            # BatchElements flushes an empty list when one element outweighs a batch.
            return
        first = element[0]
        if isinstance(first, pa.Table | pa.RecordBatch):
            for table in element:
                yield from self._guarded(self._arrow, table, window)
        elif isinstance(first, Mapping | Row) or hasattr(first, "_fields"):
            yield from self._guarded(self._records, element, window)
        else:
            self._refuse(first)

    def finish_bundle(self) -> Iterator[TaggedOutput]:
        counts, self._counts = self._counts, {}
        for window, total in counts.items():
            # Outside process() an output needs its window spelled out.
            counted = WindowedValue(total.to_dict(), window.max_timestamp(), (window,))
            yield TaggedOutput(COUNTERS_TAG, counted)

    def _refuse(self, element: Any) -> NoReturn:
        self._fail(
            DataError(
                f"ApplyPolicy takes dicts, Beam Rows, or pyarrow Tables/RecordBatches, "
                f"not {type(element).__name__}"
            )
        )

    def _guarded(self, step: Any, arg: Any, window: BoundedWindow) -> Iterator[Any]:
        total = Counters.empty_for(self.plan)
        try:
            yield from step(arg, total)
        except CapeError as exc:
            self._fail(exc)
        self._report(total)
        self._counts.setdefault(window, Counters()).merge(total)

    def _fail(self, exc: CapeError) -> NoReturn:
        self.audit.failed(self._run_id, exc)
        raise exc

    def _arrow(self, element: pa.Table | pa.RecordBatch, total: Counters) -> Iterator[Any]:
        if isinstance(element, pa.RecordBatch):
            out = self._apply_batch(element, total)
        else:
            out = self._apply(element, total)
        if out.num_rows:
            yield out

    def _records(self, batch: list[Any], total: Counters) -> Iterator[Any]:
        if isinstance(batch[0], Mapping):
            out = self._apply(table_from_dicts(batch, self.plan.input_schema), total)
            yield from out.to_pylist()
        else:
            out = self._apply(table_from_rows(batch, self.plan.input_schema), total)
            yield from rows_from_table(out)

    def _report(self, total: Counters) -> None:
        """Add one batch's counts to the Beam metrics."""
        self._rows_in.inc(total.rows_in)
        self._rows_out.inc(total.rows_out)
        self._rows_redacted.inc(total.rows_redacted)
        for col, counter in total.columns.items():
            values, nulls = self._columns[col]
            values.inc(counter.values)
            nulls.inc(counter.nulls)

    def _apply(self, table: pa.Table, total: Counters) -> pa.Table:
        batches = table.to_batches() or [_empty_batch(table.schema)]
        return pa.Table.from_batches([self._apply_batch(rb, total) for rb in batches])

    def _apply_batch(self, rb: pa.RecordBatch, total: Counters) -> pa.RecordBatch:
        """The plan over one record batch; the carried column (if any) follows the kept rows."""
        ids = None
        if self.carry is not None:
            ids = rb.column(self.carry)
            rb = rb.drop_columns([self.carry])
        extra = [c for c in rb.schema.names if c not in self.plan.input_schema.names]
        if extra:
            raise DataError(
                f"column(s) {', '.join(map(repr, extra))} are not in the schema ApplyPolicy was "
                f"built with ({', '.join(self.plan.input_schema.names)})"
            )
        out, counters, kept = apply_batch(self.plan, rb, with_indices=ids is not None)
        total.merge(counters)
        if ids is not None:
            out = out.append_column(self.carry, ids.take(kept))
        return out


def _empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=schema)


class FinishRunFn(beam.DoFn):
    """On the run id, once every bundle's counts are in (a side input): emit ``run.completed``."""

    def __init__(self, audit: RemoteRun, empty: dict[str, Any]):
        self.audit = audit
        self.empty = empty

    def process(self, run_id: str, counts: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        total = Counters.from_dict(self.empty)
        for bundle in counts:
            total.merge(Counters.from_dict(bundle))
        yield self.audit.completed(run_id, total)


__all__ = [
    "COUNTERS_TAG",
    "ApplyPlanFn",
    "FinishRunFn",
    "StartRunFn",
    "element_weight",
]
