"""bucket and generalize: table-driven cases, an independent oracle for widths, refusals."""

from __future__ import annotations

import datetime as dt
import math

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cape_pipelines as cape
from cape_pipelines.audit import MemorySink
from cape_pipelines.errors import PolicyError, TransformError


def policy(params: dict) -> dict:
    return {"label": "b", "rules": [{"match": {"name": "x"}, "actions": [{"transform": params}]}]}


def run(values: pa.Array, **params) -> pa.Array:
    out = cape.apply_policy(policy(params), pa.table({"x": values}), audit=MemorySink())
    return out.column("x").combine_chunks()


@pytest.mark.parametrize(
    ("values", "params", "expected"),
    [
        # integer decades, inclusive labels; negatives floor down
        (
            pa.array([37, 30, 39, -1, None], pa.int32()),
            {"width": 10},
            ["30-39", "30-39", "30-39", "-10--1", None],
        ),
        # an origin shifts the buckets
        (pa.array([4, 5, 14], pa.int64()), {"width": 10, "origin": 5}, ["-5-4", "5-14", "5-14"]),
        # lower bound instead of a label keeps a number
        (pa.array([37, -1], pa.int8()), {"width": 10, "output": "lower"}, [30, -10]),
        # floats: half-open labels; NaN and inf in no bucket
        (
            pa.array([0.7, -0.2, math.nan, math.inf]),
            {"width": 0.5},
            ["[0.5, 1)", "[-0.5, 0)", None, None],
        ),
        # a float width on an integer column gives float buckets
        (pa.array([3, 7]), {"width": 2.5, "output": "lower"}, [2.5, 5.0]),
        # explicit edges with open ends
        (
            pa.array([17, 18, 64, 65, None]),
            {"edges": [18, 65]},
            ["<18", "18-64", "18-64", ">=65", None],
        ),
        # explicit edges with labels
        (
            pa.array([5, 40, 90]),
            {"edges": [18, 65], "labels": ["child", "adult", "senior"]},
            ["child", "adult", "senior"],
        ),
        # edges on floats
        (pa.array([0.5, 18.5, 20.0]), {"edges": [0.0, 18.5]}, ["[0, 18.5)", ">=18.5", ">=18.5"]),
        # lower bound of edges: the open first bucket has none
        (pa.array([1, 50]), {"edges": [18, 65], "output": "lower"}, [None, 18]),
    ],
)
def test_numbers(values, params, expected):
    assert run(values, type="bucket", **params).to_pylist() == expected


DATES = pa.array([dt.date(2020, 2, 13), dt.date(1969, 12, 31), None, dt.date(2021, 1, 1)])


@pytest.mark.parametrize(
    ("unit", "labels", "starts"),
    [
        (
            "week",
            ["2020-W07", "1970-W01", None, "2020-W53"],
            [dt.date(2020, 2, 10), dt.date(1969, 12, 29), None, dt.date(2020, 12, 28)],
        ),
        (
            "month",
            ["2020-02", "1969-12", None, "2021-01"],
            [dt.date(2020, 2, 1), dt.date(1969, 12, 1), None, dt.date(2021, 1, 1)],
        ),
        (
            "quarter",
            ["2020-Q1", "1969-Q4", None, "2021-Q1"],
            [dt.date(2020, 1, 1), dt.date(1969, 10, 1), None, dt.date(2021, 1, 1)],
        ),
        (
            "year",
            ["2020", "1969", None, "2021"],
            [dt.date(2020, 1, 1), dt.date(1969, 1, 1), None, dt.date(2021, 1, 1)],
        ),
    ],
)
def test_dates(unit, labels, starts):
    assert run(DATES, type="bucket", unit=unit).to_pylist() == labels
    out = run(DATES, type="bucket", unit=unit, output="lower")
    assert out.type == pa.date32() and out.to_pylist() == starts


def test_timestamps_with_a_zone_use_utc_wall_time():
    # 23:30 UTC on 31 March is 1 April in Paris: UTC decides, as date-truncation does.
    ts = pa.array(
        [dt.datetime(2020, 3, 31, 23, 30, tzinfo=dt.UTC)], pa.timestamp("us", tz="Europe/Paris")
    )
    assert run(ts, type="bucket", unit="quarter").to_pylist() == ["2020-Q1"]
    out = run(ts, type="bucket", unit="month", output="lower")
    assert out.type == ts.type
    assert out.to_pylist() == [dt.datetime(2020, 3, 1, tzinfo=dt.UTC)]


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.one_of(st.none(), st.integers(-(10**12), 10**12)), max_size=20),
    width=st.integers(1, 1000),
    origin=st.integers(-1000, 1000),
)
def test_integer_width_oracle(values, width, origin):
    out = run(pa.array(values, pa.int64()), type="bucket", width=width, origin=origin).to_pylist()
    for v, label in zip(values, out, strict=True):
        if v is None:
            assert label is None
            continue
        lo = origin + ((v - origin) // width) * width
        assert lo <= v < lo + width
        assert label == f"{lo}-{lo + width - 1}"


def test_integer_overflow_is_an_error_not_a_wrong_bucket():
    big = pa.array([2**63 - 1, 0], pa.int64())
    with pytest.raises(TransformError, match="int64 limits"):
        run(big, type="bucket", width=10, origin=-5)
    # Far from the limits the same parameters work.
    assert run(pa.array([7], pa.int64()), type="bucket", width=10, origin=-5).to_pylist() == [
        "5-14"
    ]


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"width": 10, "edges": [1]}, "exactly one of width, edges or unit"),
        ({}, "exactly one of"),
        ({"width": 0}, "positive"),
        ({"edges": [3, 2]}, "ascending"),
        ({"edges": []}, "at least one"),
        ({"edges": [1, 2], "labels": ["a", "b"]}, "3 buckets"),
        ({"width": 5, "labels": ["a"]}, "labels go with edges"),
        ({"unit": "decade"}, "unit"),
    ],
)
def test_invalid_bucket_parameters(params, match):
    with pytest.raises(PolicyError, match=match):
        cape.load_policy(policy({"type": "bucket", **params}))


@pytest.mark.parametrize(
    ("values", "params"),
    [
        (pa.array(["a"]), {"width": 10}),
        (pa.array([1]), {"unit": "month"}),
        (pa.array([dt.date(2020, 1, 1)]), {"edges": [1]}),
    ],
)
def test_wrong_column_types_are_plan_errors(values, params):
    with pytest.raises(cape.PlanError):
        run(values, type="bucket", **params)


# -- generalize ---------------------------------------------------------------------------

CITIES = {"Boston": "Northeast", "New York": "Northeast", "Austin": "South"}


@pytest.mark.parametrize(
    ("values", "params", "expected"),
    [
        # ZIP to its first three digits
        (["02139", "9410", None], {"prefix": 3}, ["021", "941", None]),
        # the cut characters filled, length kept
        (["02139", "9", ""], {"prefix": 3, "fill": "*"}, ["021**", "9", ""]),
        # prefixes count characters, not bytes
        (["Zoë李雷"], {"prefix": 3}, ["Zoë"]),
        # a mapping table from the policy
        (["Austin", "Boston", None], {"mapping": CITIES}, ["South", "Northeast", None]),
        # unmapped values: a default group, null, or kept
        (["Austin", "Paris"], {"mapping": CITIES, "default": "Other"}, ["South", "Other"]),
        (["Austin", "Paris"], {"mapping": CITIES, "unmapped": "null"}, ["South", None]),
        (["Austin", "Paris"], {"mapping": CITIES, "unmapped": "keep"}, ["South", "Paris"]),
    ],
)
def test_generalize(values, params, expected):
    assert run(pa.array(values, pa.string()), type="generalize", **params).to_pylist() == expected


def test_unmapped_value_is_an_error_naming_the_row_not_the_value():
    with pytest.raises(TransformError, match="row 2 is not in the mapping") as info:
        run(pa.array(["Austin", None, "Paris"]), type="generalize", mapping=CITIES)
    assert "Paris" not in str(info.value)


def test_dictionary_input():
    values = pa.array(["Austin", "Boston", "Austin"]).dictionary_encode()
    out = run(values, type="generalize", mapping=CITIES)
    assert out.to_pylist() == ["South", "Northeast", "South"]


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({}, "exactly one of prefix or mapping"),
        ({"prefix": 3, "mapping": CITIES}, "exactly one of"),
        ({"prefix": 3, "default": "x"}, "go with mapping"),
        ({"mapping": CITIES, "fill": "*"}, "fill goes with prefix"),
        ({"mapping": CITIES, "default": "x", "unmapped": "keep"}, "not both"),
        ({"mapping": {}}, "at least one"),
        ({"prefix": 3, "fill": "**"}, "one character"),
    ],
)
def test_invalid_generalize_parameters(params, match):
    with pytest.raises(PolicyError, match=match):
        cape.load_policy(policy({"type": "generalize", **params}))
