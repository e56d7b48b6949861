"""The Spark ``mapInArrow`` function joins Spark's small Arrow batches before the core runs.

Spark hands Python batches of ``spark.sql.execution.arrow.maxRecordsPerBatch``
rows (10,000 by default); the core has a cost per batch, so
:class:`~cape_pipelines.spark.PolicyFunction` joins consecutive batches up to
``coalesce_rows``. These tests call the function as Spark's Python worker
does (an iterator of wire-typed batches in, batches out) without a JVM: the
joined output must be the same bytes as the core over the whole table, for
every way of cutting the input, with nulls, NaN, a session time zone and a
tokenizer whose per-batch deduplication choice changes with the batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("pyspark")

from cape_pipelines import build_plan
from cape_pipelines.core import apply_table
from cape_pipelines.spark import PolicyFunction
from cape_pipelines.spark.convert import cast_batch, wire_schema

KEYS = {"tok": b"t" * 32, "siv": bytes(range(32))}
POLICY = {
    "label": "batches",
    "rules": [
        {
            "match": {"name": "email"},
            "actions": [{"transform": {"type": "tokenizer", "key": {"secret": "tok"}}}],
        },
        {
            "match": {"name": "country"},
            "actions": [{"transform": {"type": "reversible-tokenizer", "key": {"secret": "siv"}}}],
        },
        {
            "match": {"name": "salary"},
            "actions": [{"transform": {"type": "numeric-rounding", "precision": -2}}],
        },
        {
            "match": {"name": "signup"},
            "actions": [{"transform": {"type": "date-truncation", "frequency": "month"}}],
        },
    ],
}


def _table(rows: int) -> pa.Table:
    emails = [
        None if i % 17 == 0 else f"user{i % (rows // 2 + 1)}@example.org" for i in range(rows)
    ]
    salary = [
        float("nan") if i % 11 == 0 else None if i % 13 == 0 else i * 37.5 for i in range(rows)
    ]
    return pa.table(
        {
            "email": pa.array(emails, pa.string()),
            "country": pa.array([["NZ", "FR", None, "JP"][i % 4] for i in range(rows)]),
            "salary": pa.array(salary, pa.float64()),
            "signup": pa.array(
                [1_600_000_000_000_000 + i * 3_600_000_000 for i in range(rows)],
                pa.timestamp("us", tz="Pacific/Auckland"),
            ),
            "age": pa.array(range(rows), pa.int64()),
        }
    )


def _wire(table: pa.Table, sizes: list[int]) -> Iterator[pa.RecordBatch]:
    """``table`` cut into batches of ``sizes`` rows (cycled), in Spark's wire types."""
    start, i = 0, 0
    schema = wire_schema(table.schema)
    while start < table.num_rows:
        size = sizes[i % len(sizes)]
        for batch in table.slice(start, size).to_batches():
            yield cast_batch(batch, schema)
        start, i = start + size, i + 1


def _run(fn: PolicyFunction, batches: Iterator[pa.RecordBatch]) -> list[pa.RecordBatch]:
    return list(fn(batches))


def _same(got: pa.Table, want: pa.Table) -> bool:
    """Equal schemas and values, floats compared by their bits (so NaN equals the same NaN)."""
    if got.schema != want.schema:
        return False
    for a, b in zip(got.columns, want.columns, strict=True):
        a, b = a.combine_chunks(), b.combine_chunks()
        if pa.types.is_float64(a.type):
            a, b = a.view(pa.int64()), b.view(pa.int64())
        if not a.equals(b):
            return False
    return True


def _expected(table: pa.Table) -> pa.Table:
    plan = build_plan(POLICY, table.schema, keys=KEYS)
    out, _ = apply_table(plan, table)
    return out.cast(wire_schema(plan.output_schema))


def test_small_batches_are_joined_up_to_coalesce_rows() -> None:
    table = _table(1_000)
    fn = PolicyFunction(build_plan(POLICY, table.schema, keys=KEYS))
    fn.coalesce_rows = 300
    out = _run(fn, _wire(table, [100]))
    # 10 batches of 100 in, joined into 300 + 300 + 300 + 100.
    assert [b.num_rows for b in out] == [300, 300, 300, 100]
    assert _same(pa.Table.from_batches(out), _expected(table))


def test_spark_sized_batches_are_joined_by_default() -> None:
    table = _table(25_000)
    fn = PolicyFunction(build_plan(POLICY, table.schema, keys=KEYS))
    out = _run(fn, _wire(table, [10_000]))
    assert [b.num_rows for b in out] == [25_000]
    assert _same(pa.Table.from_batches(out), _expected(table))


def test_empty_batches_and_an_empty_partition() -> None:
    table = _table(10)
    fn = PolicyFunction(build_plan(POLICY, table.schema, keys=KEYS))
    schema = wire_schema(table.schema)
    empty = pa.RecordBatch.from_pylist([], schema=schema)
    assert _run(fn, iter([])) == []
    assert _run(fn, iter([empty, empty])) == []
    out = _run(fn, iter([empty, *_wire(table, [3]), empty]))
    assert _same(pa.Table.from_batches(out), _expected(table))


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(min_value=1, max_value=400),
    sizes=st.lists(st.integers(min_value=1, max_value=150), min_size=1, max_size=5),
    coalesce=st.integers(min_value=1, max_value=500),
)
def test_any_cut_gives_the_same_bytes(rows: int, sizes: list[int], coalesce: int) -> None:
    table = _table(rows)
    fn = PolicyFunction(build_plan(POLICY, table.schema, keys=KEYS))
    fn.coalesce_rows = coalesce
    out = _run(fn, _wire(table, sizes))
    assert all(b.num_rows <= coalesce + max(sizes) for b in out)
    assert _same(pa.Table.from_batches(out, schema=fn.wire_out), _expected(table))
