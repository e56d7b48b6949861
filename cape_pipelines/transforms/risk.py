"""Re-identification risk of a table: k-anonymity over quasi-identifiers, l-diversity of a column.

Rows that share every quasi-identifier (ZIP prefix, age bucket, sex...) form
an equivalence class; a row in a class of fewer than ``k`` rows is easier to
single out. This module measures that on what a policy produced:
:class:`ClassCounts` holds each class's size (and the distinct values of the
sensitive column in it) for some rows, computed with pyarrow's ``group_by``
and merged across batches or partitions, so the figure is global however the
data was split; :meth:`ClassCounts.report` gives the smallest class, the rows
and classes below ``k``, and the l-diversity (the fewest distinct sensitive
values in any class); :func:`below_k` marks the rows whose *global* class is
smaller than ``k``, which is what a suppression removes.

A null quasi-identifier is a value of its own: all rows with a null there
(and equal other quasi-identifiers) share one class. This is the measurement
only: wiring it into the run's ``run.completed`` record and a ``suppress``
action across engines belongs to the engine seam.

>>> import pyarrow as pa
>>> t = pa.table({"zip": ["021", "021", "941"], "sex": ["f", "f", "m"], "dx": ["a", "b", "a"]})
>>> ClassCounts.of_table(t, ["zip", "sex"], "dx").report(k=2).to_dict()["smallest_class"]
1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import PlanError

ClassKey = tuple[Any, ...]


@dataclass(frozen=True)
class RiskReport:
    """k-anonymity and l-diversity figures of some rows."""

    k: int
    rows: int
    classes: int
    smallest_class: int
    rows_below_k: int
    classes_below_k: int
    l_diversity: int | None

    def to_dict(self) -> dict[str, Any]:
        """The figures as a JSON-ready mapping (for audit records and ``cape policy plan``)."""
        return {
            "k": self.k,
            "rows": self.rows,
            "classes": self.classes,
            "smallest_class": self.smallest_class,
            "rows_below_k": self.rows_below_k,
            "classes_below_k": self.classes_below_k,
            "l_diversity": self.l_diversity,
        }


@dataclass
class ClassCounts:
    """Equivalence-class sizes, and sensitive values per class, of some rows; mergeable."""

    quasi_identifiers: tuple[str, ...]
    sensitive: str | None = None
    sizes: dict[ClassKey, int] = field(default_factory=dict)
    sensitive_values: dict[ClassKey, set[Any]] = field(default_factory=dict)

    @classmethod
    def of_table(
        cls,
        table: pa.Table | pa.RecordBatch,
        quasi_identifiers: Sequence[str],
        sensitive: str | None = None,
    ) -> ClassCounts:
        """The classes of ``table`` over ``quasi_identifiers`` (one ``group_by`` pass each)."""
        qis = tuple(quasi_identifiers)
        if not qis:
            raise PlanError("k-anonymity needs at least one quasi-identifier column")
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        missing = [
            c for c in (*qis, *([sensitive] if sensitive else [])) if c not in table.schema.names
        ]
        if missing:
            raise PlanError(f"risk columns not in the output: {', '.join(missing)}")
        out = cls(qis, sensitive)
        if table.num_rows == 0:
            return out
        grouped = (
            table.select(list(qis))
            .group_by(list(qis), use_threads=False)
            .aggregate([([], "count_all")])
        )
        keys = list(zip(*(grouped.column(c).to_pylist() for c in qis), strict=True))
        out.sizes = dict(zip(keys, grouped.column("count_all").to_pylist(), strict=True))
        if sensitive is not None:
            pairs = (
                table.select([*qis, sensitive])
                .group_by([*qis, sensitive], use_threads=False)
                .aggregate([])
            )
            columns = [pairs.column(c).to_pylist() for c in qis]
            for *key, value in zip(*columns, pairs.column(sensitive).to_pylist(), strict=True):
                out.sensitive_values.setdefault(tuple(key), set()).add(value)
        return out

    def merge(self, other: ClassCounts) -> ClassCounts:
        """Add ``other`` (counted over other rows, same columns) into this object."""
        if other.quasi_identifiers != self.quasi_identifiers or other.sensitive != self.sensitive:
            raise ValueError("cannot merge class counts over different columns")
        for key, n in other.sizes.items():
            self.sizes[key] = self.sizes.get(key, 0) + n
        for key, values in other.sensitive_values.items():
            self.sensitive_values.setdefault(key, set()).update(values)
        return self

    def report(self, k: int) -> RiskReport:
        """The figures for ``k`` (``k >= 1``)."""
        if k < 1:
            raise ValueError("k must be at least 1")
        sizes = list(self.sizes.values())
        small = [n for n in sizes if n < k]
        l_div = None
        if self.sensitive is not None and self.sensitive_values:
            l_div = min(len(v) for v in self.sensitive_values.values())
        return RiskReport(
            k=k,
            rows=sum(sizes),
            classes=len(sizes),
            smallest_class=min(sizes) if sizes else 0,
            rows_below_k=sum(small),
            classes_below_k=len(small),
            l_diversity=l_div,
        )

    def table(self) -> pa.Table:
        """The class sizes as a table: the quasi-identifier columns and ``class_size``."""
        keys = list(self.sizes)
        cols = {c: [key[i] for key in keys] for i, c in enumerate(self.quasi_identifiers)}
        cols["class_size"] = list(self.sizes.values())
        return pa.table(cols)


def _filler(t: pa.DataType) -> pa.Scalar:
    """A fixed stand-in value of type ``t`` for nulls (the null flag keeps them apart)."""
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pa.scalar("", t)
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return pa.scalar(b"", t)
    if pa.types.is_boolean(t):
        return pa.scalar(False, t)
    return pa.array([0], pa.int64()).cast(t)[0]


def _join_keys(table: pa.Table, qis: list[str]) -> pa.Table:
    """Quasi-identifiers as join keys on which null equals null: filled values plus null flags."""
    cols, names = [], []
    for c in qis:
        col = table.column(c)
        if pa.types.is_null(col.type):
            col = pa.chunked_array([pa.array([0] * len(col), pa.int8())])
        elif pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        flag = pc.is_null(col)
        cols += [pc.fill_null(col, _filler(col.type)), flag]
        names += [f"{c}", f"{c}\x00null"]
    return pa.table(cols, names=names)


def below_k(table: pa.Table, counts: ClassCounts, k: int) -> pa.Array:
    """Per row of ``table``: whether its class, counted by ``counts`` (globally), has < ``k`` rows.

    ``counts`` must cover at least ``table``'s rows (a row of an unknown class
    is an error, never silently kept).
    """
    qis = list(counts.quasi_identifiers)
    index = "__cape_row__"
    left = _join_keys(table, qis)
    left = left.append_column(index, pa.array(range(table.num_rows), pa.int64()))
    sizes = counts.table()
    typed = pa.table(
        [pa.array(sizes.column(c).to_pylist(), table.schema.field(c).type) for c in qis],
        names=qis,
    )
    right = _join_keys(typed, qis).append_column("class_size", sizes.column("class_size"))
    keys = [n for n in left.column_names if n != index]
    joined = left.join(right, keys=keys, join_type="left outer", use_threads=False)
    size = joined.sort_by(index).column("class_size")
    if size.null_count:
        raise ValueError("a row's class is missing from the counts (counts over other rows?)")
    return pc.less(size, k).combine_chunks()
