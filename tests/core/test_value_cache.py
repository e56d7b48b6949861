"""The cross-batch token memo: same results as no memo, bounded, and off when it does not pay."""

from __future__ import annotations

import pyarrow as pa

from cape_pipelines import build_plan
from cape_pipelines.core import apply_batches
from cape_pipelines.transforms._text import ValueCache

KEYS = {"tok": b"k" * 32, "siv": bytes(range(32))}


def _upper(calls: list[int]):
    def fn(values: list[bytes]) -> list[bytes]:
        calls.append(len(values))
        return [v.upper() for v in values]

    return fn


def test_remembers_values_across_calls() -> None:
    calls: list[int] = []
    cache = ValueCache(limit=10)
    assert cache.compute([b"a", b"b"], _upper(calls)) == [b"A", b"B"]
    assert cache.compute([b"b", b"c"], _upper(calls)) == [b"B", b"C"]
    assert calls == [2, 1]  # the second call computed only b"c"


def test_stays_within_its_limit() -> None:
    cache = ValueCache(limit=3)
    for i in range(10):
        values = [bytes([65 + i]), bytes([97 + i])]
        assert cache.compute(values, _upper([])) == [v.upper() for v in values]
        assert len(cache._map) <= 3


def test_leaves_batches_as_large_as_its_limit_alone() -> None:
    calls: list[int] = []
    cache = ValueCache(limit=3)
    values = [b"a", b"b", b"c"]
    cache.compute(values, _upper(calls))
    cache.compute(values, _upper(calls))
    assert calls == [3, 3]  # nothing remembered: the batch dedupes itself
    assert not cache._map


def test_switches_off_when_few_values_repeat() -> None:
    calls: list[int] = []
    cache = ValueCache(limit=4)
    cache.compute([b"1", b"2"], _upper(calls))
    cache.compute([b"3", b"4"], _upper(calls))  # four lookups, no hit
    assert not cache.enabled
    assert cache.compute([b"1"], _upper(calls)) == [b"1"]
    assert calls == [2, 2, 1]  # computed again: the memo is off


def test_tokens_equal_with_and_without_repeats_across_batches() -> None:
    """Low-cardinality column in many small batches: same tokens as one big batch."""
    values = [f"c{i % 7}" for i in range(500)] + [None]
    table = pa.table({"c": values})
    for transform in (
        {"type": "tokenizer", "key": {"secret": "tok"}},
        {"type": "reversible-tokenizer", "key": {"secret": "siv"}},
    ):
        rule = {"match": {"name": "c"}, "actions": [{"transform": transform}]}
        pol = {"label": "t", "rules": [rule]}
        whole = list(apply_batches(build_plan(pol, table.schema, keys=KEYS), table.to_batches()))
        plan = build_plan(pol, table.schema, keys=KEYS)
        small = list(apply_batches(plan, table.to_batches(max_chunksize=13)))
        assert pa.Table.from_batches(small).equals(pa.Table.from_batches(whole))
