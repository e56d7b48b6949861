"""Every engine, every case: the output equals the case's one expectation.

Parametrised over (engine, case). Types and values must be equal; engines that
hand back pandas are compared after the one dtype round trip
``runners.normalise``, engines listed in ``runners.UNORDERED`` as multisets of
rows, every other engine in order. An engine whose extra is not installed is a
SKIPPED line per test (a failure when CAPE_REQUIRE_ALL_ENGINES=1, as in CI).
"""

from __future__ import annotations

from collections import Counter
from functools import cache
from typing import Any

import pyarrow as pa
import pytest
from cases import CASES, FROM_CORE, Case
from runners import (
    MARKS,
    MICROS_ONLY,
    MISSING,
    REQUIRE_ALL_ENGINES,
    RUNNERS,
    UNORDERED,
    VIA_PANDAS,
    normalise,
)

from cape_pipelines import build_plan
from cape_pipelines.core import apply_table
from cape_pipelines.transforms import known_types

ENGINES = [
    pytest.param(e, marks=[getattr(pytest.mark, MARKS[e])] if e in MARKS else []) for e in RUNNERS
]
CASE_PARAMS = [pytest.param(c, id=c.name) for c in CASES]


def test_every_case_uses_registered_transformations() -> None:
    for case in CASES:
        assert case.transform_types() <= set(known_types()), case.name


def test_every_engine_is_installed_when_required() -> None:
    """CI (CAPE_REQUIRE_ALL_ENGINES=1) fails here, once, naming each missing engine."""
    if not REQUIRE_ALL_ENGINES:
        if MISSING:
            pytest.skip(f"engines not installed: {', '.join(sorted(MISSING))}")
        return
    assert not MISSING, MISSING


def floor_ns_to_micros(table: pa.Table) -> pa.Table:
    """``table`` with nanosecond timestamps floored to whole microseconds (type kept)."""
    from cape_pipelines.spark.convert import floor_to_micros

    cols = [floor_to_micros(c).cast(c.type) for c in table.columns]
    return pa.table(cols, names=table.column_names)


@cache
def expectation(name: str, micros_only: bool = False) -> pa.Table:
    """The case's expectation; ``FROM_CORE`` ones from the core's ``apply_table``, checked.

    ``micros_only``: the expectation for an engine that holds timestamps in
    microseconds: literal expectations floored, core ones computed on the
    floored input (the one documented difference at Spark's boundary).
    """
    case = next(c for c in CASES if c.name == name)
    if case.expected != FROM_CORE:
        assert isinstance(case.expected, pa.Table)
        return floor_ns_to_micros(case.expected) if micros_only else case.expected
    data = floor_ns_to_micros(case.input) if micros_only else case.input
    plan = build_plan(case.policy, data.schema, keys=case.keys)
    table, _ = apply_table(plan, data)
    if case.check is not None:
        case.check(data, table)
    return table


def _rows(table: pa.Table) -> list[tuple[Any, ...]]:
    return [tuple(r.values()) for r in table.to_pylist()]


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("engine", ENGINES)
def test_parity(engine: str, case: Case) -> None:
    expected = expectation(case.name, engine in MICROS_ONLY)
    actual = RUNNERS[engine](case.policy, case.input, case.keys)
    if engine in VIA_PANDAS:
        expected = normalise(expected)
    assert actual.schema.remove_metadata() == expected.schema.remove_metadata(), (
        f"\nactual:\n{actual.schema}\nexpected:\n{expected.schema}"
    )
    if engine in UNORDERED:
        assert Counter(_rows(actual)) == Counter(_rows(expected))
    else:
        assert _rows(actual) == _rows(expected)
        assert actual.equals(expected)


@pytest.mark.parametrize("case", [p for p in CASE_PARAMS if p.values[0].expected == FROM_CORE])
def test_core_expectation_has_the_promised_properties(case: Case) -> None:
    """An expectation taken from the core passes its case's property check (noise range,
    one shift per context value) before any engine is compared with it."""
    assert case.check is not None, "a FROM_CORE case needs a property check"
    expectation.cache_clear()
    expectation(case.name)  # runs case.check
