"""Runs examples/beam_pipeline.py on the bundled sample data and checks what it wrote."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("apache_beam")

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from cape_pipelines.cli import demo_paths

pytestmark = pytest.mark.beam

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "beam_pipeline.py"
DATA, DEMO_POLICY = demo_paths()

# Only transformations every checkout has, so this runs while others are being written.
BASIC_POLICY = {
    "label": "customers-basic",
    "rules": [
        {
            "actions": [
                {"transform": {"type": "row-redact", "condition": "age < 18 or age is null"}}
            ]
        },
        {"match": {"names": ["ssn", "phone", "email", "name"]}, "actions": ["drop"]},
    ],
}


def _example():
    spec = importlib.util.spec_from_file_location("beam_pipeline_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, policy_file: Path) -> tuple[pa.Table, list[dict]]:
    out = tmp_path / "out" / "customers"
    audit = tmp_path / "audit.jsonl"
    files = _example().main(
        ["--output", str(out), "--policy", str(policy_file), "--audit", str(audit)]
    )
    assert files, "the example wrote no Parquet file"
    table = pa.concat_tables(pq.read_table(f) for f in files)
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    return table, records


def test_example_applies_a_policy_to_the_sample_data(tmp_path):
    policy_file = tmp_path / "basic.json"
    policy_file.write_text(json.dumps(BASIC_POLICY))
    source = pacsv.read_csv(DATA)
    table, records = _run(tmp_path, policy_file)
    adults = source.filter(pc.fill_null(pc.greater_equal(source["age"], 18), False))
    assert table.schema.names == [
        n for n in source.schema.names if n not in ("ssn", "phone", "email", "name")
    ]
    assert sorted(table["customer_id"].to_pylist()) == sorted(adults["customer_id"].to_pylist())
    assert [r["event"] for r in records] == ["run.started", "run.completed"]
    assert records[1]["rows_in"] == source.num_rows
    assert records[1]["rows_out"] == adults.num_rows


def test_example_runs_the_demo_policy(tmp_path):
    source = pacsv.read_csv(DATA)
    table, records = _run(tmp_path, DEMO_POLICY)
    assert "ssn" not in table.schema.names
    assert table.num_rows == records[1]["rows_out"] > 0
    emails = set(source["email"].to_pylist())
    assert not emails & set(table["email"].to_pylist())
