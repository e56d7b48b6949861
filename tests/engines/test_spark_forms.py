"""Spark's two forms of ``apply_policy`` give the same bytes: narrow Arrow UDF and mapInArrow.

``apply_policy`` sends only the columns a plan reads through one Arrow UDF
when the plan filters no rows (the narrow form), and the whole row through
``mapInArrow`` otherwise. Here every parity case runs through both forms,
which must produce identical Arrow tables (types, nulls, NaN, timestamps in
the case's session zone), or the same error; a property test does the same
over generated strings, floats and timestamps and checks both against the
core. The choice of form is checked too: a plan that filters rows, an
untouched column Spark marks not-nullable or carrying metadata, and a column
named like the UDF's struct keep ``mapInArrow``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pytest
from cases import CASES, Case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runner_spark import BATCH_ROWS, table_time_zone, to_spark_input

from cape_pipelines import build_plan
from cape_pipelines.audit import MemorySink
from cape_pipelines.core import apply_table

pytestmark = pytest.mark.spark

KEYS = {"tok": b"k" * 32, "siv": bytes(range(32))}


def _forms(spark: Any, policy: dict[str, Any], table: pa.Table, keys: dict[str, bytes]) -> Any:
    """(narrow-or-chosen form, mapInArrow form, whether the chosen form is narrow)."""
    from cape_pipelines.spark import PolicyFunction, apply_policy, plan_of
    from cape_pipelines.spark.convert import schema_to_spark

    source = to_spark_input(table)
    sdf = spark.createDataFrame(source, schema=schema_to_spark(source.schema))
    out = apply_policy(sdf, policy, keys=keys, audit=MemorySink())
    plan = plan_of(out)
    wide = sdf.mapInArrow(PolicyFunction(plan), schema_to_spark(plan.output_schema))
    return out, wide, _is_narrow(out)


def _is_narrow(out: Any) -> bool:
    return "ArrowEvalPython" in out._jdf.queryExecution().executedPlan().toString()


def _collect(sdf: Any) -> pa.Table | BaseException:
    try:
        return sdf.toArrow()
    except Exception as exc:  # the error is compared between the forms
        return exc


class _Session:
    """The session zone and Arrow batch size of one case, restored afterwards."""

    def __init__(self, spark: Any, zone: str):
        self.spark, self.zone = spark, zone
        self.saved: dict[str, Any] = {}

    def __enter__(self) -> _Session:
        names = ("spark.sql.session.timeZone", "spark.sql.execution.arrow.maxRecordsPerBatch")
        self.saved = {k: self.spark.conf.get(k, None) for k in names}
        self.spark.conf.set("spark.sql.session.timeZone", self.zone)
        self.spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", BATCH_ROWS)
        return self

    def __exit__(self, *exc: object) -> None:
        for k, v in self.saved.items():
            if v is None:
                self.spark.conf.unset(k)
            else:
                self.spark.conf.set(k, v)


def _builds(case: Case) -> bool:
    try:
        build_plan(case.policy, case.input.schema, keys=case.keys)
    except Exception:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES if _builds(c)])
def test_both_forms_give_the_same_bytes(spark: Any, case: Case) -> None:
    with _Session(spark, table_time_zone(case.input)):
        out, wide, narrow = _forms(spark, case.policy, case.input, case.keys)
        plan = build_plan(case.policy, case.input.schema, keys=case.keys)
        # Every plan that filters no rows takes the narrow form (the parity inputs
        # are all nullable, without Spark column metadata).
        assert narrow == (not plan.filters_rows and _transforms(plan))
        got, want = _collect(out), _collect(wide)
    if isinstance(want, BaseException):
        assert isinstance(got, BaseException), "mapInArrow failed, the narrow form did not"
        assert _core_message(want) == _core_message(got)
        return
    assert isinstance(got, pa.Table), got
    assert got.schema == want.schema
    assert got.equals(want)


def _transforms(plan: Any) -> bool:
    from cape_pipelines.plan import ColumnStep

    return any(isinstance(s, ColumnStep) for s in plan.steps)


def _core_message(exc: BaseException) -> str:
    """The core's error line inside a Python worker's traceback."""
    text = str(exc)
    lines = [ln for ln in text.splitlines() if "Error:" in ln and "cape_pipelines" in ln]
    return lines[-1] if lines else type(exc).__name__


# -- generated values ---------------------------------------------------------------------------

_POLICY = {
    "label": "forms",
    "rules": [
        {
            "match": {"name": "s"},
            "actions": [{"transform": {"type": "tokenizer", "key": {"secret": "tok"}}}],
        },
        {
            "match": {"name": "r"},
            "actions": [{"transform": {"type": "reversible-tokenizer", "key": {"secret": "siv"}}}],
        },
        {
            "match": {"name": "x"},
            "actions": [{"transform": {"type": "numeric-rounding", "precision": -1}}],
        },
        {
            "match": {"name": "t"},
            "actions": [{"transform": {"type": "date-truncation", "frequency": "month"}}],
        },
    ],
}

_texts = st.one_of(st.none(), st.text(max_size=12))
_floats = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=64))
_stamps = st.one_of(
    st.none(),
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1)).map(
        lambda d: d.replace(tzinfo=UTC)
    ),
)
_rows = st.lists(st.tuples(_texts, _texts, _floats, _stamps, _texts), min_size=1, max_size=12)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=_rows, zone=st.sampled_from(["UTC", "America/Sao_Paulo", "Asia/Kathmandu"]))
def test_generated_values_equal_the_core_in_both_forms(
    spark: Any, rows: list[tuple[Any, ...]], zone: str
) -> None:
    cols = list(zip(*rows, strict=True))
    table = pa.table(
        {
            "s": pa.array(cols[0], pa.string()),
            "r": pa.array(cols[1], pa.string()),
            "x": pa.array(cols[2], pa.float64()),
            "t": pa.array(cols[3], pa.timestamp("us", tz=zone)),
            "u": pa.array(cols[4], pa.string()),
        }
    )
    plan = build_plan(_POLICY, table.schema, keys=KEYS)
    core, _ = apply_table(plan, table)
    with _Session(spark, zone):
        out, wide, narrow = _forms(spark, _POLICY, table, KEYS)
        assert narrow
        got, want = _collect(out), _collect(wide)
    assert isinstance(got, pa.Table) and isinstance(want, pa.Table), (got, want)
    assert got.equals(want)
    # Spark hands timestamps back in UTC; the instants are the core's.
    assert got.cast(core.schema).equals(core)


# -- which form -----------------------------------------------------------------------------------

_SMALL = pa.table({"id": pa.array([1, 2, None], pa.int64()), "s": ["a", None, "a"]})
_TOKENIZE_S = {
    "label": "forms",
    "rules": [
        {
            "match": {"name": "s"},
            "actions": [{"transform": {"type": "tokenizer", "key": {"secret": "tok"}}}],
        }
    ],
}


def _frame(spark: Any, nullable: bool = True, metadata: dict[str, Any] | None = None) -> Any:
    from pyspark.sql import types as T

    schema = T.StructType(
        [
            T.StructField("id", T.LongType(), nullable, metadata or {}),
            T.StructField("s", T.StringType(), True),
        ]
    )
    return spark.createDataFrame([(1, "a"), (2, None), (3, "a")], schema=schema)


def test_untouched_columns_stay_in_the_jvm(spark: Any) -> None:
    from cape_pipelines.spark import apply_policy, collect

    out = apply_policy(_frame(spark), _TOKENIZE_S, keys=KEYS, audit=MemorySink())
    assert _is_narrow(out)
    plan = out._jdf.queryExecution().executedPlan().toString()
    # Only the column the policy reads goes to Python.
    assert "cape_policy(s#" in plan and "id#" not in plan.split("ArrowEvalPython")[1].split("]")[0]
    assert collect(out).column("id").to_pylist() == [1, 2, 3]


def test_not_nullable_untouched_column_keeps_mapinarrow(spark: Any) -> None:
    from cape_pipelines.spark import apply_policy

    out = apply_policy(_frame(spark, nullable=False), _TOKENIZE_S, keys=KEYS, audit=MemorySink())
    assert not _is_narrow(out)
    # The output schema is the one mapInArrow gives: every field nullable.
    assert all(f.nullable for f in out.schema)


def test_column_metadata_keeps_mapinarrow(spark: Any) -> None:
    from cape_pipelines.spark import apply_policy

    frame = _frame(spark, metadata={"comment": "id"})
    out = apply_policy(frame, _TOKENIZE_S, keys=KEYS, audit=MemorySink())
    assert not _is_narrow(out)
    assert out.schema["id"].metadata == {}


def test_row_filters_keep_mapinarrow(spark: Any) -> None:
    from cape_pipelines.spark import apply_policy, collect

    policy = {
        "label": "forms",
        "rules": [
            *_TOKENIZE_S["rules"],
            {"match": {"name": "id"}, "actions": [{"transform": {"type": "row-redact",
                                                                 "condition": "id > 2"}}]},
        ],
    }  # fmt: skip
    out = apply_policy(_frame(spark), policy, keys=KEYS, audit=MemorySink())
    assert not _is_narrow(out)
    assert collect(out).column("id").to_pylist() == [1, 2]


def test_a_column_named_like_the_struct_keeps_mapinarrow(spark: Any) -> None:
    from cape_pipelines.spark import apply_policy, collect

    frame = _frame(spark).withColumnRenamed("id", "__cape_policy__")
    out = apply_policy(frame, _TOKENIZE_S, keys=KEYS, audit=MemorySink())
    assert not _is_narrow(out)
    assert collect(out).column("__cape_policy__").to_pylist() == [1, 2, 3]
