"""Audited runs on Flink beyond ``collect``: ``execute_insert``, DataStreams, timestamps.

``execute_insert`` writes into a registered filesystem table and must emit one
run with exact counts once the job has finished, or ``run.failed`` (and no
committed output) when the job fails. ``apply_to_stream`` is checked on a
bounded DataStream: exact rows out and an audited run with exact counts.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import glob
import hashlib
import hmac
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pyflink")

import pandas as pd
import pyarrow as pa

from cape_pipelines.audit import MemorySink
from cape_pipelines.errors import PlanError, TransformError
from cape_pipelines.flink import apply_policy, apply_to_stream, collect, execute_insert
from cape_pipelines.flink.apply import PolicyMapper, row_type
from cape_pipelines.plan import build_plan

pytestmark = pytest.mark.flink

KEY = b"cape-flink-test-tokenizer-key-01"
POLICY = {
    "label": "flink-runs",
    "rules": [
        {
            "match": {"name": "name"},
            "actions": [{"transform": {"type": "tokenizer", "key": {"secret": "k"}}}],
        },
        {"actions": [{"transform": {"type": "row-redact", "condition": "id < 10"}}]},
    ],
}
N = 60
DAYS = {
    "label": "days",
    "rules": [
        {
            "match": {"name": "at"},
            "actions": [{"transform": {"type": "date-truncation", "frequency": "day"}}],
        }
    ],
}


def token(value: str) -> str:
    return hmac.new(KEY, value.encode(), hashlib.sha256).hexdigest()


def people() -> pa.Table:
    return pa.table(
        {
            "id": pa.array(range(N), pa.int64()),
            "name": [f"p{i}" if i % 4 else None for i in range(N)],
        }
    )


@pytest.fixture(scope="module")
def t_env() -> Any:
    from pyflink.table import EnvironmentSettings, TableEnvironment

    env = TableEnvironment.create(EnvironmentSettings.in_batch_mode())
    env.get_config().set("parallelism.default", "2")
    env.get_config().set("table.local-time-zone", "UTC")
    env.get_config().set("python.fn-execution.arrow.batch.size", "7")
    return env


def sink_table(t_env: Any, name: str, path: Path, columns: str) -> None:
    t_env.execute_sql(
        f"CREATE TEMPORARY TABLE {name} ({columns}) WITH ("
        f"'connector' = 'filesystem', 'path' = '{path.as_uri()}', 'format' = 'csv')"
    )


def read_csv_dir(path: Path) -> list[list[str]]:
    """Every row of the committed part files (Flink leaves in-progress files hidden)."""
    rows: list[list[str]] = []
    for f in sorted(glob.glob(str(path / "**" / "*"), recursive=True)):
        p = Path(f)
        if p.is_file() and not p.name.startswith("."):
            rows += list(csv.reader(io.StringIO(p.read_text())))
    return rows


def test_execute_insert_is_one_audited_run_with_exact_counts(t_env: Any, tmp_path: Path) -> None:
    src = t_env.from_pandas(people().to_pandas(), row_type(people().schema))
    sink = MemorySink()
    out = apply_policy(src, POLICY, keys={"k": KEY}, audit=sink)
    sink_table(t_env, "protected_people", tmp_path / "out", "id BIGINT, name STRING")
    counters = execute_insert(out, "protected_people")
    rows = read_csv_dir(tmp_path / "out")
    assert sorted(int(r[0]) for r in rows) == list(range(10, N))
    for r in rows:
        i = int(r[0])
        assert r[1] == (token(f"p{i}") if i % 4 else "")
    events = [r["event"] for r in sink.records]
    assert events == ["run.started", "run.completed"]
    done = sink.records[-1]
    nulls = sum(1 for i in range(10, N) if i % 4 == 0)
    assert (done["rows_in"], done["rows_out"], done["rows_redacted"]) == (N, N - 10, 10)
    assert done["columns"]["name"] == {
        "transform": "tokenizer",
        "values": N - 10 - nulls,
        "nulls": nulls,
    }
    assert counters.rows_out == N - 10
    assert sink.records[0]["run_id"] == done["run_id"]


def test_execute_insert_sends_its_lineage_events_from_the_driver(
    t_env: Any, tmp_path: Path
) -> None:
    pytest.importorskip("openlineage.client")
    from cape_pipelines.lineage import Lineage

    events_file = tmp_path / "lineage.jsonl"
    lin = Lineage(
        config={"transport": {"type": "file", "log_file_path": str(events_file), "append": True}},
        inputs=["s3://raw/people"],
        outputs=["s3://clean/people"],
    )
    src = t_env.from_pandas(people().to_pandas(), row_type(people().schema))
    sink = MemorySink()
    out = apply_policy(src, POLICY, keys={"k": KEY}, audit=sink, lineage=lin)
    sink_table(t_env, "lineage_people", tmp_path / "out", "id BIGINT, name STRING")
    execute_insert(out, "lineage_people")
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    run_id = sink.records[-1]["run_id"]
    for e in events:
        assert e["run"]["facets"]["cape"]["runId"] == run_id
        assert e["run"]["facets"]["cape"]["engine"] == "flink"
    (output,) = events[1]["outputs"]
    assert (output["namespace"], output["name"]) == ("s3://clean", "/people")
    assert output["outputFacets"]["outputStatistics"]["rowCount"] == N - 10
    fields = output["facets"]["columnLineage"]["fields"]
    assert fields["name"]["transformationType"] == "MASKED"
    assert fields["id"]["transformationType"] == "IDENTITY"
    assert fields["name"]["inputFields"][0]["name"] == "/people"
    assert "p11" not in events_file.read_text()


def test_execute_insert_failure_is_run_failed_and_commits_nothing(
    t_env: Any, tmp_path: Path
) -> None:
    # 1969-12-31 23:59:59.999999999: Flink 2.3 cannot read it back from Python, so the
    # job fails in the UDF (with cape's message) after the run started.
    src = t_env.sql_query(
        "SELECT * FROM (VALUES (1, CAST('2020-01-01 00:00:00' AS TIMESTAMP(9))), "
        "(2, CAST('1969-12-31 23:59:59.999999999' AS TIMESTAMP(9)))) AS t(id, moment)"
    )
    policy = {"label": "flink-fail", "rules": [{"match": {"name": "id"}, "actions": ["drop"]}]}
    sink = MemorySink()
    out = apply_policy(src, policy, audit=sink)
    sink_table(t_env, "failing_target", tmp_path / "out", "moment TIMESTAMP(9)")
    with pytest.raises(Exception, match="before 1970 with a sub-millisecond part"):
        execute_insert(out, "failing_target")
    assert [r["event"] for r in sink.records] == ["run.started", "run.failed"]
    assert read_csv_dir(tmp_path / "out") == []


def test_execute_insert_refuses_a_streaming_environment(tmp_path: Path) -> None:
    from pyflink.table import EnvironmentSettings, TableEnvironment

    env = TableEnvironment.create(EnvironmentSettings.in_streaming_mode())
    src = env.from_pandas(people().to_pandas(), row_type(people().schema))
    out = apply_policy(src, POLICY, keys={"k": KEY}, audit=MemorySink())
    with pytest.raises(PlanError, match=r"(?i)streaming"):
        execute_insert(out, "anything")


def test_apply_to_stream_on_a_bounded_stream() -> None:
    from pyflink.common import Row, Types
    from pyflink.datastream import RuntimeExecutionMode, StreamExecutionEnvironment
    from pyflink.table import StreamTableEnvironment

    env = StreamExecutionEnvironment.get_execution_environment()
    env.set_parallelism(2)
    env.set_runtime_mode(RuntimeExecutionMode.BATCH)
    t_env = StreamTableEnvironment.create(env)
    t_env.get_config().set("python.fn-execution.arrow.batch.size", "7")
    data = people().to_pylist()
    stream = env.from_collection(
        [Row(r["id"], r["name"]) for r in data],
        type_info=Types.ROW_NAMED(["id", "name"], [Types.LONG(), Types.STRING()]),
    )
    sink = MemorySink()
    out = apply_to_stream(t_env, stream, POLICY, keys={"k": KEY}, audit=sink)
    # The stream itself: exact rows, removed ones filtered inside Flink.
    rows = sorted((r[0], r[1]) for r in out.execute_and_collect())
    assert rows == [(i, token(f"p{i}") if i % 4 else None) for i in range(10, N)]
    assert sink.records == []  # running the stream is not an audited run
    # The audited run: the same stream's job, counts from the kept flag.
    table = collect(out)
    assert sorted(table.to_pylist(), key=lambda r: r["id"]) == [
        {"id": i, "name": name} for i, name in rows
    ]
    done = sink.records[-1]
    assert [r["event"] for r in sink.records] == ["run.started", "run.completed"]
    assert (done["rows_in"], done["rows_out"], done["rows_redacted"]) == (N, N - 10, 10)


def test_zoned_timestamps_need_a_zone_without_daylight_saving() -> None:
    from pyflink.table import EnvironmentSettings, TableEnvironment

    env = TableEnvironment.create(EnvironmentSettings.in_batch_mode())
    env.get_config().set("table.local-time-zone", "Europe/Paris")
    table = pa.table({"at": pa.array([0, 1], pa.timestamp("us", tz="UTC"))})
    src = env.from_elements([], row_type(table.schema))
    with pytest.raises(PlanError, match=r"column 'at'.*Europe/Paris.*UTC"):
        apply_policy(src, DAYS, audit=MemorySink())
    env.get_config().set("table.local-time-zone", "GMT+02:00")
    out = apply_policy(src, DAYS, audit=MemorySink())
    assert out is not None


def test_timestamp_precision_comes_from_the_java_schema(t_env: Any) -> None:
    from cape_pipelines.flink.apply import schema_to_arrow

    src = t_env.sql_query(
        "SELECT CAST(NULL AS TIMESTAMP(0)) AS s, CAST(NULL AS TIMESTAMP(3)) AS ms, "
        "CAST(NULL AS TIMESTAMP(6)) AS us, CAST(NULL AS TIMESTAMP(9)) AS ns, "
        "CAST(NULL AS TIMESTAMP_LTZ(9)) AS zns"
    )
    assert schema_to_arrow(src) == pa.schema(
        [
            ("s", pa.timestamp("s")),
            ("ms", pa.timestamp("ms")),
            ("us", pa.timestamp("us")),
            ("ns", pa.timestamp("ns")),
            ("zns", pa.timestamp("ns", tz="UTC")),
        ]
    )


def test_mapper_names_the_column_flink_cannot_read_back() -> None:
    schema = pa.schema([("at", pa.timestamp("ns"))])
    plan = build_plan(
        {"label": "x", "rules": [{"match": {"name": "other"}, "actions": ["drop"]}]},
        pa.schema([*schema, ("other", pa.int64())]),
    )
    df = pd.DataFrame({"at": pd.to_datetime([dt.datetime(2020, 1, 1), None]), "other": [1, 2]})
    assert PolicyMapper(plan)(df)["__cape_keep"].tolist() == [True, True]
    bad = pd.DataFrame({"at": pd.Series([pd.Timestamp(-1, unit="ns")]), "other": [1]})
    with pytest.raises(TransformError, match=r"column 'at'.*before 1970"):
        PolicyMapper(plan)(bad)


def shipped_payload(out: Any) -> bytes:
    """The bytes PyFlink hands the JVM for the policy's UDF: what Flink ships to its workers."""
    function = out._cape_binding.function._java_user_defined_function()
    return bytes(function.getSerializedPythonFunction())


def test_the_shipped_udf_holds_no_key_bytes(t_env: Any) -> None:
    key = os.urandom(32)
    forms = {
        "raw": key,
        "hex": key.hex().encode(),
        "HEX": key.hex().upper().encode(),
        "base64": base64.b64encode(key),
        "base64url": base64.urlsafe_b64encode(key),
    }
    src = t_env.from_pandas(people().to_pandas(), row_type(people().schema))
    out = apply_policy(src, POLICY, keys={"k": key}, audit=MemorySink())
    payload = shipped_payload(out)
    assert [name for name, form in forms.items() if form in payload] == []
    # The workers resolve the key themselves: the tokens are the key's.
    rows = {r["id"]: r["name"] for r in collect(out).to_pylist()}
    assert rows[11] == hmac.new(key, b"p11", hashlib.sha256).hexdigest()
    # The explicit opt-in ships the bytes: the check above can fail.
    inline = apply_policy(src, POLICY, keys={"k": key}, audit=MemorySink(), worker_keys="inline")
    assert forms["raw"] in shipped_payload(inline)


def test_the_write_and_its_counts_run_the_policy_once(t_env: Any, tmp_path: Path) -> None:
    from cape_pipelines.flink.apply import _insert_statements

    src = t_env.from_pandas(people().to_pandas(), row_type(people().schema))
    out = apply_policy(src, POLICY, keys={"k": KEY}, audit=MemorySink())
    sink_table(t_env, "plan_target", tmp_path / "out", "id BIGINT, name STRING")
    sink_table(t_env, "plan_counts", tmp_path / "counts", "c0 BIGINT, c1 BIGINT, c2 BIGINT")
    plan = _insert_statements(out, out._cape_binding, "plan_target", "plan_counts", False)
    executed = plan.explain().split("== Optimized Execution Plan ==")[-1]
    # One Python function over the source, its result reused by both inserts.
    assert executed.count("PythonScalarFunction") == 1, executed
    assert executed.count("Reused(") == 2, executed


def test_execute_insert_refuses_a_risk_section(t_env: Any) -> None:
    policy = {
        **POLICY,
        "risk": {"quasi_identifiers": ["id"], "k": 2, "action": "suppress"},
    }
    sink = MemorySink()
    src = t_env.from_pandas(people().to_pandas(), row_type(people().schema))
    out = apply_policy(src, policy, keys={"k": KEY}, audit=sink)
    with pytest.raises(PlanError, match="risk"):
        execute_insert(out, "anything")
    assert sink.records == []
