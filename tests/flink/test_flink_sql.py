"""Flink SQL functions: every function the registry declares, each equal to the policy path.

The cases are Spark's (tests/engines/test_spark.py ``UDF_CASES`` and
tests/engines/test_spark_sql_families.py ``CASES``): the same SQL, the same
policy transformation, the same expectation (the pyarrow policy path on the
same column). One query runs every case at once (one Flink job per table), so
the module stays at two jobs plus the round trips.

Differences that are Flink's, not cape's (docs/engines/flink.md): a nullable
integer column reaches a pandas UDF as float64, so ``cape_tokenize(age, ...)``
is written ``cape_tokenize(CAST(age AS STRING), ...)`` (the tokenizer gives an
integer and its decimal text the same token), and the bucket cases use an
integer column without nulls.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
from typing import Any

import pytest

pytest.importorskip("pyflink")

import pyarrow as pa

from cape_pipelines import apply_policy as apply_arrow
from cape_pipelines.audit import MemorySink
from cape_pipelines.flink import register_functions
from cape_pipelines.flink.apply import row_type
from cape_pipelines.flink.sql import functions, specs
from cape_pipelines.keys import KeyShippingError

pytestmark = pytest.mark.flink

KEYS = {"k": b"k" * 32, "f": bytes(range(16))}

PEOPLE = pa.table(
    {
        "ssn": ["1", "2", "3", "4", "5", "6"],
        "name": ["ann", "bob", None, "dee", "éva", ""],
        "age": pa.array([34, 12, 50, None, 18, 70], pa.int32()),
        "n": pa.array([34, 12, 50, -3, 18, 70], pa.int32()),
        "salary": pa.array([1234.5, 99.25, None, 15.0, 2.5, -3.5]),
        "born": pa.array(
            [
                dt.date(1990, 5, 17),
                None,
                dt.date(1970, 1, 1),
                dt.date(2001, 12, 31),
                dt.date(2006, 6, 6),
                dt.date(1955, 2, 28),
            ]
        ),
        "seen": pa.array(
            [dt.datetime(2024, 3, 1, 13, 45, 6, 789000)] * 5 + [None], pa.timestamp("us", tz="UTC")
        ),
        "card": pa.array(
            [
                "4111111111111111",
                None,
                "5500000000000004",
                "4012888888881881",
                "6011000990139424",
                "4242424",
            ]
        ),
        "note": pa.array(["mail a@b.co", None, "ssn 123-45-6789", "none", "", "x"]),
    }
)


def tok(**extra: Any) -> dict[str, Any]:
    return {"type": "tokenizer", "key": {"secret": "k"}, **extra}


# (SQL expression, policy transformation on that column, column)
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("cape_tokenize(name, 'k')", tok(), "name"),
    ("cape_tokenize(name, 'k', 8)", tok(max_token_len=8), "name"),
    (
        "cape_tokenize(name, 'k', 12, 'cape-sha256')",
        tok(max_token_len=12, algorithm="cape-sha256"),
        "name",
    ),
    ("cape_tokenize(CAST(age AS STRING), 'k')", tok(), "age"),
    (
        "cape_tokenize_reversible(name, 'k')",
        {"type": "reversible-tokenizer", "key": {"secret": "k"}},
        "name",
    ),
    ("cape_round(salary, 1)", {"type": "numeric-rounding", "precision": 1}, "salary"),
    ("cape_round_long(age, -1)", {"type": "numeric-rounding", "precision": -1}, "age"),
    (
        "cape_truncate_date(born, 'month')",
        {"type": "date-truncation", "frequency": "month"},
        "born",
    ),
    (
        "cape_truncate_timestamp(seen, 'HOUR')",
        {"type": "date-truncation", "frequency": "hour"},
        "seen",
    ),
    (
        "cape_perturb_number(salary, 'k', -5, 5, 'salary')",
        {"type": "numeric-perturbation", "min": -5, "max": 5, "key": {"secret": "k"}},
        "salary",
    ),
    (
        "cape_perturb_number(salary, 'k', -2.5, 2.5, 'salary')",
        {"type": "numeric-perturbation", "min": -2.5, "max": 2.5, "key": {"secret": "k"}},
        "salary",
    ),
    (
        "cape_perturb_number_long(age, 'k', -3, 3, 'age')",
        {"type": "numeric-perturbation", "min": -3, "max": 3, "key": {"secret": "k"}},
        "age",
    ),
    (
        "cape_perturb_date(born, 'k', 'DAY', -10, 10, 'born')",
        {
            "type": "date-perturbation",
            "frequency": "DAY",
            "min": -10,
            "max": 10,
            "key": {"secret": "k"},
        },
        "born",
    ),
    (
        "cape_perturb_timestamp(seen, 'k', 'HOUR', -5, 5, 'seen')",
        {
            "type": "date-perturbation",
            "frequency": "HOUR",
            "min": -5,
            "max": 5,
            "key": {"secret": "k"},
        },
        "seen",
    ),
    # tests/engines/test_spark_sql_families.py
    ("cape_fpe(card, 'f')", {"type": "fpe", "key": {"secret": "f"}}, "card"),
    (
        "cape_fpe(card, 'f', 10, 'tw')",
        {"type": "fpe", "key": {"secret": "f"}, "tweak": "tw"},
        "card",
    ),
    ("cape_mask(card, 0, 4)", {"type": "mask", "keep_last": 4}, "card"),
    (
        "cape_mask(card, 6, 4, '#')",
        {"type": "mask", "keep_first": 6, "keep_last": 4, "char": "#"},
        "card",
    ),
    ("cape_bucket(n, 10)", {"type": "bucket", "width": 10}, "n"),
    ("cape_bucket(n, 10, 5)", {"type": "bucket", "width": 10, "origin": 5}, "n"),
    ("cape_bucket_date(born, 'quarter')", {"type": "bucket", "unit": "quarter"}, "born"),
    (
        "cape_generalize_prefix(card, 6, '*')",
        {"type": "generalize", "prefix": 6, "fill": "*"},
        "card",
    ),
    ("cape_scrub_text(note)", {"type": "text-scrub"}, "note"),
    ("cape_scrub_text(note, 'mask')", {"type": "text-scrub", "replace": "mask"}, "note"),
]

# Functions checked by a round trip instead of a policy path of their own.
ROUND_TRIPS = {"cape_reveal", "cape_fpe_reveal"}


@pytest.fixture(scope="module")
def sql_env() -> Any:
    from pyflink.table import EnvironmentSettings, TableEnvironment

    env = TableEnvironment.create(EnvironmentSettings.in_batch_mode())
    env.get_config().set("parallelism.default", "2")
    env.get_config().set("table.local-time-zone", "UTC")
    env.get_config().set("python.fn-execution.arrow.batch.size", "4")
    env.create_temporary_view(
        "people", env.from_pandas(PEOPLE.to_pandas(), row_type(PEOPLE.schema))
    )
    env._cape_names = register_functions(env, KEYS)  # type: ignore[attr-defined]
    return env


@pytest.fixture(scope="module")
def results(sql_env: Any) -> dict[str, list[Any]]:
    """Every case in one query (one job), by ssn order."""
    exprs = ", ".join(f"{sql} AS v{i}" for i, (sql, _, _) in enumerate(CASES))
    table = sql_env.sql_query(f"SELECT ssn, {exprs} FROM people")
    from cape_pipelines.flink.apply import schema_to_arrow

    schema = schema_to_arrow(table)
    got = pa.Table.from_pandas(table.to_pandas(), schema=schema, preserve_index=False)
    order = sorted(range(got.num_rows), key=lambda i: int(got.column("ssn")[i].as_py()))
    got = got.take(order)
    return {name: got.column(name).to_pylist() for name in got.column_names}


def test_every_declared_function_is_registered_and_tested(sql_env: Any) -> None:
    declared = set(specs())
    assert set(sql_env._cape_names) == declared
    called = {sql.split("(", 1)[0] for sql, _, _ in CASES} | ROUND_TRIPS
    assert called == declared, declared ^ called


@pytest.mark.parametrize(("index", "case"), list(enumerate(CASES)), ids=[c[0] for c in CASES])
def test_function_equals_policy_path(
    results: dict[str, list[Any]], index: int, case: tuple[str, dict[str, Any], str]
) -> None:
    _, transform, column = case
    policy = {
        "label": "flink-sql",
        "rules": [{"match": {"name": column}, "actions": [{"transform": transform}]}],
    }
    want = apply_arrow(policy, PEOPLE, keys=KEYS, audit=MemorySink()).column(column)
    got = results[f"v{index}"]
    if pa.types.is_timestamp(want.type):
        want = want.cast(pa.timestamp("us", tz="UTC"))
    elif pa.types.is_integer(want.type):
        want = want.cast(pa.int64())
    assert got == want.to_pylist()


def test_reveal_functions_round_trip(sql_env: Any) -> None:
    table = sql_env.sql_query(
        "SELECT name, cape_reveal(cape_tokenize_reversible(name, 'k'), 'k') AS back, "
        "card, cape_fpe_reveal(cape_fpe(card, 'f', 10, 't'), 'f', 10, 't') AS card_back "
        "FROM people"
    ).to_pandas()
    assert table["back"].tolist() == table["name"].tolist()
    assert table["card_back"].tolist() == table["card"].tolist()


def test_unknown_key_names_the_key(sql_env: Any) -> None:
    with pytest.raises(Exception, match="no-such-key"):
        sql_env.sql_query("SELECT cape_tokenize(name, 'no-such-key') FROM people").to_pandas()


def payload(fn: Any) -> bytes:
    """The bytes PyFlink hands the JVM for a UDF: what Flink ships to its Python workers."""
    return bytes(fn._java_user_defined_function().getSerializedPythonFunction())


def test_the_shipped_functions_hold_no_key_bytes(sql_env: Any) -> None:
    key = os.urandom(32)
    forms = [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key)]
    made = functions(sql_env, {"k": key})
    assert set(made) == set(specs())
    for name, fn in made.items():
        shipped = payload(fn)
        assert not [f for f in forms if f in shipped], name
    # The explicit opt-in ships the bytes: the check above can fail.
    assert key in payload(functions(sql_env, {"k": key}, worker_keys="inline")["cape_tokenize"])


def test_keys_given_as_bytes_are_refused_for_remote_workers() -> None:
    from pyflink.table import EnvironmentSettings, TableEnvironment

    env = TableEnvironment.create(EnvironmentSettings.in_batch_mode())
    env.get_config().set("execution.target", "remote")
    with pytest.raises(KeyShippingError, match="not on this host"):
        functions(env, {"k": b"k" * 32})
