"""The one place data is transformed: a :class:`~cape_pipelines.plan.Plan` over Arrow batches.

Engines only move batches in and out of :func:`apply_batch`; each returns the
transformed batch and :class:`Counters` measured on the rows actually produced.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from .errors import DataError, TransformError
from .plan import ColumnStep, DropStep, FilterStep, Plan
from .transforms.base import ColumnContext

ROW_INDEX = "__cape_row_index__"


@dataclass
class ColumnCounter:
    """Per output column: the transformations applied, non-null values and nulls written."""

    transform: str
    values: int = 0
    nulls: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"transform": self.transform, "values": self.values, "nulls": self.nulls}


def counted_names(plan: Plan) -> dict[str, list[str]]:
    """Per column, the transformation-provided count names of ``plan`` (``"text-scrub.email"``).

    A name is ``<transformation type>.<count name>``; two steps of one type on
    one column add into the same name.
    """
    out: dict[str, list[str]] = {}
    for s in plan.steps:
        if isinstance(s, ColumnStep):
            for n in s.transform.count_names():
                names = out.setdefault(s.column, [])
                full = f"{s.transform.type_name}.{n}"
                if full not in names:
                    names.append(full)
    return out


@dataclass
class Counters:
    """Row and per-column counts of one batch, or of a whole run once merged.

    ``counts`` holds what transformations count themselves (``text-scrub``'s
    findings per entity type), per column: ``{"note": {"text-scrub.email": 3}}``;
    plain sums, so they merge exactly however the rows were split. ``risk`` is
    the re-identification figure of the whole output (see
    :mod:`cape_pipelines.transforms.risk`); it is global, so it is set once on
    a run's totals, never summed.
    """

    rows_in: int = 0
    rows_out: int = 0
    columns: dict[str, ColumnCounter] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    risk: dict[str, Any] | None = None

    @property
    def rows_redacted(self) -> int:
        """Rows removed by row-redact."""
        return self.rows_in - self.rows_out

    def merge(self, other: Counters) -> Counters:
        """Add ``other`` into this object (in place) and return it."""
        self.rows_in += other.rows_in
        self.rows_out += other.rows_out
        for name, c in other.columns.items():
            mine = self.columns.get(name)
            if mine is None:
                self.columns[name] = ColumnCounter(c.transform, c.values, c.nulls)
            else:
                mine.values += c.values
                mine.nulls += c.nulls
        for column, named in other.counts.items():
            into = self.counts.setdefault(column, {})
            for name, n in named.items():
                into[name] = into.get(name, 0) + n
        if other.risk is not None:
            self.risk = other.risk
        return self

    def to_dict(self) -> dict[str, Any]:
        """The audit record's counting fields (``counts`` and ``risk`` only where set)."""
        out: dict[str, Any] = {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rows_redacted": self.rows_redacted,
            "columns": {k: v.to_dict() for k, v in sorted(self.columns.items())},
        }
        if self.counts:
            out["counts"] = {c: dict(sorted(v.items())) for c, v in sorted(self.counts.items())}
        if self.risk is not None:
            out["risk"] = dict(self.risk)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Counters:
        """Inverse of :meth:`to_dict` (for counters sent between processes)."""
        return cls(
            rows_in=int(data["rows_in"]),
            rows_out=int(data["rows_out"]),
            columns={
                k: ColumnCounter(v["transform"], int(v["values"]), int(v["nulls"]))
                for k, v in data.get("columns", {}).items()
            },
            counts={
                c: {n: int(v) for n, v in named.items()}
                for c, named in data.get("counts", {}).items()
            },
            risk=dict(data["risk"]) if data.get("risk") is not None else None,
        )

    @classmethod
    def empty_for(cls, plan: Plan) -> Counters:
        """Zero counters naming every transformed column of ``plan``."""
        return cls.of_counts(plan, rows_in=0, rows_out=0, values={})

    @classmethod
    def of_counts(
        cls,
        plan: Plan,
        *,
        rows_in: int,
        rows_out: int,
        values: Mapping[str, int],
        counts: Mapping[str, Mapping[str, int]] | None = None,
    ) -> Counters:
        """Counters from counts measured elsewhere (an engine's aggregation).

        ``values`` holds the non-null values written per transformed column
        (missing: none); nulls are the rest of ``rows_out``. Every
        :class:`Counters` of a plan is built here, so every engine counts the
        same way. ``counts``: transformation-provided counts (missing: zero;
        every name the plan counts is present).
        """
        columns = {
            c: ColumnCounter(t, values.get(c, 0), rows_out - values.get(c, 0))
            for c, t in plan.transformed_columns.items()
        }
        given = counts or {}
        named = {
            c: {n: int(given.get(c, {}).get(n, 0)) for n in names}
            for c, names in counted_names(plan).items()
        }
        return cls(rows_in=rows_in, rows_out=rows_out, columns=columns, counts=named)

    @classmethod
    def of_batch(
        cls,
        plan: Plan,
        batch: pa.RecordBatch | pa.Table,
        *,
        rows_in: int | None = None,
        counts: Mapping[str, Mapping[str, int]] | None = None,
    ) -> Counters:
        """The counts of one output ``batch`` of ``plan`` (``rows_in``: the rows read for it;
        default: as many as were written; ``counts``: what its transformations counted)."""
        values = {c: batch.num_rows - batch.column(c).null_count for c in plan.transformed_columns}
        return cls.of_counts(
            plan,
            rows_in=batch.num_rows if rows_in is None else rows_in,
            rows_out=batch.num_rows,
            values=values,
            counts=counts,
        )


def conform(plan: Plan, batch: pa.RecordBatch) -> pa.RecordBatch:
    """Check a batch against the plan's input schema, casting where the cast is lossless.

    Engines hand over batches whose types can drift from the schema the plan
    was built on (an all-null partition, int32 vs int64); a column the plan
    uses must be present and safely castable, else :class:`DataError` names it.
    """
    if batch.schema.equals(plan.input_schema):
        return batch
    arrays = []
    names = []
    for f in plan.input_schema:
        idx = batch.schema.get_field_index(f.name)
        if idx < 0:
            raise DataError(f"column {f.name!r} is missing from the batch")
        arr = batch.column(idx)
        if not arr.type.equals(f.type) and f.name in plan.used_columns:
            try:
                arr = arr.cast(f.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise DataError(
                    f"column {f.name!r} is {arr.type} in this batch, but the plan was built for "
                    f"{f.type}: {exc}"
                ) from None
        arrays.append(arr)
        names.append(f.name)
    return pa.RecordBatch.from_arrays(arrays, names=names)


def apply_batch(
    plan: Plan, batch: pa.RecordBatch, *, with_indices: bool = False
) -> tuple[pa.RecordBatch, Counters, pa.Array | None]:
    """Apply ``plan`` to one batch.

    Returns the output batch (schema ``plan.output_schema``), its counters, and,
    when ``with_indices`` is set, the positions of the kept input rows (so a
    pandas index can follow the rows).
    """
    batch = conform(plan, batch)
    rows_in = batch.num_rows
    names = list(batch.schema.names)
    arrays: dict[str, pa.Array] = dict(zip(names, batch.columns, strict=True))
    indices: pa.Array | None = None
    provided: dict[str, dict[str, int]] = {}
    for i, step in enumerate(plan.steps):
        if isinstance(step, ColumnStep):
            current = pa.RecordBatch.from_arrays(list(arrays.values()), names=list(arrays))
            ctx = ColumnContext(
                column=step.column,
                key=plan.keys[step.key_id] if step.key_id is not None else None,
                batch=current,
                state=plan.step_state(i),
            )
            try:
                if step.transform.count_names():
                    out, found = step.transform.apply_counted(arrays[step.column], ctx)
                    into = provided.setdefault(step.column, {})
                    for name, v in found.items():
                        full = f"{step.transform.type_name}.{name}"
                        into[full] = into.get(full, 0) + int(v)
                else:
                    out = step.transform.apply(arrays[step.column], ctx)
            except TransformError as exc:
                raise TransformError(f"{step.location}, column {step.column!r}: {exc}") from None
            if not out.type.equals(step.output_type):
                out = out.cast(step.output_type)
            arrays[step.column] = out
        elif isinstance(step, DropStep):
            for c in step.columns:
                del arrays[c]
        elif isinstance(step, FilterStep):
            n = len(next(iter(arrays.values())))
            idx = indices if indices is not None else pa.array(np.arange(n, dtype=np.int64))
            table = pa.Table.from_arrays([*arrays.values(), idx], names=[*arrays.keys(), ROW_INDEX])
            kept = table.filter(step.keep)
            arrays = {c: kept.column(c).combine_chunks() for c in arrays}
            indices = kept.column(ROW_INDEX).combine_chunks()
    out_batch = pa.RecordBatch.from_arrays(
        [arrays[f.name] for f in plan.output_schema], schema=plan.output_schema
    )
    counters = Counters.of_batch(plan, out_batch, rows_in=rows_in, counts=provided)
    if with_indices and indices is None:
        indices = pa.array(np.arange(rows_in, dtype=np.int64))
    return out_batch, counters, indices if with_indices else None


def apply_batches(
    plan: Plan, batches: Iterable[pa.RecordBatch], counters: Counters | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream ``batches`` through ``plan``, adding each batch's counts into ``counters``."""
    for batch in batches:
        out, c, _ = apply_batch(plan, batch)
        if counters is not None:
            counters.merge(c)
        yield out


def apply_table(plan: Plan, table: pa.Table) -> tuple[pa.Table, Counters]:
    """Apply ``plan`` to a whole table, batch by batch."""
    counters = Counters.empty_for(plan)
    batches = list(apply_batches(plan, table.to_batches(), counters))
    return pa.Table.from_batches(batches, schema=plan.output_schema), counters
