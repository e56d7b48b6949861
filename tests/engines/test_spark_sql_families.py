"""Spark SQL functions of fpe, mask, bucket, generalize and text-scrub equal the policy path."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pyarrow as pa
import pytest

pytest.importorskip("pyspark")

from cape_pipelines import apply_policy as apply_arrow
from cape_pipelines.audit import MemorySink
from cape_pipelines.spark import register_udfs

pytestmark = pytest.mark.spark

KEYS = {"f": bytes(range(16))}

ROWS = pa.table(
    {
        "id": pa.array([1, 2, 3, 4], pa.int64()),
        "card": pa.array(["4111111111111111", None, "5500000000000004", "4012888888881881"]),
        "age": pa.array([34, None, 70, -3], pa.int32()),
        "born": pa.array(
            [dt.date(2020, 2, 13), None, dt.date(1969, 12, 31), dt.date(2021, 1, 1)], pa.date32()
        ),
        "note": pa.array(["mail a@b.co", None, "ssn 123-45-6789", "none"]),
    }
)

CASES = [
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
    ("cape_bucket(age, 10)", {"type": "bucket", "width": 10}, "age"),
    ("cape_bucket(age, 10, 5)", {"type": "bucket", "width": 10, "origin": 5}, "age"),
    ("cape_bucket_date(born, 'quarter')", {"type": "bucket", "unit": "quarter"}, "born"),
    (
        "cape_generalize_prefix(card, 6, '*')",
        {"type": "generalize", "prefix": 6, "fill": "*"},
        "card",
    ),
    ("cape_scrub_text(note)", {"type": "text-scrub"}, "note"),
    ("cape_scrub_text(note, 'mask')", {"type": "text-scrub", "replace": "mask"}, "note"),
]


@pytest.fixture(scope="module")
def udfs(spark: Any) -> list[str]:
    spark.createDataFrame(ROWS).createOrReplaceTempView("families")
    return register_udfs(spark, keys=KEYS)


@pytest.mark.parametrize(("sql", "transform", "column"), CASES, ids=[c[0] for c in CASES])
def test_udf_equals_policy_path(
    spark: Any, udfs: list[str], sql: str, transform: dict, column: str
) -> None:
    got = spark.sql(f"SELECT id, {sql} AS v FROM families ORDER BY id").toArrow()
    policy = {
        "label": "f",
        "rules": [{"match": {"name": column}, "actions": [{"transform": transform}]}],
    }
    want = apply_arrow(policy, ROWS, keys=KEYS, audit=MemorySink())
    assert got.column("v").to_pylist() == want.column(column).to_pylist()


def test_fpe_reveal_round_trips(spark: Any, udfs: list[str]) -> None:
    rows = spark.sql(
        "SELECT card, cape_fpe_reveal(cape_fpe(card, 'f', 10, 't'), 'f', 10, 't') AS back "
        "FROM families"
    ).collect()
    assert [r["back"] for r in rows] == [r["card"] for r in rows]
