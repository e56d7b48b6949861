"""examples/spark_sql_udfs.py runs end to end on the shared session and writes what it audits."""

from __future__ import annotations

import importlib.util
import json
import pathlib
from typing import Any

import pytest

pytest.importorskip("pyspark")

from cape_pipelines.cli import demo_paths

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "spark_sql_udfs.py"


def _load_example() -> Any:
    spec = importlib.util.spec_from_file_location("spark_sql_udfs", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.spark
def test_spark_example_writes_protected_parquet(spark: Any, tmp_path: pathlib.Path) -> None:
    import pandas as pd

    out, audit = tmp_path / "out", tmp_path / "audit.jsonl"
    assert _load_example().main(["--output", str(out), "--audit", str(audit)], spark=spark) == 0
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [r["event"] for r in records] == ["run.started", "run.completed"]
    written = pd.read_parquet(out)
    source = pd.read_csv(demo_paths()[0])
    assert len(written) == records[-1]["rows_out"] > 0
    assert records[-1]["rows_in"] == len(source)
    assert "ssn" not in written.columns
    assert (written["age"] >= 18).all()
    assert written["email"].str.fullmatch(r"[0-9a-f]{32}").all()
    assert not set(written["email"]) & set(source["email"])
