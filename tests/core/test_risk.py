"""k-anonymity and l-diversity: hand-computed figures, merged partitions, suppression oracle."""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import pairwise

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cape_pipelines.errors import PlanError
from cape_pipelines.transforms.risk import ClassCounts, below_k

PEOPLE = pa.table(
    {
        "zip": ["021", "021", "021", None, None, "941", ""],
        "age": pa.array([30, 30, 30, 40, 40, 50, 40], pa.int32()),
        "dx": ["flu", "flu", "cold", "flu", None, "flu", "flu"],
    }
)


def test_hand_computed_figures():
    report = ClassCounts.of_table(PEOPLE, ["zip", "age"], "dx").report(k=2)
    # classes: (021,30) x3, (None,40) x2, (941,50) x1, ("",40) x1
    assert report.to_dict() == {
        "k": 2,
        "rows": 7,
        "classes": 4,
        "smallest_class": 1,
        "rows_below_k": 2,
        "classes_below_k": 2,
        "l_diversity": 1,
    }
    assert below_k(PEOPLE, ClassCounts.of_table(PEOPLE, ["zip", "age"]), 2).to_pylist() == [
        False,
        False,
        False,
        False,
        False,
        True,
        True,
    ]


def test_null_sensitive_value_counts_as_a_value():
    counts = ClassCounts.of_table(PEOPLE, ["zip"], "dx")
    nulls = counts.pairs.filter(pa.compute.is_null(counts.pairs.column("zip")))
    assert set(nulls.column("dx").to_pylist()) == {"flu", None}
    assert counts.report(1).l_diversity == 1


def test_missing_columns_and_no_quasi_identifiers_are_plan_errors():
    with pytest.raises(PlanError, match="nope"):
        ClassCounts.of_table(PEOPLE, ["zip", "nope"])
    with pytest.raises(PlanError, match="at least one"):
        ClassCounts.of_table(PEOPLE, [])


def test_empty_table():
    report = ClassCounts.of_table(PEOPLE.schema.empty_table(), ["zip"]).report(3)
    assert (report.rows, report.classes, report.smallest_class) == (0, 0, 0)


ROWS = st.lists(
    st.tuples(
        st.one_of(st.none(), st.sampled_from(["a", "b", ""])),
        st.one_of(st.none(), st.integers(0, 2)),
        st.sampled_from(["x", "y", "z"]),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(rows=ROWS, cuts=st.lists(st.integers(0, 40), max_size=4), k=st.integers(1, 5))
def test_partitions_merged_equal_the_whole_and_the_oracle(rows, cuts, k):
    table = pa.table(
        {
            "q1": pa.array([r[0] for r in rows], pa.string()),
            "q2": pa.array([r[1] for r in rows], pa.int64()),
            "s": pa.array([r[2] for r in rows], pa.string()),
        }
    )
    bounds = sorted({0, len(rows), *[min(c, len(rows)) for c in cuts]})
    merged = ClassCounts(("q1", "q2"), "s")
    for lo, hi in pairwise(bounds):
        merged.merge(ClassCounts.of_table(table.slice(lo, hi - lo), ["q1", "q2"], "s"))
    whole = ClassCounts.of_table(table, ["q1", "q2"], "s")
    assert merged.report(k) == whole.report(k)
    at_once = ClassCounts(("q1", "q2"), "s").merge(
        *(
            ClassCounts.of_table(table.slice(lo, hi - lo), ["q1", "q2"], "s")
            for lo, hi in pairwise(bounds)
        )
    )
    assert at_once.report(k) == whole.report(k)
    assert at_once.class_sizes() == whole.class_sizes()
    # Oracle: plain Python counting.
    sizes = Counter((r[0], r[1]) for r in rows)
    values = defaultdict(set)
    for r in rows:
        values[(r[0], r[1])].add(r[2])
    report = whole.report(k)
    assert report.rows == len(rows)
    assert report.classes == len(sizes)
    assert report.rows_below_k == sum(n for n in sizes.values() if n < k)
    if rows:
        assert report.smallest_class == min(sizes.values())
        assert report.l_diversity == min(len(v) for v in values.values())
    # Each partition's rows are judged by the global count, not the partition's.
    for lo, hi in pairwise(bounds):
        part = table.slice(lo, hi - lo)
        expected = [sizes[(r[0], r[1])] < k for r in rows[lo:hi]]
        assert below_k(part, merged, k).to_pylist() == expected
