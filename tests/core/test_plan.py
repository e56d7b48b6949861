"""build_plan: which rule hits which column, type checks, conditions, keys, output schema."""

from __future__ import annotations

import pickle

import _core_test_transforms  # noqa: F401  (registers test-suffix, plusN, test-keyed)
import pyarrow as pa
import pytest

from cape_pipelines import PlanError, build_plan
from cape_pipelines.core import apply_batch
from cape_pipelines.errors import KeyMissingError
from cape_pipelines.plan import ColumnStep, DropStep, FilterStep

SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("email", pa.string()),
        ("age", pa.int64()),
        ("ssn", pa.string()),
        ("country", pa.string()),
    ]
)
KEY = bytes(range(32))


def policy(*rules: dict, **top: object) -> dict:
    return {"label": "t", "rules": list(rules), **top}


def col(name: str, transform: dict, **extra: object) -> dict:
    return {"match": {"name": name}, "actions": [{"transform": transform}], **extra}


def rows(condition: str) -> dict:
    return {"actions": [{"transform": {"type": "row-redact", "condition": condition}}]}


def test_steps_and_output_schema() -> None:
    plan = build_plan(
        policy(
            col("email", {"type": "test-keyed", "key": {"secret": "k"}}),
            {"match": {"name": "ssn"}, "actions": ["drop"]},
            rows("age < 18"),
            col("name", {"type": "test-suffix"}),
        ),
        SCHEMA,
        keys={"k": KEY},
    )
    assert [type(s) for s in plan.steps] == [ColumnStep, DropStep, FilterStep, ColumnStep]
    assert plan.output_schema.names == ["name", "email", "age", "country"]
    assert plan.dropped == ["ssn"]
    assert plan.untouched == ["age", "country"]
    assert plan.used_columns == ["name", "email", "age"]
    assert plan.transformed_columns == {"email": "test-keyed", "name": "test-suffix"}
    assert plan.filters_rows
    described = {d["column"]: d["status"] for d in plan.describe()}
    assert described == {
        "name": "transformed",
        "email": "transformed",
        "age": "untouched",
        "ssn": "dropped",
        "country": "untouched",
        None: "row-filter",
    }


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        # a named column that is not in the data
        (
            policy(col("phone", {"type": "test-suffix"})),
            r"rules\[0\]\.match: column\(s\) 'phone' not in the data",
        ),
        # ... named after an earlier rule dropped it
        (
            policy(
                {"match": {"name": "ssn"}, "actions": ["drop"]}, col("ssn", {"type": "test-suffix"})
            ),
            r"rules\[1\]\.match: column\(s\) 'ssn' dropped by an earlier rule",
        ),
        # a transformation refusing the column's type
        (
            policy(col("age", {"type": "test-suffix"})),
            r"rules\[0\]\.actions\[0\]\.transform: column 'age': "
            r"test-suffix needs a string column, but the column is int64",
        ),
        # a condition on an unknown column
        (
            policy(rows("agee < 18")),
            r"rules\[0\]\.actions\[0\]\.transform: condition 'agee < 18': "
            r"unknown column 'agee' \(columns: 'name', 'email', 'age'",
        ),
        # a condition with a type mismatch
        (
            policy(rows("age == 'x'")),
            r"column 'age' is int64, which cannot be compared with a string literal",
        ),
        # a condition on a column an earlier rule dropped
        (
            policy({"match": {"name": "ssn"}, "actions": ["drop"]}, rows("ssn is null")),
            r"rules\[1\]\.actions\[0\]\.transform: condition 'ssn is null': unknown column 'ssn'",
        ),
        # a condition typed against the column as transformed by an earlier rule
        (
            policy(col("age", {"type": "plusN", "n": 1}), rows("age == 'x'")),
            r"column 'age' is int64",
        ),
        # explicit column-redact columns missing
        (
            policy({"actions": [{"transform": {"type": "column-redact", "columns": ["nope"]}}]}),
            r"column-redact: column\(s\) 'nope' not in the data",
        ),
        # unmatched_columns: error
        (
            policy(col("email", {"type": "test-suffix"}), unmatched_columns="error"),
            r"unmatched_columns: error, and no rule covers column\(s\) "
            r"'name', 'age', 'ssn', 'country'",
        ),
        # dropping everything
        (
            policy({"match": {"regex": ".*"}, "actions": ["drop"]}),
            r"the policy drops every column",
        ),
    ],
)
def test_plan_errors(doc: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        build_plan(doc, SCHEMA)


def test_missing_column_skip_at_policy_and_rule_level() -> None:
    rule = col("phone", {"type": "test-suffix"})
    assert build_plan(policy(rule, on_missing_column="skip"), SCHEMA).steps == []
    assert build_plan(policy({**rule, "on_missing_column": "skip"}), SCHEMA).steps == []
    # rule level overrides policy level, both ways
    with pytest.raises(PlanError, match="'phone' not in the data"):
        build_plan(policy({**rule, "on_missing_column": "error"}, on_missing_column="skip"), SCHEMA)


def test_names_match_partly_missing_with_skip_transforms_the_present_ones() -> None:
    doc = policy(
        {
            "match": {"names": ["email", "phone"]},
            "on_missing_column": "skip",
            "actions": [{"transform": {"type": "test-suffix"}}],
        }
    )
    plan = build_plan(doc, SCHEMA)
    assert [s.column for s in plan.steps] == ["email"]  # type: ignore[union-attr]


def test_regex_and_tag_match() -> None:
    plan = build_plan(
        policy({"match": {"regex": "e.*"}, "actions": [{"transform": {"type": "test-suffix"}}]}),
        SCHEMA,
    )
    assert [s.column for s in plan.steps] == ["email"]  # type: ignore[union-attr]  (full match)
    plan = build_plan(
        policy({"match": {"tag": "pii.email"}, "actions": ["drop"]}),
        SCHEMA,
        column_tags={"email": ["pii.email"], "name": ["pii.name"]},
    )
    assert plan.dropped == ["email"]


def test_unmatched_drop_keeps_only_covered_columns() -> None:
    plan = build_plan(
        policy(col("email", {"type": "test-suffix"}), rows("age < 18"), unmatched_columns="drop"),
        SCHEMA,
    )
    assert plan.output_schema.names == ["email"]
    assert isinstance(plan.steps[-1], DropStep)


def test_condition_on_a_column_dropped_later() -> None:
    plan = build_plan(
        policy(rows("age < 18"), {"match": {"name": "age"}, "actions": ["drop"]}), SCHEMA
    )
    batch = pa.RecordBatch.from_pylist(
        [
            {"name": "a", "email": "e", "age": 10, "ssn": "s", "country": "FR"},
            {"name": "b", "email": "f", "age": 30, "ssn": "t", "country": "FR"},
        ],
        schema=SCHEMA,
    )
    out, counters, _ = apply_batch(plan, batch)
    assert out.column_names == ["name", "email", "ssn", "country"]
    assert out.column("name").to_pylist() == ["b"]
    assert counters.rows_redacted == 1


def test_missing_key_names_key_and_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAPE_KEY_EMAIL_KEY", raising=False)
    doc = policy(col("email", {"type": "test-keyed", "key": {"secret": "email-key"}}))
    with pytest.raises(
        KeyMissingError,
        match=r"rules\[0\]\.actions\[0\]\.transform: "
        r"key 'email-key' not found \(tried: keys=, CAPE_KEY_EMAIL_KEY\)",
    ):
        build_plan(doc, SCHEMA, keys={})


def test_key_not_needed_when_rule_matches_nothing() -> None:
    doc = policy(
        col("phone", {"type": "test-keyed", "key": {"secret": "absent"}}, on_missing_column="skip")
    )
    assert build_plan(doc, SCHEMA).steps == []


def test_duplicate_input_columns() -> None:
    schema = pa.schema([("a", pa.int64()), ("a", pa.int64())])
    with pytest.raises(PlanError, match="duplicate column names: a"):
        build_plan(policy(col("a", {"type": "plusN", "n": 1})), schema)


def test_plan_pickles_and_hides_keys() -> None:
    plan = build_plan(
        policy(col("email", {"type": "test-keyed", "key": {"secret": "k"}}), rows("age < 18")),
        SCHEMA,
        keys={"k": KEY},
    )
    text = repr(plan) + str(plan) + repr(plan.keys) + repr(plan.steps)
    assert KEY.hex() not in text and repr(KEY) not in text and "KeyStore: 1 key(s) hidden" in text
    again = pickle.loads(pickle.dumps(plan))
    batch = pa.RecordBatch.from_pylist(
        [{"name": "a", "email": "x@y", "age": 40, "ssn": "s", "country": "FR"}], schema=SCHEMA
    )
    assert apply_batch(again, batch)[0].equals(apply_batch(plan, batch)[0])
