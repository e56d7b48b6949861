"""Spark adapter: schema derivation, partitions, SQL UDFs, audit per run, bad input, NANOS Parquet.

Every test uses the one session-scoped SparkSession (``spark`` fixture). UDF
tests compare each SQL function with the policy path on the same rows; a
transformation family that has not landed yet is skipped by name.
"""

from __future__ import annotations

import datetime as dt
import os
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("pyspark")

from pyspark.sql import types as T

from cape_pipelines import KeyMissingError, PlanError
from cape_pipelines import apply_policy as apply_arrow
from cape_pipelines.audit import MemorySink
from cape_pipelines.spark import (
    apply_policy,
    collect,
    read_parquet,
    register_udfs,
    write,
)
from cape_pipelines.spark.convert import floor_to_micros, to_arrow, to_spark

pytestmark = pytest.mark.spark

KEYS = {"k": b"k" * 32, "k64": b"s" * 64}


def policy(*rules: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"label": "spark-test", "rules": list(rules), **extra}


def on(column: str, transform: dict[str, Any]) -> dict[str, Any]:
    return {"match": {"name": column}, "actions": [{"transform": transform}]}


DROP_SSN = {"match": {"name": "ssn"}, "actions": ["drop"]}
ADULTS = {"actions": [{"transform": {"type": "row-redact", "condition": "age < 18"}}]}

PEOPLE = pa.table(
    {
        "name": ["ann", "bob", None, "dee", "éva", ""],
        "age": pa.array([34, 12, 50, None, 18, 70], pa.int32()),
        "ssn": ["1", "2", "3", "4", "5", "6"],
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
    }
)


@pytest.fixture(scope="module")
def people(spark: Any) -> Any:
    return spark.createDataFrame(PEOPLE)


# --- types --------------------------------------------------------------------------------------

TYPE_CASES = [
    # (arrow type, spark type, arrow type a plan sees for that spark type in zone "Europe/Paris")
    (pa.int8(), T.ByteType(), pa.int8()),
    (pa.int16(), T.ShortType(), pa.int16()),
    (pa.int32(), T.IntegerType(), pa.int32()),
    (pa.int64(), T.LongType(), pa.int64()),
    (pa.float32(), T.FloatType(), pa.float32()),
    (pa.decimal128(12, 3), T.DecimalType(12, 3), pa.decimal128(12, 3)),
    (pa.large_string(), T.StringType(), pa.string()),
    (pa.date32(), T.DateType(), pa.date32()),
    # a zoned timestamp is an instant: Spark's TIMESTAMP, seen in the session zone
    (pa.timestamp("ns", tz="UTC"), T.TimestampType(), pa.timestamp("us", tz="Europe/Paris")),
    # a naive timestamp is a wall-clock reading: TIMESTAMP_NTZ
    (pa.timestamp("ms"), T.TimestampNTZType(), pa.timestamp("us")),
]


@pytest.mark.parametrize(("arrow", "spark_type", "seen"), TYPE_CASES)
def test_type_mapping(arrow: pa.DataType, spark_type: T.DataType, seen: pa.DataType) -> None:
    assert to_spark(arrow) == spark_type
    assert to_arrow(spark_type, "Europe/Paris") == seen


@pytest.mark.parametrize("arrow", [pa.uint32(), pa.uint64(), pa.duration("s")])
def test_type_spark_cannot_hold_is_refused_by_name(arrow: pa.DataType) -> None:
    with pytest.raises(PlanError, match="column 'c': Spark has no type"):
        to_spark(arrow, "c")


def test_nanoseconds_floor_to_microseconds_like_spark() -> None:
    arr = pa.array([-1, 1_999, -1_001, None], pa.timestamp("ns"))
    assert floor_to_micros(arr).cast(pa.int64()).to_pylist() == [-1, 1, -2, None]


SCHEMA_CASES = [
    # (what, policy, expected output spark schema as "name:type" strings)
    (
        "drop keeps the rest in order",
        policy(DROP_SSN),
        ["name:string", "age:int", "salary:double", "born:date", "seen:timestamp"],
    ),
    (
        "row-redact keeps every column",
        policy(ADULTS),
        ["name:string", "age:int", "ssn:string", "salary:double", "born:date", "seen:timestamp"],
    ),
    (
        "rounding keeps int",
        policy(on("age", {"type": "numeric-rounding", "precision": -1})),
        ["name:string", "age:int", "ssn:string", "salary:double", "born:date", "seen:timestamp"],
    ),
    (
        "rounding dtype fixes the type",
        policy(on("salary", {"type": "numeric-rounding", "precision": 0, "dtype": "Integer"})),
        ["name:string", "age:int", "ssn:string", "salary:int", "born:date", "seen:timestamp"],
    ),
    (
        "truncation keeps date",
        policy(on("born", {"type": "date-truncation", "frequency": "year"})),
        ["name:string", "age:int", "ssn:string", "salary:double", "born:date", "seen:timestamp"],
    ),
    (
        "unmatched dropped",
        policy(on("age", {"type": "numeric-rounding", "precision": 0}), unmatched_columns="drop"),
        ["age:int"],
    ),
]


@pytest.mark.parametrize(
    ("what", "pol", "expected"), SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES]
)
def test_output_schema_derived_from_plan(people: Any, what: str, pol: dict, expected: list) -> None:
    out = apply_policy(people, pol, keys=KEYS, audit=MemorySink())
    assert [f"{f.name}:{f.dataType.simpleString()}" for f in out.schema] == expected
    # and the rows Spark produces carry exactly that schema
    assert collect(out).num_columns == len(expected)


# --- results equal the Arrow path ---------------------------------------------------------------

RESULT_CASES = [
    ("drop", policy(DROP_SSN)),
    ("row-redact, null condition removes the row", policy(ADULTS, DROP_SSN)),
    (
        "row-redact on a column dropped later",
        policy(ADULTS, {"match": {"name": "age"}, "actions": ["drop"]}),
    ),
    (
        "row-redact removes every row",
        policy(
            {"actions": [{"transform": {"type": "row-redact", "condition": "ssn is not null"}}]}
        ),
    ),
    ("round float half-even", policy(on("salary", {"type": "numeric-rounding", "precision": 0}))),
    ("round int negative", policy(on("age", {"type": "numeric-rounding", "precision": -1}))),
    ("truncate date", policy(on("born", {"type": "date-truncation", "frequency": "month"}))),
    ("truncate timestamp", policy(on("seen", {"type": "date-truncation", "frequency": "hour"}))),
    (
        "perturb number keyed",
        policy(
            on(
                "salary",
                {"type": "numeric-perturbation", "min": -5, "max": 5, "key": {"secret": "k"}},
            )
        ),
    ),
    (
        "perturb int with context",
        policy(
            on(
                "age",
                {"type": "numeric-perturbation", "min": -3, "max": 3, "seed": 7, "context": "ssn"},
            )
        ),
    ),
    (
        "perturb date",
        policy(
            on(
                "born",
                {
                    "type": "date-perturbation",
                    "frequency": "DAY",
                    "min": -10,
                    "max": 10,
                    "key": {"secret": "k"},
                },
            )
        ),
    ),
]


@pytest.mark.parametrize(("what", "pol"), RESULT_CASES, ids=[c[0] for c in RESULT_CASES])
def test_same_rows_as_arrow_path(spark: Any, what: str, pol: dict) -> None:
    # 1-row partitions, so every case also crosses partition boundaries
    sdf = spark.createDataFrame(PEOPLE).repartition(len(PEOPLE) + 2)
    got = collect(apply_policy(sdf.coalesce(len(PEOPLE) + 2), pol, keys=KEYS, audit=MemorySink()))
    want = apply_arrow(pol, PEOPLE, keys=KEYS, audit=MemorySink())
    assert got.schema.equals(want.schema)
    key = "ssn" if "ssn" in got.column_names else "name"
    assert sorted(got.to_pylist(), key=lambda r: str(r.get(key))) == sorted(
        want.to_pylist(), key=lambda r: str(r.get(key))
    )


def test_empty_partitions_and_empty_input(spark: Any) -> None:
    pol = policy(ADULTS, on("salary", {"type": "numeric-rounding", "precision": 0}))
    sparse = spark.createDataFrame(PEOPLE.slice(0, 2)).repartition(6)  # >= 4 empty partitions
    assert sparse.rdd.glom().map(len).collect().count(0) >= 4
    got = collect(apply_policy(sparse, pol, audit=MemorySink()))
    assert sorted(got.column("name").to_pylist()) == ["ann"]
    empty = spark.createDataFrame(PEOPLE.slice(0, 0))
    got = collect(apply_policy(empty, pol, audit=MemorySink()))
    assert got.num_rows == 0
    assert got.schema.equals(apply_arrow(pol, PEOPLE.slice(0, 0), audit=MemorySink()).schema)


# --- audit: one run per action ------------------------------------------------------------------


def _events(sink: MemorySink) -> list[str]:
    return [r["event"] for r in sink.records]


def test_collect_is_one_audited_run(people: Any) -> None:
    sink = MemorySink()
    pol = policy(ADULTS, on("salary", {"type": "numeric-rounding", "precision": 0}), DROP_SSN)
    out = apply_policy(people, pol, audit=sink)
    assert sink.records == []  # building the plan is not a run
    collect(out)
    assert _events(sink) == ["run.started", "run.completed"]
    done = sink.records[1]
    assert done["run_id"] == sink.records[0]["run_id"]
    assert (done["rows_in"], done["rows_out"], done["rows_redacted"]) == (6, 4, 2)
    assert done["columns"] == {"salary": {"transform": "numeric-rounding", "values": 3, "nulls": 1}}
    collect(out)  # a second action is a second run
    assert _events(sink) == ["run.started", "run.completed"] * 2
    assert sink.records[2]["run_id"] != sink.records[0]["run_id"]


def test_write_counts_the_files_written(people: Any, tmp_path: Any) -> None:
    sink = MemorySink()
    pol = policy(ADULTS, on("salary", {"type": "numeric-rounding", "precision": 0}))
    out = apply_policy(people.repartition(4), pol, audit=sink)
    counters = write(out, str(tmp_path / "out"), mode="overwrite")
    assert _events(sink) == ["run.started", "run.completed"]
    written = pq.read_table(str(tmp_path / "out"))
    assert counters.rows_out == written.num_rows == 4
    assert sink.records[1]["columns"]["salary"]["values"] == 3
    assert sink.records[1]["rows_in"] == 6


def test_failed_action_is_one_failed_run(people: Any, tmp_path: Any) -> None:
    sink = MemorySink()
    target = tmp_path / "exists"
    target.mkdir()
    out = apply_policy(
        people,
        policy(DROP_SSN, on("age", {"type": "numeric-rounding", "precision": 0})),
        audit=sink,
    )
    with pytest.raises(Exception, match="already exists"):
        write(out, str(target), mode="errorifexists")
    assert _events(sink) == ["run.started", "run.failed"]
    assert "already exists" in sink.records[1]["error"]["message"]


def test_actions_need_the_dataframe_apply_policy_returned(people: Any) -> None:
    out = apply_policy(people, policy(DROP_SSN), audit=MemorySink())
    with pytest.raises(TypeError, match="not a DataFrame returned by"):
        collect(out.limit(1))


# --- audit: counts observed in the action's own job ---------------------------------------------

ROUND_SALARY = on("salary", {"type": "numeric-rounding", "precision": 0})
# PEOPLE through ADULTS + ROUND_SALARY: ages 34, 50, 18, 70 stay, one of their salaries is null
ADULT_COUNTS = {"rows_in": 6, "rows_out": 4, "salary": (3, 1)}


def _counted(counters: Any) -> dict[str, Any]:
    c = counters.columns["salary"]
    return {
        "rows_in": counters.rows_in,
        "rows_out": counters.rows_out,
        "salary": (c.values, c.nulls),
    }


def _recording(people: Any, directory: Any) -> Any:
    """``people`` through a Python step that leaves one file in ``directory`` per task it runs."""
    directory.mkdir(exist_ok=True)
    where = str(directory)

    def record(batches: Any) -> Any:
        import uuid

        with open(os.path.join(where, uuid.uuid4().hex), "w"):
            pass
        yield from batches

    return people.repartition(3).mapInArrow(record, people.schema)


def _source_tasks(directory: Any) -> int:
    return len(list(directory.iterdir()))


def test_write_counts_come_from_its_own_job_not_the_files(people: Any) -> None:
    # The noop format writes nothing that could be read back: the counts must be observed.
    sink = MemorySink()
    out = apply_policy(people, policy(ADULTS, ROUND_SALARY), audit=sink)
    counters = write(out, "unused", format="noop", mode="overwrite")
    assert _counted(counters) == ADULT_COUNTS
    assert _events(sink) == ["run.started", "run.completed"]
    assert sink.records[1]["rows_redacted"] == 2


AUDITED_ACTIONS = [
    ("collect", lambda out, path: collect(out)),
    ("write parquet", lambda out, path: write(out, str(path))),
    ("write noop", lambda out, path: write(out, str(path), format="noop", mode="overwrite")),
]


@pytest.mark.parametrize(("what", "action"), AUDITED_ACTIONS, ids=[a[0] for a in AUDITED_ACTIONS])
def test_a_row_removing_policy_reads_its_source_once(
    people: Any, tmp_path: Any, what: str, action: Any
) -> None:
    # rows_in is observed below mapInArrow in the same job, not a second count() job
    tasks = tmp_path / "tasks"
    source = _recording(people, tasks)
    source.write.format("noop").mode("overwrite").save()
    once = _source_tasks(tasks)
    sink = MemorySink()
    action(apply_policy(source, policy(ADULTS, ROUND_SALARY), audit=sink), tmp_path / "out")
    assert _source_tasks(tasks) == 2 * once
    done = sink.records[1]
    assert (done["rows_in"], done["rows_out"]) == (6, 4)
    assert done["columns"]["salary"] == {"transform": "numeric-rounding", "values": 3, "nulls": 1}


def test_append_counts_only_what_this_write_added(people: Any, tmp_path: Any) -> None:
    path = str(tmp_path / "out")
    out = apply_policy(people, policy(ADULTS, ROUND_SALARY), audit=MemorySink())
    first = write(out, path, mode="append")
    second = write(out, path, mode="append")
    assert _counted(first) == _counted(second) == ADULT_COUNTS
    assert pq.read_table(path).num_rows == 8


def test_partitioned_write_counts_every_partition(people: Any, tmp_path: Any) -> None:
    path = tmp_path / "out"
    out = apply_policy(people, policy(ADULTS, ROUND_SALARY), audit=MemorySink())
    counters = write(out, str(path), partition_by=["born"])
    assert _counted(counters) == ADULT_COUNTS
    assert len(list(path.glob("born=*"))) == 4
    assert sum(pq.read_metadata(f).num_rows for f in path.rglob("*.parquet")) == 4


def test_cached_output_is_counted_from_the_cache(people: Any, tmp_path: Any) -> None:
    out = apply_policy(people, policy(ADULTS, ROUND_SALARY), audit=MemorySink()).cache()
    try:
        assert _counted(write(out, "unused", format="noop", mode="overwrite")) == ADULT_COUNTS
        assert collect(out).num_rows == 4
    finally:
        out.unpersist()


@pytest.fixture
def session_conf(spark: Any) -> Any:
    """Set SQL settings on the shared session for one test; restored after it."""
    saved: dict[str, str | None] = {}

    def set_conf(key: str, value: str) -> None:
        saved.setdefault(key, spark.conf.get(key, None))
        spark.conf.set(key, value)

    yield set_conf
    for key, value in saved.items():
        if value is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, value)


def test_counts_under_adaptive_execution_with_a_shuffle(people: Any, session_conf: Any) -> None:
    session_conf("spark.sql.adaptive.enabled", "true")
    out = apply_policy(
        people.repartition(5, "ssn"), policy(ADULTS, ROUND_SALARY), audit=MemorySink()
    )
    assert _counted(write(out, "unused", format="noop", mode="overwrite")) == ADULT_COUNTS


def test_legacy_all_attempts_metrics_are_not_trusted(
    people: Any, tmp_path: Any, session_conf: Any
) -> None:
    # With Spark's legacy mode, write counts the files it wrote and the source itself.
    session_conf("spark.sql.legacy.observeMetricsAggregateAllAttempts", "true")
    tasks = tmp_path / "tasks"
    source = _recording(people, tasks)
    source.write.format("noop").mode("overwrite").save()
    once = _source_tasks(tasks)
    out = apply_policy(source, policy(ADULTS, ROUND_SALARY), audit=MemorySink())
    assert _counted(write(out, str(tmp_path / "out"))) == ADULT_COUNTS
    assert _source_tasks(tasks) == 3 * once  # the write, then count() for rows_in


RETRY_SCRIPT = r"""
import json, os, sys
from pyspark import TaskContext
from pyspark.sql import SparkSession
from cape_pipelines.audit import MemorySink
from cape_pipelines.spark import apply_policy, collect, write

work = sys.argv[1]
spark = (
    SparkSession.builder.master("local[2,2]")  # two attempts per task
    .config("spark.ui.enabled", "false")
    .config("spark.sql.adaptive.enabled", "false")
    .config("spark.sql.session.timeZone", "UTC")
    .config("spark.sql.execution.arrow.maxRecordsPerBatch", "10")
    .getOrCreate()
)
spark.sparkContext.setLogLevel("OFF")
base = spark.range(0, 1000, numPartitions=4).selectExpr(
    "id", "id % 50 AS age", "CASE WHEN id % 3 = 0 THEN NULL ELSE id * 1.5D END AS salary"
)
POLICY = {
    "label": "retry",
    "rules": [
        {"actions": [{"transform": {"type": "row-redact", "condition": "age < 10"}}]},
        {"match": {"name": "salary"},
         "actions": [{"transform": {"type": "numeric-rounding", "precision": -1}}]},
    ],
}


def flaky(name):
    marker = os.path.join(work, name + ".failed")

    def run(batches):
        ctx = TaskContext.get()
        for i, batch in enumerate(batches):
            # The first attempt of partition 1 fails after 3 batches went on down the plan.
            if i == 3 and ctx.partitionId() == 1 and ctx.attemptNumber() == 0:
                with open(marker, "a") as f:
                    f.write("failed once\n")
                raise RuntimeError("first attempt fails")
            yield batch

    return base.mapInArrow(run, base.schema)


def counts(c):
    col = c.columns["salary"]
    return [c.rows_in, c.rows_out, col.values, col.nulls]


result = {}
sink = MemorySink()
out = apply_policy(flaky("write"), POLICY, audit=sink)
result["write"] = counts(write(out, os.path.join(work, "written")))
collect(apply_policy(flaky("collect"), POLICY, audit=sink))
done = sink.records[-1]
result["collect"] = [done["rows_in"], done["rows_out"],
                     done["columns"]["salary"]["values"], done["columns"]["salary"]["nulls"]]
spark.conf.set("spark.sql.legacy.observeMetricsAggregateAllAttempts", "true")
out = apply_policy(flaky("legacy"), POLICY, audit=sink)
result["legacy"] = counts(write(out, os.path.join(work, "legacy")))
result["events"] = [r["event"] for r in sink.records]
spark.stop()
print(json.dumps(result))
"""


@pytest.mark.slow
def test_counts_are_exact_when_a_task_fails_and_is_retried(tmp_path: Any) -> None:
    import json
    import subprocess
    import sys

    # Its own Spark: the shared local[2] session never retries a task.
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    proc = subprocess.run(
        [sys.executable, "-c", RETRY_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    kept = [i for i in range(1000) if i % 50 >= 10]
    want = [1000, len(kept), sum(1 for i in kept if i % 3), sum(1 for i in kept if i % 3 == 0)]
    # one failed first attempt per job over the source: legacy mode runs count() for rows_in
    for action, jobs in [("write", 1), ("collect", 1), ("legacy", 2)]:
        assert (tmp_path / f"{action}.failed").read_text() == "failed once\n" * jobs, action
        assert got[action] == want, action
    assert got["events"] == ["run.started", "run.completed"] * 3
    for written in ("written", "legacy"):
        assert pq.read_table(str(tmp_path / written)).num_rows == len(kept)


# --- bad input: errors at apply_policy, before any job ------------------------------------------

BAD_INPUT = [
    (
        "missing column",
        policy(on("email", {"type": "numeric-rounding", "precision": 0})),
        PlanError,
        "'email'",
    ),
    (
        "type the transformation cannot take",
        policy(on("name", {"type": "numeric-rounding", "precision": 0})),
        PlanError,
        "column 'name': numeric-rounding needs a numeric column",
    ),
    (
        "missing key",
        policy(
            on(
                "salary",
                {
                    "type": "numeric-perturbation",
                    "min": -1,
                    "max": 1,
                    "key": {"secret": "nobody-has-it"},
                },
            )
        ),
        KeyMissingError,
        "nobody-has-it",
    ),
    (
        "policy drops every column",
        policy({"match": {"regex": ".*"}, "actions": ["drop"]}),
        PlanError,
        "drops every column",
    ),
]


@pytest.mark.parametrize(("what", "pol", "exc", "match"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_fails_at_apply_policy(
    people: Any, tmp_path: Any, what: str, pol: dict, exc: type, match: str
) -> None:
    sink = MemorySink()
    with pytest.raises(exc, match=match):
        write(apply_policy(people, pol, keys=KEYS, audit=sink), str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()
    assert _events(sink) == ["run.started", "run.failed"]


def test_missing_key_is_not_in_the_environment_either(people: Any) -> None:
    os.environ.pop("CAPE_KEY_NOBODY_HAS_IT", None)
    pol = policy(
        on(
            "salary",
            {
                "type": "numeric-perturbation",
                "min": -1,
                "max": 1,
                "key": {"secret": "nobody-has-it"},
            },
        )
    )
    with pytest.raises(KeyMissingError, match="CAPE_KEY_NOBODY_HAS_IT"):
        apply_policy(people, pol, audit=MemorySink())


# --- Parquet TIMESTAMP(NANOS) -------------------------------------------------------------------


def test_read_parquet_with_nanosecond_timestamps(spark: Any, tmp_path: Any) -> None:
    path = str(tmp_path / "ns.parquet")
    ns = [1_577_836_800_123_456_789, -1, None]
    table = pa.table(
        {
            "naive": pa.array(ns, pa.timestamp("ns")),
            "zoned": pa.array(ns, pa.timestamp("ns", tz="Europe/Paris")),
            "n": [1, 2, 3],
        }
    )
    pq.write_table(table, path)  # pyarrow's default writes TIMESTAMP(NANOS)
    assert "nanoseconds" in str(pq.ParquetFile(path).schema)
    sdf = read_parquet(spark, path)
    assert [f.dataType for f in sdf.schema] == [
        T.TimestampNTZType(),
        T.TimestampType(),
        T.LongType(),
    ]
    pol = policy(on("zoned", {"type": "date-truncation", "frequency": "second"}))
    got = collect(apply_policy(sdf, pol, audit=MemorySink()))
    micros = [1_577_836_800_123_456, -1, None]  # floored, as Spark floors
    assert got.column("naive").cast(pa.int64()).to_pylist() == micros
    assert got.column("zoned").cast(pa.int64()).to_pylist() == [
        1_577_836_800_000_000,
        -1_000_000,
        None,
    ]


# --- SQL UDFs -----------------------------------------------------------------------------------

UDF_CASES = [
    # (needs, SQL expression, policy transform on that column, column)
    (
        "tokenizer",
        "cape_tokenize(name, 'k')",
        {"type": "tokenizer", "key": {"secret": "k"}},
        "name",
    ),
    (
        "tokenizer",
        "cape_tokenize(name, 'k', 8)",
        {"type": "tokenizer", "key": {"secret": "k"}, "max_token_len": 8},
        "name",
    ),
    (
        "tokenizer",
        "cape_tokenize(name, 'k', 12, 'cape-sha256')",
        {
            "type": "tokenizer",
            "key": {"secret": "k"},
            "max_token_len": 12,
            "algorithm": "cape-sha256",
        },
        "name",
    ),
    ("tokenizer", "cape_tokenize(age, 'k')", {"type": "tokenizer", "key": {"secret": "k"}}, "age"),
    (
        "reversible-tokenizer",
        "cape_tokenize_reversible(name, 'k')",
        {"type": "reversible-tokenizer", "key": {"secret": "k"}},
        "name",
    ),
    (
        "numeric-rounding",
        "cape_round(salary, 1)",
        {"type": "numeric-rounding", "precision": 1},
        "salary",
    ),
    (
        "numeric-rounding",
        "cape_round_long(age, -1)",
        {"type": "numeric-rounding", "precision": -1},
        "age",
    ),
    (
        "date-truncation",
        "cape_truncate_date(born, 'month')",
        {"type": "date-truncation", "frequency": "month"},
        "born",
    ),
    (
        "date-truncation",
        "cape_truncate_timestamp(seen, 'HOUR')",
        {"type": "date-truncation", "frequency": "hour"},
        "seen",
    ),
    (
        "numeric-perturbation",
        "cape_perturb_number(salary, 'k', -5, 5, 'salary')",
        {"type": "numeric-perturbation", "min": -5, "max": 5, "key": {"secret": "k"}},
        "salary",
    ),
    (
        "numeric-perturbation",
        "cape_perturb_number(salary, 'k', -2.5, 2.5, 'salary')",
        {"type": "numeric-perturbation", "min": -2.5, "max": 2.5, "key": {"secret": "k"}},
        "salary",
    ),
    (
        "numeric-perturbation",
        "cape_perturb_number_long(age, 'k', -3, 3, 'age')",
        {"type": "numeric-perturbation", "min": -3, "max": 3, "key": {"secret": "k"}},
        "age",
    ),
    (
        "date-perturbation",
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
        "date-perturbation",
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
]


@pytest.fixture(scope="module")
def udfs(spark: Any, people: Any) -> list[str]:
    people.createOrReplaceTempView("people")
    return register_udfs(spark, keys=KEYS)


@pytest.mark.parametrize(
    ("needed", "sql", "transform", "column"), UDF_CASES, ids=[c[1] for c in UDF_CASES]
)
def test_udf_equals_policy_path(
    spark: Any, udfs: list[str], needed: str, sql: str, transform: dict, column: str
) -> None:
    got = spark.sql(f"SELECT ssn, {sql} AS v FROM people").toArrow()
    want = apply_arrow(policy(on(column, transform)), PEOPLE, keys=KEYS, audit=MemorySink())
    expected = want.column(column)
    if not got.column("v").type.equals(expected.type):
        expected = expected.cast(got.column("v").type)
    by_ssn = dict(zip(got.column("ssn").to_pylist(), got.column("v").to_pylist(), strict=True))
    assert [by_ssn[s] for s in want.column("ssn").to_pylist()] == expected.to_pylist()


def test_reveal_round_trips_the_reversible_token(spark: Any, udfs: list[str]) -> None:
    rows = spark.sql(
        "SELECT name, cape_reveal(cape_tokenize_reversible(name, 'k'), 'k') AS back FROM people"
    ).collect()
    assert [r["back"] for r in rows] == [r["name"] for r in rows]


def test_udf_unknown_key_names_the_key(spark: Any, udfs: list[str]) -> None:
    with pytest.raises(Exception, match="key 'no-such-key' not found"):
        spark.sql(
            "SELECT cape_round_long(age, 0), cape_perturb_number(salary, 'no-such-key', "
            "-1, 1) FROM people"
        ).collect()


def test_register_udfs_names_every_function(udfs: list[str]) -> None:
    assert {
        "cape_tokenize",
        "cape_tokenize_reversible",
        "cape_reveal",
        "cape_round",
        "cape_truncate_date",
        "cape_perturb_number",
        "cape_perturb_date",
    } <= set(udfs)


def test_udf_decimal_round_half_even(spark: Any, udfs: list[str]) -> None:
    sdf = spark.createDataFrame(
        pa.table({"d": pa.array([Decimal("2.25"), Decimal("2.35"), None], pa.decimal128(6, 2))})
    )
    sdf.createOrReplaceTempView("decimals")
    got = [r[0] for r in spark.sql("SELECT cape_round(d, 1) FROM decimals").collect()]
    assert got == [2.2, 2.4, None]


# --- the parity runner: Arrow in, Arrow out, identical to the pyarrow path ----------------------

TYPED = pa.table(
    {
        "i8": pa.array([1, -7, None, 5], pa.int8()),
        "i16": pa.array([150, None, -250, 5], pa.int16()),
        "i32": pa.array([None, 12345, -5, 5], pa.int32()),
        "dec": pa.array(
            [Decimal("1.25"), Decimal("-2.35"), None, Decimal("0.05")], pa.decimal128(8, 2)
        ),
        "paris": pa.array(
            [
                dt.datetime(2024, 3, 1, 23, 30),
                None,
                dt.datetime(2024, 3, 2, 0, 30),
                dt.datetime(1969, 12, 31, 23, 59),
            ],
            pa.timestamp("ns", tz="Europe/Paris"),
        ),
        "naive": pa.array(
            [
                dt.datetime(2024, 3, 1, 23, 30, 0, 1),
                None,
                dt.datetime(2024, 3, 2, 0, 30),
                dt.datetime(1900, 1, 1),
            ],
            pa.timestamp("ns"),
        ),
        "text": pa.array(["a", None, "ü", ""], pa.large_string()),
    }
)

RUNNER_CASES = [
    (
        "int widths round",
        policy(
            on("i8", {"type": "numeric-rounding", "precision": -1}),
            on("i16", {"type": "numeric-rounding", "precision": -2}),
            on("i32", {"type": "numeric-rounding", "precision": -1}),
        ),
    ),
    ("decimal rounds half-even", policy(on("dec", {"type": "numeric-rounding", "precision": 1}))),
    (
        "zoned day is the zone's day",
        policy(on("paris", {"type": "date-truncation", "frequency": "day"})),
    ),
    ("naive wall clock", policy(on("naive", {"type": "date-truncation", "frequency": "hour"}))),
    (
        "perturbed zoned timestamps",
        policy(
            on(
                "paris",
                {
                    "type": "date-perturbation",
                    "frequency": "minutes",
                    "min": -30,
                    "max": 30,
                    "seed": 1,
                },
            )
        ),
    ),
    (
        "only a row filter",
        policy({"actions": [{"transform": {"type": "row-redact", "condition": "i8 > 0"}}]}),
    ),
]


@pytest.mark.parametrize(("what", "pol"), RUNNER_CASES, ids=[c[0] for c in RUNNER_CASES])
def test_runner_matches_arrow_path(spark: Any, what: str, pol: dict) -> None:
    from runner_spark import run_spark

    got = run_spark(pol, TYPED, KEYS)
    want = apply_arrow(pol, TYPED, keys=KEYS, audit=MemorySink())
    assert got.schema.equals(want.schema)
    assert got.equals(want)
