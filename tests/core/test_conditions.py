"""The row-condition language: parsing, positioned errors, typing against a schema, semantics."""

from __future__ import annotations

import datetime as dt
import pickle
from decimal import Decimal

import pyarrow as pa
import pytest

from cape_pipelines.conditions import (
    Compare,
    ConditionSyntaxError,
    InList,
    IsNull,
    Literal,
    Not,
    parse_condition,
)
from cape_pipelines.errors import PlanError

UTC = dt.UTC

TABLE = pa.table(
    {
        "age": pa.array([10, 18, 40, None, 70], pa.int32()),
        "score": pa.array([0.5, 1.5, None, 2.5, float("nan")], pa.float64()),
        "country": pa.array(["XX", "FR", "YY", "FR", None], pa.string()),
        "big": pa.array(["a", "b", "c", None, "O'Brien"], pa.large_string()),
        "cat": pa.array(["x", "y", None, "x", "y"]).dictionary_encode(),
        "flag": pa.array([True, False, None, True, False]),
        "born": pa.array(
            [
                dt.date(1960, 1, 1),
                dt.date(2020, 1, 31),
                dt.date(2020, 2, 1),
                None,
                dt.date(1900, 5, 5),
            ]
        ),
        "seen": pa.array(
            [
                dt.datetime(2020, 1, 31, 9, tzinfo=UTC),
                dt.datetime(2020, 1, 31, 11, tzinfo=UTC),
                None,
                dt.datetime(2020, 1, 30, 23, tzinfo=UTC),
                dt.datetime(2021, 1, 1, tzinfo=UTC),
            ],
            pa.timestamp("us", tz="Europe/Paris"),
        ),
        "naive": pa.array(
            [
                dt.datetime(2020, 1, 31, 9),
                None,
                dt.datetime(2020, 1, 31),
                dt.datetime(2019, 1, 1),
                None,
            ],
            pa.timestamp("s"),
        ),
        "price": pa.array(
            [Decimal("1.50"), Decimal("2.25"), None, Decimal("10.00"), Decimal("0.01")],
            pa.decimal128(6, 2),
        ),
        "tiny": pa.array([1, -1, 127, None, 0], pa.int8()),
        "weird col": pa.array([1, 2, 3, 4, 5]),
        "nothing": pa.nulls(5),
    }
)
ROW = pa.array(range(TABLE.num_rows))


def true_rows(text: str) -> list[int]:
    """Indices of the rows where the condition is true."""
    expr = parse_condition(text).to_expression(TABLE.schema)
    return TABLE.append_column("_row", ROW).filter(expr)["_row"].to_pylist()


def null_rows(text: str) -> list[int]:
    """Indices of the rows where the condition is null."""
    expr = parse_condition(text).to_expression(TABLE.schema)
    return TABLE.append_column("_row", ROW).filter(expr.is_null())["_row"].to_pylist()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("age < 18", [0]),
        ("18 > age", [0]),  # literal on the left is flipped
        ("age >= 18", [1, 2, 4]),
        ("age = 40", [2]),  # '=' accepted as '=='
        ("age <> 40", [0, 1, 4]),  # '<>' accepted as '!='
        ("age != 40", [0, 1, 4]),
        ("score > 1", [1, 3]),  # int literal against a float column; NaN is unknown (null)
        ("age > 17.5", [1, 2, 4]),  # non-integral literal against an int column
        ("age == 18.0", [1]),  # integral decimal literal against an int column
        ("tiny < 1000", [0, 1, 2, 4]),  # literal out of int8 range
        ("tiny in (127, 100000)", [2]),
        ("age > -1", [0, 1, 2, 4]),
        ("age > -1e1", [0, 1, 2, 4]),
        ("country == 'FR'", [1, 3]),
        ('country == "FR"', [1, 3]),  # double quotes, as in pandas query
        ("big == 'O''Brien'", [4]),  # SQL escape of a quote
        ("big >= 'b'", [1, 2]),  # byte order: 'O' < 'b'
        ("cat == 'x'", [0, 3]),  # dictionary column
        ("cat in ('y')", [1, 4]),
        ("flag == true", [0, 3]),
        ("flag == FALSE", [1, 4]),  # keywords are case-insensitive
        ("born < date'1970-01-01'", [0, 4]),  # dates before 1970
        ("born >= date '2020-01-31'", [1, 2]),
        ("seen >= date'2020-01-31'", [0, 1, 4]),  # date vs timestamp: midnight UTC
        ("seen < timestamp'2020-01-31T10:00:00'", [0, 3]),  # no offset: UTC
        ("seen < timestamp'2020-01-31T11:30:00+01:00'", [0, 3]),  # offset converted
        ("naive >= timestamp'2020-01-31T00:00:00'", [0, 2]),
        ("naive < date'2020-01-01'", [3]),
        ("price > 2", [1, 3]),
        ("price >= 2.25", [1, 3]),
        ("price > 2.255", [3]),  # more digits than the column's scale
        ("`weird col` in (2, 4,)", [1, 3]),  # trailing comma allowed
        ("age is null", [3]),
        ("age IS NOT NULL", [0, 1, 2, 4]),
        ("country not in ('FR', 'XX')", [2]),
        ("age < 18 or country in ('XX', 'YY')", [0, 2]),
        ("age < 18 and country == 'XX'", [0]),
        ("not (age < 18)", [1, 2, 4]),
        ("(age > 10) & (age < 50) | age is null", [1, 2, 3]),  # pandas operators
        ("~(age > 10)", [0]),
        ("nothing > 3", []),
        ("nothing is null", [0, 1, 2, 3, 4]),
    ],
)
def test_true_rows(text: str, expected: list[int]) -> None:
    assert true_rows(text) == expected


@pytest.mark.parametrize(
    ("text", "expected_null"),
    [
        ("age < 18", [3]),  # null operand -> null
        ("age in (10, 18)", [3]),  # SQL semantics, not is_in's false
        ("age not in (10, 18)", [3]),
        ("not age < 18", [3]),
        ("age < 18 or country == 'XX'", [3, 4]),  # null or false; false or null
        ("age < 100 or country == 'XX'", [3]),  # true or null is true (row 4)
        ("age > 100 and country == 'XX'", []),  # false and null is false
        ("age < 100 and country == 'FR'", [3, 4]),  # true and null is null
        ("age is null", []),
        ("nothing > 3", [0, 1, 2, 3, 4]),
    ],
)
def test_three_valued_logic(text: str, expected_null: list[int]) -> None:
    assert null_rows(text) == expected_null


@pytest.mark.parametrize(
    ("text", "tree"),
    [
        ("18 > age", Compare("age", "<", Literal("int", 18))),
        ("18 <= age", Compare("age", ">=", Literal("int", 18))),
        ("'x' == c", Compare("c", "==", Literal("string", "x"))),
        ("a IN (1, 2.5)", InList("a", (Literal("int", 1), Literal("decimal", Decimal("2.5"))))),
        ("a not in ('x')", InList("a", (Literal("string", "x"),), negated=True)),
        ("`a``b` is not null", IsNull("a`b", negated=True)),
        ("NOT a is null", Not(IsNull("a"))),
        ("d > date'2020-01-31'", Compare("d", ">", Literal("date", dt.date(2020, 1, 31)))),
        ("date > 1", Compare("date", ">", Literal("int", 1))),  # 'date' is a column name here
        ("a > -0.5", Compare("a", ">", Literal("decimal", Decimal("-0.5")))),
        ("a == 'back\\slash'", Compare("a", "==", Literal("string", "back\\slash"))),
    ],
)
def test_parse_tree(text: str, tree: object) -> None:
    assert parse_condition(text).root == tree


def test_precedence_and_binds_tighter_than_or() -> None:
    assert (
        str(parse_condition("a > 1 or b > 2 and not c > 3")) == "(a > 1 or (b > 2 and (not c > 3)))"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("(age > 1 and b < 3", r"expected '\)', found end of condition at column 19"),
        ("age >", r"expected a literal, found end of condition at column 6"),
        ("age == null", r"null is not a value; write 'column is null'.* at column 8"),
        ("", r"empty condition at column 1"),
        ("   ", r"empty condition at column 1"),
        (
            "age 18",
            r"expected a comparison operator, 'is', 'in' or 'not in', found '18' at column 5",
        ),
        ("age > b", r"comparing two columns is not supported.* at column 7"),
        ("1 > 2", r"a comparison needs one column and one literal.* at column 5"),
        ("age in ()", r"expected a literal, found '\)' at column 9"),
        ("age in (1, 2", r"expected '\)', found end of condition at column 13"),
        ("age not 3", r"expected 'in', found '3' at column 9"),
        ("age is 3", r"expected 'null', found '3' at column 8"),
        ("c = 'open", r"unterminated string at column 5"),
        ("`open > 1", r"unterminated backquoted column name at column 1"),
        ("`` > 1", r"empty column name at column 1"),
        ("age > 1x", r"malformed number '1x' at column 7"),
        ("age ! 3", r"unexpected character '!' at column 5"),
        ("age > 1 2", r"expected 'and', 'or' or end of condition, found '2' at column 9"),
        ("d > date'2020-13-01'", r"invalid date literal '2020-13-01'.* at column 9"),
        ("t > timestamp'yesterday'", r"invalid timestamp literal 'yesterday'"),
        ("age > - 'x'", r"expected a number after '-'"),
        ("and > 1", r"expected a column name, a literal, 'not' or '\(', found 'and' at column 1"),
        ("(" * 150 + "a > 1" + ")" * 150, r"nested deeper than 100"),
    ],
)
def test_syntax_errors_name_the_position(text: str, message: str) -> None:
    with pytest.raises(ConditionSyntaxError, match=message):
        parse_condition(text)


def test_syntax_error_is_a_value_error_with_position() -> None:
    with pytest.raises(ValueError) as info:
        parse_condition("(a > 1")
    assert isinstance(info.value, ConditionSyntaxError)
    assert info.value.position == 7


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("agee > 1", r"unknown column 'agee' \(columns: 'age', 'score', 'country'"),
        (
            "age == 'x'",
            r"column 'age' is int32, which cannot be compared with a string literal 'x'",
        ),
        (
            "country > 3",
            r"column 'country' is string, which cannot be compared with an int literal",
        ),
        ("born > 3", r"column 'born' is date32\[day\], which cannot be compared with an int"),
        ("born > timestamp'2020-01-01T00:00:00'", r"cannot be compared with a timestamp literal"),
        ("flag == 1", r"column 'flag' is bool, which cannot be compared with an int literal"),
        ("age in (1, 'x')", r"cannot be compared with a string literal 'x'"),
        ("seen == 'x'", r"column 'seen' is timestamp\[us, tz=Europe/Paris\]"),
        (
            "naive > timestamp'2020-01-01T00:00:00+01:00'",
            r"no time zone.*must not carry a UTC offset",
        ),
        ("nothing in (1, 'x')", r"mixes literals of different kinds"),
    ],
)
def test_type_errors_are_plan_errors(text: str, message: str) -> None:
    cond = parse_condition(text)
    with pytest.raises(PlanError, match=message):
        cond.to_expression(TABLE.schema)


def test_unsupported_column_type_is_a_plan_error() -> None:
    schema = pa.schema([("xs", pa.list_(pa.int64()))])
    with pytest.raises(PlanError, match=r"column 'xs' is list<item: int64>"):
        parse_condition("xs == 1").to_expression(schema)


def test_columns() -> None:
    cond = parse_condition("a > 1 or (`b c` in ('x') and not d is null)")
    assert cond.columns() == {"a", "b c", "d"}


def test_condition_and_expression_pickle() -> None:
    cond = parse_condition("age < 18 or country in ('XX', 'YY') or seen > date'2020-12-01'")
    again = pickle.loads(pickle.dumps(cond))
    assert again == cond
    expr = again.to_expression(TABLE.schema)
    expr2 = pickle.loads(pickle.dumps(expr))
    numbered = TABLE.append_column("_row", ROW)
    assert numbered.filter(expr2)["_row"].to_pylist() == [0, 2, 4]


def test_str_round_trips() -> None:
    text = "(`a b` >= -1.5 AND c in ('it''s', \"x\")) or not d is null or e < date'2020-01-31'"
    cond = parse_condition(text)
    assert parse_condition(str(cond)).root == cond.root


def test_string_view_column_is_compared_as_large_string() -> None:
    schema = pa.schema([("s", pa.string_view())])
    expr = parse_condition("s == 'a'").to_expression(schema)
    assert "large_string" in str(expr)


# ---------------------------------------------------------------- long conditions


def _row_redact(condition: str) -> dict:
    return {
        "label": "t",
        "rules": [{"actions": [{"transform": {"type": "row-redact", "condition": condition}}]}],
    }


@pytest.mark.parametrize("joiner", [" and ", " or ", " & "])
def test_a_long_flat_condition_validates_plans_pickles_and_applies(joiner: str) -> None:
    import cape_pipelines as cape
    from cape_pipelines.plan import build_plan

    n = 3000
    op = "==" if joiner == " or " else "!="
    text = joiner.join(f"x {op} {i}" for i in range(n))
    table = pa.table({"x": pa.array(range(n + 7), pa.int64())})
    policy = pickle.loads(pickle.dumps(cape.load_policy(_row_redact(text))))
    build_plan(policy, table.schema)
    out = cape.apply_policy(policy, table)
    # and: rows 0..n-1 make one term false (kept); or: those rows make one term true (removed)
    kept = list(range(n)) if op == "!=" else list(range(n, n + 7))
    assert out.column("x").to_pylist() == kept


def test_a_flat_chain_is_one_node() -> None:
    root = parse_condition(" and ".join(f"a > {i}" for i in range(50))).root
    assert len(root.operands) == 50  # type: ignore[attr-defined]
    assert parse_condition(str(parse_condition("a > 1 and b > 2 and c > 3"))).root == (
        parse_condition("a > 1 and b > 2 and c > 3").root
    )


def test_a_condition_beyond_the_limit_is_a_policy_error_at_validate() -> None:
    import cape_pipelines as cape
    from cape_pipelines.conditions import MAX_PREDICATES

    text = " and ".join(f"x != {i}" for i in range(MAX_PREDICATES + 1))
    with pytest.raises(cape.PolicyError) as info:
        cape.load_policy(_row_redact(text))
    [(loc, msg)] = info.value.problems
    assert loc == "rules[0].actions[0].transform.condition"
    assert f"more than {MAX_PREDICATES} comparisons" in msg


# ---------------------------------------------------------------- NaN is unknown


@pytest.mark.parametrize(
    "text",
    [
        "score < 1000",
        "score >= 1000",
        "score == 2.5",
        "score != 2.5",
        "score in (0.5, 1.5)",
        "score not in (0.5, 1.5)",
        "not score < 1000",
    ],
)
def test_nan_compares_as_unknown(text: str) -> None:
    assert 4 in null_rows(text)  # row 4's score is NaN
    assert 4 not in true_rows(text)


@pytest.mark.parametrize("typ", [pa.float64(), pa.float32(), pa.float16()])
@pytest.mark.parametrize("condition", ["x < 1000", "x >= 1000", "not (x >= 1000)"])
def test_row_redact_removes_nan_rows_under_any_range_condition(typ, condition) -> None:
    import numpy as np

    import cape_pipelines as cape

    if typ == pa.float16():
        values = [np.float16(5), None, np.float16("nan")]
    else:
        values = [5.0, None, np.nan]
    table = pa.table({"x": pa.array(values, typ), "i": [0, 1, 2]})
    out = cape.apply_policy(_row_redact(condition), table)
    assert 2 not in out.column("i").to_pylist()  # the NaN row never passes
    assert 1 not in out.column("i").to_pylist()  # nor the null one


_BIG = [2**53 + 1, -(2**63), 2**63 - 1, -3, -2, -1, 0, None]


@pytest.mark.parametrize(
    "text",
    [
        "v < -1.5",
        "v <= -1.5",
        "v > -1.5",
        "v >= -1.5",
        "v == -1.5",
        "v != -1.5",
        "v in (-1.5, 0, 2.5)",
        "v not in (-1.5, 0)",
        "v > 9007199254740992.5",
        "v < 99999999999999999999",
        "v > -99999999999999999999",
        "v == 99999999999999999999",
    ],
)
@pytest.mark.parametrize("typ", [pa.int64(), pa.uint64(), pa.int8()])
def test_integer_columns_compare_exactly_with_any_number(text: str, typ: pa.DataType) -> None:
    """Found by the validate-applies property test: ``i64 < -1.5`` cast the column to
    float64, which Arrow refuses for integers beyond 2**53, so a valid policy failed to
    apply. Integers now compare exactly with any literal, on every integer type."""
    lo, hi = {pa.int64(): (-(2**63), 2**63 - 1), pa.uint64(): (0, 2**64 - 1)}.get(typ, (-128, 127))
    values = [v for v in _BIG if v is None or lo <= v <= hi]
    table = pa.table({"v": pa.array(values, typ)})
    condition = parse_condition(text)
    kept = table.filter(condition.to_expression(table.schema)).column("v")
    cond = condition.root
    expected = [v for v in values if v is not None and _exact(cond, v)]
    assert kept.to_pylist() == expected


def _exact(cond: object, v: int) -> bool:
    """The condition on one integer, in exact rational arithmetic (the oracle)."""
    from fractions import Fraction

    def num(lit: Literal) -> Fraction:
        return Fraction(Decimal(lit.value)) if lit.kind == "decimal" else Fraction(lit.value)

    if isinstance(cond, Compare):
        x = num(cond.literal)
        return {
            "<": v < x,
            "<=": v <= x,
            ">": v > x,
            ">=": v >= x,
            "==": v == x,
            "!=": v != x,
        }[cond.op]
    assert isinstance(cond, InList)
    found = any(v == num(lit) for lit in cond.values)
    return found != cond.negated
