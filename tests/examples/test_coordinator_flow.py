"""examples/coordinator_flow.py end to end: init, review, Dask and Spark by label, runs, verify."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from typing import Any

import pytest

pytest.importorskip("pyspark")
pytest.importorskip("dask.dataframe")
pytest.importorskip("fastapi")

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "coordinator_flow.py"


def _load_example() -> Any:
    spec = importlib.util.spec_from_file_location("coordinator_flow", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Its dataclass looks its module up in sys.modules while the class is made.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.spark
@pytest.mark.dask
@pytest.mark.coordinator
def test_coordinator_flow(spark: Any, tmp_path: pathlib.Path, capsys) -> None:
    import pandas as pd
    import requests

    from cape_pipelines.cli import demo_paths

    flow = _load_example()
    result = flow.run_flow(tmp_path, spark)
    out = capsys.readouterr().out

    assert result.self_approval_refused
    assert "403 self_approval" in out
    assert result.same_tokens
    assert result.verified
    assert flow.succeeded(result)
    source = pd.read_csv(demo_paths()[0])
    adults = int((source["age"] >= 18).sum())
    assert sorted((r["engine"], r["status"], r["rows_in"], r["rows_out"]) for r in result.runs) == [
        ("dask", "succeeded", len(source), adults),
        ("spark", "succeeded", len(source), adults),
    ]
    assert all(r["label"] == result.label and r["version"] == result.version for r in result.runs)
    # The server was stopped: nothing answers on its port any more.
    with pytest.raises(requests.ConnectionError):
        requests.get(result.url + "/healthz", timeout=5)
    for number in range(1, 9):
        assert f"== {number}. " in out
    written = pd.read_parquet(tmp_path / "spark-output")
    assert "ssn" not in written.columns
    assert not set(written["email"]) & set(source["email"])
