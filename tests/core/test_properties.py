"""Hypothesis properties: fail-closed row redaction, and output independent of batch boundaries."""

from __future__ import annotations

import itertools
from typing import Any

import _core_test_transforms  # noqa: F401  (registers test-suffix, plusN, test-keyed)
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cape_pipelines import build_plan
from cape_pipelines.core import Counters, apply_batch
from cape_pipelines.transforms import known_types

SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.float64()), ("s", pa.string())])
KEY = bytes(range(32))

ints = st.one_of(st.none(), st.integers(-50, 50))
floats = st.one_of(st.none(), st.floats(-50, 50, allow_nan=False))
strings = st.one_of(st.none(), st.sampled_from(["", "x", "y", "é", "zz"]))
rows = st.lists(st.tuples(ints, floats, strings), max_size=40)

# ---- a random condition together with a Python oracle giving True/False/None (SQL logic)

OPS = {
    "==": lambda x, y: x == y,
    "!=": lambda x, y: x != y,
    "<": lambda x, y: x < y,
    "<=": lambda x, y: x <= y,
    ">": lambda x, y: x > y,
    ">=": lambda x, y: x >= y,
}


def _and(x: bool | None, y: bool | None) -> bool | None:
    if x is False or y is False:
        return False
    return None if x is None or y is None else True


def _or(x: bool | None, y: bool | None) -> bool | None:
    if x is True or y is True:
        return True
    return None if x is None or y is None else False


def _quote(v: str) -> str:
    return "'" + v.replace("'", "''") + "'"


@st.composite
def predicates(draw: st.DrawFn) -> tuple[str, Any]:
    column = draw(st.sampled_from(["a", "b", "s"]))
    index = {"a": 0, "b": 1, "s": 2}[column]
    literal = draw(
        st.integers(-50, 50)
        if column == "a"
        else st.integers(-50, 50) | st.sampled_from([-0.5, 2.25])
        if column == "b"
        else st.sampled_from(["", "x", "y", "é", "it's"])
    )
    text_lit = _quote(literal) if isinstance(literal, str) else str(literal)
    kind = draw(st.sampled_from(["cmp", "cmp_flipped", "in", "not_in", "is_null", "is_not_null"]))
    if kind in ("cmp", "cmp_flipped"):
        op = draw(st.sampled_from(sorted(OPS)))
        flipped = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}.get(op, op)
        text = f"{column} {op} {text_lit}" if kind == "cmp" else f"{text_lit} {flipped} {column}"
        return text, lambda r: None if r[index] is None else OPS[op](r[index], literal)
    if kind in ("in", "not_in"):
        values = [literal, draw(st.integers(-50, 50)) if column != "s" else "zz"]
        listed = ", ".join(_quote(v) if isinstance(v, str) else str(v) for v in values)
        neg = kind == "not_in"
        text = f"{column} {'not in' if neg else 'in'} ({listed})"
        return text, lambda r: None if r[index] is None else ((r[index] in values) != neg)
    neg = kind == "is_not_null"
    return f"{column} is {'not ' if neg else ''}null", lambda r: (r[index] is None) != neg


def conditions() -> st.SearchStrategy[tuple[str, Any]]:
    def extend(inner: st.SearchStrategy[tuple[str, Any]]) -> st.SearchStrategy[tuple[str, Any]]:
        def combine(op: str, left: tuple[str, Any], right: tuple[str, Any]) -> tuple[str, Any]:
            lt, lf = left
            rt, rf = right
            if op == "and":
                return f"({lt}) and ({rt})", lambda r: _and(lf(r), rf(r))
            return f"({lt}) or ({rt})", lambda r: _or(lf(r), rf(r))

        def negate(inner_: tuple[str, Any]) -> tuple[str, Any]:
            t, f = inner_
            return f"not ({t})", lambda r: None if f(r) is None else not f(r)

        return st.one_of(
            st.builds(combine, st.sampled_from(["and", "or"]), inner, inner),
            st.builds(negate, inner),
        )

    return st.recursive(predicates(), extend, max_leaves=6)


def to_batch(data: list[tuple]) -> pa.RecordBatch:
    cols = list(zip(*data, strict=True)) if data else [[], [], []]
    return pa.RecordBatch.from_arrays(
        [pa.array(list(c), f.type) for c, f in zip(cols, SCHEMA, strict=True)], schema=SCHEMA
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=rows, condition=conditions())
def test_row_redact_keeps_exactly_the_rows_whose_condition_is_false(
    data: list[tuple], condition: tuple[str, Any]
) -> None:
    text, oracle = condition
    plan = build_plan(
        {
            "label": "p",
            "rules": [{"actions": [{"transform": {"type": "row-redact", "condition": text}}]}],
        },
        SCHEMA,
    )
    out, counters, indices = apply_batch(plan, to_batch(data), with_indices=True)
    expected = [i for i, r in enumerate(data) if oracle(r) is False]
    assert indices.to_pylist() == expected, text
    assert out.to_pylist() == [dict(zip(SCHEMA.names, data[i], strict=True)) for i in expected]
    assert counters.rows_redacted == len(data) - len(expected)


# ---- batching independence, over every column transform we can parametrise

SAMPLE_ACTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    # type name -> (column it applies to, parameters)
    "test-suffix": ("s", {"suffix": "#"}),
    "test-keyed": ("s", {"key": {"secret": "k"}}),
    "plusN": ("a", {"n": 3}),
    "tokenizer": ("s", {"key": {"secret": "k"}}),
    "reversible-tokenizer": ("s", {"key": {"secret": "k"}}),
    "numeric-rounding": ("b", {"precision": 1}),
    "numeric-perturbation": ("a", {"min": -5, "max": 5, "seed": 7}),
}


def available_actions() -> list[str]:
    registered = set(known_types())
    return [name for name in SAMPLE_ACTIONS if name in registered]


def split_points(n: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, n), max_size=5).map(sorted)


@pytest.mark.parametrize("type_name", available_actions())
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_output_independent_of_batch_boundaries(type_name: str, data: st.DataObject) -> None:
    column, params = SAMPLE_ACTIONS[type_name]
    table_rows = data.draw(rows)
    cuts = data.draw(split_points(len(table_rows)))
    policy = {
        "label": "p",
        "rules": [
            {"match": {"name": column}, "actions": [{"transform": {"type": type_name, **params}}]},
            {"actions": [{"transform": {"type": "row-redact", "condition": "a < 0 or s == 'y'"}}]},
            {
                "actions": [
                    {
                        "transform": {
                            "type": "column-redact",
                            "columns": ["b"] if column != "b" else ["a"],
                        }
                    }
                ]
            },
        ],
    }
    plan = build_plan(policy, SCHEMA, keys={"k": KEY})
    whole, whole_counts, _ = apply_batch(plan, to_batch(table_rows))

    bounds = [0, *cuts, len(table_rows)]
    pieces = []
    total = Counters()
    for lo, hi in itertools.pairwise(bounds):
        out, counts, _ = apply_batch(plan, to_batch(table_rows[lo:hi]))
        pieces.append(out)
        total.merge(counts)
    joined = pa.Table.from_batches(pieces, schema=plan.output_schema).combine_chunks()
    assert joined.equals(pa.Table.from_batches([whole]).combine_chunks())
    assert total.to_dict() == whole_counts.to_dict()
