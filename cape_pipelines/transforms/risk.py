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
(and equal other quasi-identifiers) share one class; so is a null sensitive
value. The l-diversity computed is *distinct* l-diversity: the fewest
distinct sensitive values in any class. :class:`RiskCheck` is a policy's
``risk:`` section bound to an output schema, and :func:`risk_record` the
figure every engine puts in ``run.completed``: the same function over the
same merged counts, so the same numbers on every engine.

>>> import pyarrow as pa
>>> t = pa.table({"zip": ["021", "021", "941"], "sex": ["f", "f", "m"], "dx": ["a", "b", "a"]})
>>> ClassCounts.of_table(t, ["zip", "sex"], "dx").report(k=2).to_dict()["smallest_class"]
1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import PlanError

ClassKey = tuple[Any, ...]

DIVERSITY = "distinct"
"""Which l-diversity is computed: distinct values of the sensitive column per class."""


@dataclass(frozen=True)
class RiskCheck:
    """A policy's ``risk:`` section bound to a plan's output: the columns that exist there."""

    quasi_identifiers: tuple[str, ...]
    sensitive: str | None
    k: int
    l: int | None  # noqa: E741  (the name the literature uses)
    action: str

    @property
    def columns(self) -> list[str]:
        """The output columns the measurement reads."""
        return [*self.quasi_identifiers, *([self.sensitive] if self.sensitive else [])]

    @property
    def suppress(self) -> bool:
        """Whether rows in classes below ``k`` are removed."""
        return self.action == "suppress"

    def counts_of(self, table: pa.Table | pa.RecordBatch) -> ClassCounts:
        """The class counts of some output rows."""
        return ClassCounts.of_table(table, self.quasi_identifiers, self.sensitive)

    def empty_counts(self) -> ClassCounts:
        """Class counts of no rows."""
        return ClassCounts(self.quasi_identifiers, self.sensitive)


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
    """Equivalence-class sizes, and distinct sensitive values per class, of some rows; mergeable.

    Both are Arrow tables (``sizes``: the quasi-identifiers and ``class_size``;
    ``pairs``: the distinct (quasi-identifiers, sensitive value) rows), so
    counting and merging stay ``group_by`` calls however many classes there are.
    """

    quasi_identifiers: tuple[str, ...]
    sensitive: str | None = None
    sizes: pa.Table | None = None
    pairs: pa.Table | None = None

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
        wanted = [*qis, *([sensitive] if sensitive else [])]
        missing = [c for c in wanted if c not in table.schema.names]
        if missing:
            raise PlanError(f"risk columns not in the output: {', '.join(missing)}")
        sizes = (
            table.select(list(qis))
            .group_by(list(qis), use_threads=False)
            .aggregate([([], "count_all")])
            .rename_columns([*qis, "class_size"])
        )
        pairs = None
        if sensitive is not None:
            pairs = table.select(wanted).group_by(wanted, use_threads=False).aggregate([])
        return cls(qis, sensitive, sizes, pairs)

    def merge(self, *others: ClassCounts) -> ClassCounts:
        """Add ``others`` (counted over other rows, same columns) into this object.

        Merging many at once concatenates them all and groups once, which is
        cheaper than merging one by one.
        """
        for other in others:
            if (other.quasi_identifiers, other.sensitive) != (
                self.quasi_identifiers,
                self.sensitive,
            ):
                raise ValueError("cannot merge class counts over different columns")
        qis = list(self.quasi_identifiers)
        sizes = [c.sizes for c in (self, *others) if c.sizes is not None]
        if len(sizes) > 1:
            self.sizes = (
                pa.concat_tables(sizes)
                .group_by(qis, use_threads=False)
                .aggregate([("class_size", "sum")])
                .rename_columns([*qis, "class_size"])
            )
        elif sizes:
            self.sizes = sizes[0]
        pairs = [c.pairs for c in (self, *others) if c.pairs is not None]
        if len(pairs) > 1:
            columns = pairs[0].column_names
            self.pairs = pa.concat_tables(pairs).group_by(columns, use_threads=False).aggregate([])
        elif pairs:
            self.pairs = pairs[0]
        return self

    @classmethod
    def of_grouped(
        cls,
        grouped: pa.Table,
        quasi_identifiers: Sequence[str],
        sensitive: str | None,
        count: str = "count",
    ) -> ClassCounts:
        """Class counts from an engine's own aggregation: one row per distinct
        (quasi-identifiers, sensitive value) with its number of rows in ``count``
        (a Spark ``groupBy(...).count()``), nulls grouped as values."""
        qis = list(quasi_identifiers)
        counted = grouped.set_column(
            grouped.schema.get_field_index(count), count, pc.cast(grouped.column(count), pa.int64())
        )
        sizes = (
            counted.select([*qis, count])
            .group_by(qis, use_threads=False)
            .aggregate([(count, "sum")])
            .rename_columns([*qis, "class_size"])
        )
        pairs = None
        if sensitive is not None:
            pairs = counted.select([*qis, sensitive])
        return cls(tuple(qis), sensitive, sizes, pairs)

    def without_small(self, k: int) -> ClassCounts:
        """These counts with the classes below ``k`` left out: what a suppression keeps."""
        if self.sizes is None:
            return self
        kept = self.sizes.filter(pc.greater_equal(self.sizes.column("class_size"), k))
        if kept.num_rows == self.sizes.num_rows:
            return self
        pairs = self.pairs
        if pairs is not None:
            qis = list(self.quasi_identifiers)
            index = "__cape_row__"
            left = _join_keys(pairs, qis).append_column(
                index, pa.array(range(pairs.num_rows), pa.int64())
            )
            right = _join_keys(kept, qis)
            hit = left.join(right, keys=list(right.column_names), join_type="left semi")
            pairs = pairs.take(hit.column(index))
        return ClassCounts(self.quasi_identifiers, self.sensitive, kept, pairs)

    def any_below(self, k: int) -> bool:
        """Whether some class has fewer than ``k`` rows (nothing to suppress otherwise)."""
        if self.sizes is None or self.sizes.num_rows == 0:
            return False
        smallest = pc.min(self.sizes.column("class_size")).as_py()
        return smallest is not None and smallest < k

    def class_sizes(self) -> dict[ClassKey, int]:
        """Each class (a tuple of quasi-identifier values) and its number of rows."""
        if self.sizes is None:
            return {}
        keys = zip(*(self.sizes.column(c).to_pylist() for c in self.quasi_identifiers), strict=True)
        return dict(zip(keys, self.sizes.column("class_size").to_pylist(), strict=True))

    def report(self, k: int) -> RiskReport:
        """The figures for ``k`` (``k >= 1``)."""
        if k < 1:
            raise ValueError("k must be at least 1")
        if self.sizes is None or self.sizes.num_rows == 0:
            return RiskReport(k, 0, 0, 0, 0, 0, None)
        size = self.sizes.column("class_size")
        small = pc.less(size, k)
        l_div = None
        if self.pairs is not None and self.pairs.num_rows:
            qis = list(self.quasi_identifiers)
            per_class = self.pairs.group_by(qis, use_threads=False).aggregate([([], "count_all")])
            l_div = pc.min(per_class.column("count_all")).as_py()
        return RiskReport(
            k=k,
            rows=pc.sum(size).as_py(),
            classes=self.sizes.num_rows,
            smallest_class=pc.min(size).as_py(),
            rows_below_k=pc.sum(pc.filter(size, small)).as_py() or 0,
            classes_below_k=pc.sum(pc.cast(small, pa.int64())).as_py(),
            l_diversity=l_div,
        )


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
    sizes = counts.sizes
    if sizes is None:
        sizes = pa.table(
            [pa.array([], table.schema.field(c).type) for c in qis] + [pa.array([], pa.int64())],
            names=[*qis, "class_size"],
        )
    right = _join_keys(sizes, qis).append_column("class_size", sizes.column("class_size"))
    keys = [n for n in left.column_names if n != index]
    joined = left.join(right, keys=keys, join_type="left outer", use_threads=False)
    size = joined.sort_by(index).column("class_size")
    if size.null_count:
        raise ValueError("a row's class is missing from the counts (counts over other rows?)")
    return pc.less(size, k).combine_chunks()


def risk_record(check: RiskCheck, counts: ClassCounts) -> dict[str, Any]:
    """The ``risk`` field of ``run.completed``: the figures of the output as written.

    ``counts`` are the global class counts of the output *before* any
    suppression. With ``action: suppress`` the figures are those of the rows
    kept (so ``rows_below_k`` is 0) and ``rows_suppressed`` /
    ``classes_suppressed`` say what was removed; with ``report`` those are 0.
    """
    before = counts.report(check.k)
    after = counts.without_small(check.k).report(check.k) if check.suppress else before
    record: dict[str, Any] = {
        "quasi_identifiers": list(check.quasi_identifiers),
        "sensitive": check.sensitive,
        "action": check.action,
        "l_diversity_kind": DIVERSITY,
        "k": check.k,
        "l": check.l,
        **{f: v for f, v in after.to_dict().items() if f != "k"},
        "rows_suppressed": before.rows_below_k if check.suppress else 0,
        "classes_suppressed": before.classes_below_k if check.suppress else 0,
    }
    record["k_anonymous"] = after.rows == 0 or after.smallest_class >= check.k
    record["l_diverse"] = (
        None if check.l is None else (after.l_diversity is None or after.l_diversity >= check.l)
    )
    return record
