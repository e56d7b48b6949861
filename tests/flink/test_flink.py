"""PyFlink adapter on Flink's embedded mini-cluster: the parity cases, audit counts, SQL functions.

Runs only where ``apache-flink`` is installed: its own virtualenv (``.ci/run``
builds it; see docs/engines/flink.md), since apache-flink pins its own
apache-beam, pandas and pyarrow. One batch TableEnvironment (parallelism 2,
session zone UTC) serves the module; each case is one Flink job. Flink keeps
no zone name per column (a ``TIMESTAMP_LTZ`` is an instant shown in the
session's zone), so a zoned result is compared after casting it to the
expectation's zone name, as Spark's runner does. A case whose input Flink
cannot hold is skipped with the precise reason shown (docs/engines/flink.md).
"""

from __future__ import annotations

import hashlib
import hmac
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pyflink")

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engines"))
from cases import Case
from test_parity import CASE_PARAMS, expectation

from cape_pipelines.audit import MemorySink
from cape_pipelines.flink import apply_policy, collect, register_functions
from cape_pipelines.flink.apply import _sub_milli_before_1970, row_type

pytestmark = pytest.mark.flink


@pytest.fixture(scope="module")
def t_env() -> Iterator[Any]:
    from pyflink.table import EnvironmentSettings, TableEnvironment

    env = TableEnvironment.create(EnvironmentSettings.in_batch_mode())
    env.get_config().set("parallelism.default", "2")
    env.get_config().set("table.local-time-zone", "UTC")
    # Small bundles: even the small cases span several Python batches.
    env.get_config().set("python.fn-execution.arrow.batch.size", "3")
    env.get_config().set("python.fn-execution.bundle.size", "3")
    yield env


def unreadable_by_flink(table: pa.Table) -> str | None:
    """Why Flink 2.3 cannot hold ``table``'s values, if it cannot."""
    for name, column in zip(table.column_names, table.columns, strict=True):
        if pa.types.is_timestamp(column.type):
            bad = _sub_milli_before_1970(column.combine_chunks())
            if bad is not None:
                return (
                    f"column {name!r} holds {bad} {column.type.unit} since 1970: Flink 2.3's "
                    "Arrow reader (ArrowTimestampColumnVector) splits such a value with "
                    "truncating division and fails on a negative sub-millisecond part, so "
                    "no Flink table can be built from it (from_pandas) nor returned by a UDF"
                )
    return None


def zone_names_as(actual: pa.Table, expected: pa.Schema) -> pa.Table:
    """Zoned timestamps cast to the expectation's zone name (same instants, same unit)."""
    columns = []
    for field, column in zip(actual.schema, actual.columns, strict=True):
        want = expected.field(field.name).type if field.name in expected.names else None
        if (
            want is not None
            and pa.types.is_timestamp(want)
            and pa.types.is_timestamp(column.type)
            and want.tz is not None
            and column.type.tz is not None
            and want.unit == column.type.unit
        ):
            column = column.cast(want)
        columns.append(column)
    return pa.table(columns, names=actual.column_names)


def to_flink_table(t_env: Any, table: pa.Table) -> Any:
    reason = unreadable_by_flink(table)
    if reason is not None:
        pytest.skip(f"not on Flink: {reason}")
    schema = row_type(table.schema)
    if table.num_rows == 0:
        # from_pandas cannot split an empty frame into slices.
        return t_env.from_elements([], schema)
    # Plain numpy/object columns: PyFlink's from_pandas takes no pandas extension dtypes.
    return t_env.from_pandas(table.to_pandas(), schema)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_parity_on_the_mini_cluster(t_env: Any, case: Case) -> None:
    expected = expectation(case.name)
    source = to_flink_table(t_env, case.input)
    sink = MemorySink()
    out = apply_policy(source, case.policy, keys=case.keys, audit=sink)
    actual = zone_names_as(collect(out), expected.schema)
    assert actual.schema.remove_metadata() == expected.schema.remove_metadata()
    # Flink does not promise the row order of a parallel job: compare as multisets.
    key = lambda r: repr(sorted(r.items()))  # noqa: E731
    assert sorted(actual.to_pylist(), key=key) == sorted(expected.to_pylist(), key=key)
    done = sink.records[-1]
    assert done["event"] == "run.completed" and done["engine"] == "flink"
    assert (done["rows_in"], done["rows_out"]) == (case.input.num_rows, actual.num_rows)


def test_audited_counts_with_removed_rows(t_env: Any) -> None:
    n = 1000
    table = pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            "name": [f"p{i}" if i % 5 else None for i in range(n)],
        }
    )
    key = b"cape-flink-test-tokenizer-key-01"
    policy = {
        "label": "flink",
        "rules": [
            {
                "match": {"name": "name"},
                "actions": [{"transform": {"type": "tokenizer", "key": {"secret": "k"}}}],
            },
            {"actions": [{"transform": {"type": "row-redact", "condition": "id < 100"}}]},
        ],
    }
    sink = MemorySink()
    out = collect(apply_policy(to_flink_table(t_env, table), policy, keys={"k": key}, audit=sink))
    assert out.num_rows == n - 100
    assert sorted(out.column("id").to_pylist()) == list(range(100, n))
    row = next(r for r in out.to_pylist() if r["name"] is not None)
    assert row["name"] == hmac.new(key, f"p{row['id']}".encode(), hashlib.sha256).hexdigest()
    done = sink.records[-1]
    assert (done["rows_in"], done["rows_out"], done["rows_redacted"]) == (n, n - 100, 100)
    nulls = sum(1 for i in range(100, n) if i % 5 == 0)
    assert done["columns"]["name"] == {
        "transform": "tokenizer",
        "values": n - 100 - nulls,
        "nulls": nulls,
    }


def test_sql_function_matches_the_policy(t_env: Any) -> None:
    key = b"cape-flink-test-tokenizer-key-01"
    register_functions(t_env, {"k": key})
    words = ["alice", "Zoë", "", "李雷"]
    src = to_flink_table(t_env, pa.table({"w": words}))
    t_env.create_temporary_view("words", src)
    got = t_env.sql_query("SELECT w, cape_tokenize(w, 'k') AS t FROM words").to_pandas()
    for w, t in zip(got["w"], got["t"], strict=True):
        assert t == hmac.new(key, w.encode(), hashlib.sha256).hexdigest()


def test_a_bad_column_fails_before_any_job(t_env: Any) -> None:
    src = to_flink_table(t_env, pa.table({"a": [1, 2]}))
    policy = {"label": "x", "rules": [{"match": {"name": "nope"}, "actions": ["drop"]}]}
    strict = {**policy}
    with pytest.raises(Exception, match="nope"):
        apply_policy(src, strict, audit=MemorySink())
