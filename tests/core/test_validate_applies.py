"""Property: a policy that validates applies, or fails with a CapeError naming the problem.

``cape policy validate`` saying ok is a promise about ``cape apply``: generated
policies (every built-in transformation, with parameters drawn from valid,
extreme and wrong values, long and deep conditions) are loaded; those that
load are applied to a generated table. The only acceptable failures are the
documented ones (a column of the wrong type, a value out of range): a
:class:`~cape_pipelines.errors.CapeError`. Anything else is the "internal
error, exit 70" a user must never see after validate said ok.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cape_pipelines as cape
from cape_pipelines.errors import CapeError

KEYS = {"k32": bytes(range(32)), "k64": bytes(range(64)), "k16": bytes(range(16))}
COLUMNS = ["i8", "i64", "f64", "f32", "dec", "s", "d", "ts", "b"]


def table_strategy() -> st.SearchStrategy[pa.Table]:
    row = st.tuples(
        st.none() | st.integers(-128, 127),
        st.none() | st.integers(-(2**63), 2**63 - 1),
        st.none() | st.floats(allow_nan=True, allow_infinity=True),
        st.none() | st.floats(width=32, allow_nan=True, allow_infinity=True),
        st.none() | st.decimals(min_value=-(10**6), max_value=10**6, places=2, allow_nan=False),
        st.none() | st.text(max_size=5),
        st.none() | st.dates(dt.date(1, 1, 1), dt.date(9999, 12, 31)),
        st.none() | st.datetimes(dt.datetime(1678, 1, 2), dt.datetime(2261, 12, 31)),
        st.none() | st.booleans(),
    )
    types = [
        pa.int8(),
        pa.int64(),
        pa.float64(),
        pa.float32(),
        pa.decimal128(10, 2),
        pa.string(),
        pa.date32(),
        pa.timestamp("ns"),
        pa.bool_(),
    ]

    def build(rows: list[tuple[Any, ...]]) -> pa.Table:
        cols = list(zip(*rows, strict=True)) if rows else [[] for _ in COLUMNS]
        return pa.table(
            {n: pa.array(list(c), t) for n, c, t in zip(COLUMNS, cols, types, strict=True)}
        )

    return st.lists(row, max_size=12).map(build)


anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.lists(st.integers(-5, 5), max_size=3),
)


def mostly(valid: st.SearchStrategy[Any], extreme: st.SearchStrategy[Any]) -> Any:
    """``valid`` nine times in ten, so that most generated policies load."""
    return st.integers(0, 9).flatmap(lambda n: extreme if n == 0 else valid)


ints = mostly(
    st.integers(-20, 20),
    st.sampled_from([-(2**63), 2**63, -401, -400, -309, -308, 308, 309, 400, 401, 10**20]),
)
nums = mostly(
    st.integers(-1000, 1000) | st.floats(-1e6, 1e6),
    st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**70), 2**70),
)
keys = mostly(
    st.sampled_from([{"secret": "k32"}, {"secret": "k64"}, "an inline key, 32 bytes long....."]),
    st.sampled_from([{"secret": "k16"}, "short", {"secret": "nosuch"}]),
)
siv_keys = mostly(st.sampled_from([{"secret": "k32"}, {"secret": "k64"}]), keys)
frequencies = mostly(
    st.sampled_from(["year", "Month", "DAY", "hour", "minute", "second"]),
    st.sampled_from(["week", 3, ["day", "month"]]),
)
perturb_units = mostly(
    st.sampled_from(["YEAR", "month", "Day", "HOUR", "minutes", "seconds"]), st.just("week")
)
dtypes = mostly(
    st.sampled_from(["Integer", "Long", "Double", "Float", "Short", "Byte"]),
    st.sampled_from(["String", "Date", None]),
)
columns = st.sampled_from(COLUMNS)


@st.composite
def conditions(draw: st.DrawFn) -> str:
    def predicate() -> str:
        col = draw(columns)
        op = draw(st.sampled_from(["<", "<=", "==", "!=", ">", ">="]))
        lit = draw(
            st.sampled_from(
                [
                    "0",
                    "-1.5",
                    "1e308",
                    "-1e400",
                    "1" + "0" * 400,
                    "'x'",
                    "true",
                    "date'2020-01-01'",
                    "timestamp'2020-01-01T00:00:00Z'",
                    "99999999999",
                ]
            )
        )
        return draw(
            st.sampled_from(
                [
                    f"{col} {op} {lit}",
                    f"{col} is null",
                    f"{col} in ({lit}, {lit})",
                    f"not {col} {op} {lit}",
                ]
            )
        )

    n = draw(mostly(st.sampled_from([1, 2, 3]), st.sampled_from([50, 1500, 5000])))
    joiner = draw(st.sampled_from([" and ", " or ", " & "]))
    text = joiner.join(predicate() for _ in range(min(n, 5)))
    if n > 5:  # long flat chains, repeated rather than drawn term by term (fast)
        text = joiner.join([text] * (n // 5))
    depth = draw(mostly(st.sampled_from([0, 1, 3]), st.sampled_from([97, 120])))
    return "(" * depth + text + ")" * depth


@st.composite
def transforms(draw: st.DrawFn) -> Any:
    kind = draw(
        st.sampled_from(
            [
                "tokenizer",
                "reversible-tokenizer",
                "token-reverser",
                "numeric-perturbation",
                "date-perturbation",
                "numeric-rounding",
                "date-truncation",
                "drop",
            ]
        )
    )
    if kind == "drop":
        return "drop"
    t: dict[str, Any] = {"type": kind}
    if kind in ("tokenizer", "reversible-tokenizer", "token-reverser"):
        t["key"] = draw(keys) if kind == "tokenizer" else draw(siv_keys)
        if kind == "tokenizer" and draw(st.booleans()):
            t["max_token_len"] = draw(mostly(st.integers(1, 64), ints))
    elif kind == "numeric-perturbation":
        lo, hi = draw(nums), draw(nums)
        t.update(min=lo, max=hi)
        if draw(mostly(st.just(True), st.just(False))):
            t.update(min=min(lo, hi), max=max(lo, hi) + 1)
        t.update(draw(st.sampled_from([{"seed": 1}, {"key": {"secret": "k32"}}, {}])))
        if draw(st.booleans()):
            t["dtype"] = draw(dtypes)
    elif kind == "date-perturbation":
        lo, hi = sorted([draw(ints), draw(ints)])
        t.update(frequency=draw(perturb_units), min=lo, max=hi + 1, seed=3)
    elif kind == "numeric-rounding":
        t["precision"] = draw(ints)
        if draw(st.booleans()):
            t["dtype"] = draw(dtypes)
    elif kind == "date-truncation":
        t["frequency"] = draw(frequencies)
    if draw(st.integers(0, 19)) == 0:
        t[draw(st.sampled_from(["min", "precision", "key", "extra"]))] = draw(anything)
    return {"transform": t}


def drop_last(actions: list[Any]) -> list[Any]:
    """Keep a ``drop`` only as a rule's last action (one before others is a PolicyError)."""
    kept = [a for a in actions if a != "drop"]
    return [*kept, "drop"] if len(kept) < len(actions) else kept


@st.composite
def policies(draw: st.DrawFn) -> dict[str, Any]:
    rules: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.integers(0, 3)) == 0:
            cond = draw(conditions())
            rules.append({"actions": [{"transform": {"type": "row-redact", "condition": cond}}]})
        else:
            rules.append(
                {
                    "match": {"name": draw(columns)},
                    "actions": draw(st.lists(transforms(), min_size=1, max_size=2).map(drop_last)),
                    "on_missing_column": "skip",
                }
            )
    return {"label": "prop", "rules": rules}


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(policies(), table_strategy())
def test_a_policy_that_validates_applies_without_an_internal_error(doc, table):
    try:
        policy = cape.load_policy(doc)
    except cape.PolicyError:
        return
    try:
        out = cape.apply_policy(policy, table, keys=KEYS)
    except CapeError as exc:
        assert str(exc)  # a documented refusal names its problem
        return
    assert out.num_rows <= table.num_rows


# ---------------------------------------------------------------- what the property found


def test_an_action_after_the_rule_dropped_its_column_is_a_policy_error() -> None:
    doc = {
        "label": "t",
        "rules": [
            {
                "match": {"name": "a"},
                "actions": ["drop", {"transform": {"type": "numeric-rounding", "precision": 1}}],
            }
        ],
    }
    with pytest.raises(cape.PolicyError) as info:
        cape.load_policy(doc)
    assert info.value.problems == [
        ("rules[0].actions[1]", "actions[0] already removed the rule's columns")
    ]


def test_an_action_on_a_column_an_explicit_redact_removed_is_a_plan_error() -> None:
    doc = {
        "label": "t",
        "rules": [
            {
                "match": {"name": "a"},
                "actions": [
                    {"transform": {"type": "column-redact", "columns": ["a"]}},
                    {"transform": {"type": "numeric-rounding", "precision": 1}},
                ],
            }
        ],
    }
    with pytest.raises(cape.PlanError, match=r"actions\[1\].*column 'a' was removed by an earlier"):
        cape.apply_policy(doc, pa.table({"a": [1.25]}))


@pytest.mark.parametrize(
    ("condition", "kept"),
    [
        ("x < -1e400", [0, 1, 2]),  # beyond float64: -inf, so no row is below it
        ("x < 1" + "0" * 400, []),  # every finite value is below 10**400
        ("i < 1" + "0" * 400, []),  # an integer literal beyond int64 against an int column
        ("x in (1e400, 2)", [0, 2]),
    ],
)
def test_literals_beyond_float64_compare_as_infinities(condition: str, kept: list[int]) -> None:
    doc = {
        "label": "t",
        "rules": [{"actions": [{"transform": {"type": "row-redact", "condition": condition}}]}],
    }
    table = pa.table({"x": [1.0, 2.0, -3.0], "i": [0, 1, 2]})
    assert cape.apply_policy(doc, table).column("i").to_pylist() == kept
