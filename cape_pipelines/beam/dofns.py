"""The DoFns that :class:`~cape_pipelines.beam.ApplyPolicy` wires together.

Everything here is picklable and holds no driver state: the plan (with its
resolved keys) and the audit sink travel inside the DoFns; per-process state
(the transformations' memo, metric handles) is rebuilt in ``setup``. Counts for
the audit record leave :class:`ApplyPlanFn` as a tagged output, so Beam commits
them together with the bundle's data (a retried bundle's counts are discarded
with its data), once per bundle and window; :class:`FinishRunFn` reads them all
as a side input and merges them.

A policy's ``risk:`` section: each bundle's counts also carry the partial
equivalence-class counts of its output (``classes``), which
:class:`FinishRunFn` merges into the global figure: a combine over every
bundle, like the counters. ``action: suppress`` adds :class:`SuppressFn`
after the policy: it takes the merged class counts as a singleton side input
(so no row is written before every class is counted) and removes the rows of
classes below ``k``; what it removed leaves on its own ``counters`` output,
which :class:`FinishRunFn` subtracts.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NoReturn

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics
from apache_beam.pvalue import Row, TaggedOutput
from apache_beam.transforms.window import BoundedWindow
from apache_beam.utils.windowed_value import WindowedValue

from ..core import Counters, apply_batch, counted_names
from ..errors import CapeError, DataError
from ..plan import Plan
from ..seam import RemoteRun
from ..transforms.risk import ClassCounts, below_k, risk_record
from .convert import rows_from_table, table_from_dicts, table_from_rows

COUNTERS_TAG = "counters"
# The key of a bundle's counts that holds its partial equivalence-class counts.
CLASSES_FIELD = "classes"


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
        self._provided = {
            (col, name): Metrics.counter(ns, f"{col}.{name}")
            for col, names in counted_names(self.plan).items()
            for name in names
        }

    def start_bundle(self) -> None:
        self._counts: dict[BoundedWindow, Counters] = {}
        self._classes: dict[BoundedWindow, list[ClassCounts]] = {}
        self._pending: list[ClassCounts] = []
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
        classes, self._classes = self._classes, {}
        for window, total in counts.items():
            record = total.to_dict()
            parts = classes.get(window)
            if parts:
                record[CLASSES_FIELD] = parts[0].merge(*parts[1:])
            # Outside process() an output needs its window spelled out.
            counted = WindowedValue(record, window.max_timestamp(), (window,))
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
        if self._pending:
            self._classes.setdefault(window, []).extend(self._pending)
            self._pending = []

    def _fail(self, exc: CapeError) -> NoReturn:
        self.audit.failed(self._run_id, exc, self.plan)
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
        for col, named in total.counts.items():
            for name, n in named.items():
                self._provided[(col, name)].inc(n)

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
        if self.plan.risk is not None and out.num_rows:
            self._pending.append(self.plan.risk.counts_of(out.select(self.plan.risk.columns)))
        if ids is not None:
            out = out.append_column(self.carry, ids.take(kept))
        return out


def _empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=schema)


def merged_classes(plan: Plan, counts: Iterable[dict[str, Any]]) -> ClassCounts:
    """The global class counts of the output, from every bundle's counts."""
    assert plan.risk is not None
    parts = [c[CLASSES_FIELD] for c in counts if c.get(CLASSES_FIELD) is not None]
    total = plan.risk.empty_counts()
    return total.merge(*parts) if parts else total


class MergeClassesFn(beam.CombineFn):
    """Every bundle's counts combined into the global class sizes (for the suppression).

    Only the sizes: the sensitive values (l-diversity) are not needed to decide
    what to remove, and leaving them out keeps the side input as small as the
    number of classes.
    """

    def __init__(self, plan: Plan):
        assert plan.risk is not None
        self.qis = plan.risk.quasi_identifiers

    def _sizes(self, parts: list[ClassCounts]) -> ClassCounts:
        total = ClassCounts(self.qis)
        return total.merge(*parts) if parts else total

    def create_accumulator(self) -> ClassCounts:
        return ClassCounts(self.qis)

    def add_input(self, acc: ClassCounts, counts: dict[str, Any]) -> ClassCounts:
        found = counts.get(CLASSES_FIELD)
        if found is None:
            return acc
        return self._sizes([acc, ClassCounts(self.qis, None, found.sizes)])

    def merge_accumulators(self, accs: Iterable[ClassCounts]) -> ClassCounts:
        return self._sizes(list(accs))

    def extract_output(self, acc: ClassCounts) -> ClassCounts:
        return acc


class SuppressFn(beam.DoFn):
    """Remove the rows whose class (global counts: a side input) is below ``k``.

    Takes what :class:`ApplyPlanFn` emits (tables, dicts or Rows); tables are
    filtered in place, so rows keep their order. The counts of the rows removed
    leave on the ``counters`` output, once per bundle and window.
    """

    def __init__(self, plan: Plan):
        assert plan.risk is not None
        self.plan = plan
        self.check = plan.risk

    def start_bundle(self) -> None:
        self._removed: dict[BoundedWindow, Counters] = {}
        self._small: tuple[int, set[tuple[Any, ...]]] | None = None

    def _small_classes(self, classes: ClassCounts) -> set[tuple[Any, ...]]:
        if self._small is None or self._small[0] != id(classes):
            small = {k for k, n in classes.class_sizes().items() if n < self.check.k}
            self._small = (id(classes), small)
        return self._small[1]

    def process(
        self, element: Any, classes: ClassCounts, window: BoundedWindow = beam.DoFn.WindowParam
    ) -> Iterator[Any]:
        removed = self._removed.setdefault(window, Counters.empty_for(self.plan))
        if not classes.any_below(self.check.k):
            yield element
            return
        if isinstance(element, pa.Table | pa.RecordBatch):
            table = element if isinstance(element, pa.Table) else pa.Table.from_batches([element])
            small = below_k(table, classes, self.check.k)
            gone = table.filter(small)
            if gone.num_rows:
                removed.merge(Counters.of_batch(self.plan, gone, rows_in=0))
                kept = table.filter(pc.invert(small))
                if kept.num_rows:
                    yield (
                        kept
                        if isinstance(element, pa.Table)
                        else kept.combine_chunks().to_batches()[0]
                    )
                return
            yield element
            return
        get = element.get if isinstance(element, Mapping) else lambda c: getattr(element, c)
        key = tuple(get(q) for q in self.check.quasi_identifiers)
        if key in self._small_classes(classes):
            values = {c: 0 if get(c) is None else 1 for c in self.plan.transformed_columns}
            removed.merge(Counters.of_counts(self.plan, rows_in=0, rows_out=1, values=values))
            return
        yield element

    def finish_bundle(self) -> Iterator[TaggedOutput]:
        removed, self._removed = self._removed, {}
        for window, total in removed.items():
            counted = WindowedValue(total.to_dict(), window.max_timestamp(), (window,))
            yield TaggedOutput(COUNTERS_TAG, counted)


class FinishRunFn(beam.DoFn):
    """On the run id, once every bundle's counts are in (a side input): emit ``run.completed``.

    ``removed`` (a second side input, with ``action: suppress``): the counts of
    the rows the suppression removed, taken off the totals.
    """

    def __init__(self, audit: RemoteRun, empty: dict[str, Any], plan: Plan | None = None):
        self.audit = audit
        self.empty = empty
        self.plan = plan

    def process(
        self,
        run_id: str,
        counts: Iterable[dict[str, Any]],
        removed: Iterable[dict[str, Any]] = (),
    ) -> Iterator[dict[str, Any]]:
        counts = list(counts)
        total = Counters.from_dict(self.empty)
        for bundle in counts:
            total.merge(Counters.from_dict(bundle))
        for bundle in removed:
            gone = Counters.from_dict(bundle)
            total.rows_out -= gone.rows_out
            for col, c in gone.columns.items():
                total.columns[col].values -= c.values
                total.columns[col].nulls -= c.nulls
        if self.plan is not None and self.plan.risk is not None:
            total.risk = risk_record(self.plan.risk, merged_classes(self.plan, counts))
        yield self.audit.completed(run_id, total, self.plan)


__all__ = [
    "COUNTERS_TAG",
    "ApplyPlanFn",
    "FinishRunFn",
    "MergeClassesFn",
    "StartRunFn",
    "SuppressFn",
    "element_weight",
]
