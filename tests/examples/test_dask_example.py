"""examples/dask_accessor.py runs end to end and writes what its audit record says."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("dask.dataframe")

from cape_pipelines.cli import demo_paths

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "dask_accessor.py"


@pytest.mark.dask
@pytest.mark.parametrize("distributed", [False, True], ids=["threads", "distributed"])
def test_dask_example_writes_protected_parquet(tmp_path: pathlib.Path, distributed: bool) -> None:
    import pandas as pd

    out, audit = tmp_path / "out", tmp_path / "audit.jsonl"
    argv = [sys.executable, str(EXAMPLE), "--output", str(out), "--audit", str(audit)]
    proc = subprocess.run(
        argv + (["--distributed"] if distributed else []),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
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
