"""The core and ``cape apply`` work without pandas (it is the optional ``pandas`` extra).

pandas is made unimportable in a subprocess (a stand-in package that raises
ModuleNotFoundError, as an absent one does); every built-in transformation
family then runs on Arrow tables and through the CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import datetime as dt, sys
    import pyarrow as pa
    import cape_pipelines as cape
    from cape_pipelines.cli import main

    assert "pandas" not in sys.modules
    k = {"secret": "k"}
    policy = {"label": "no-pandas", "rules": [
        {"match": {"name": "i"}, "actions": [
            {"transform": {"type": "numeric-rounding", "precision": -1}}]},
        {"match": {"name": "f"}, "actions": [
            {"transform": {"type": "numeric-perturbation", "min": -1, "max": 1, "key": k}},
            {"transform": {"type": "numeric-rounding", "precision": 2}}]},
        {"match": {"name": "s"}, "actions": [{"transform": {"type": "tokenizer", "key": k}}]},
        {"match": {"name": "r"}, "actions": [
            {"transform": {"type": "reversible-tokenizer", "key": k}}]},
        {"match": {"name": "d"}, "actions": [
            {"transform": {"type": "date-perturbation", "frequency": "DAY", "min": -2,
                           "max": 2, "key": k}},
            {"transform": {"type": "date-truncation", "frequency": "month"}}]},
        {"actions": [{"transform": {"type": "row-redact", "condition": "i > 1000"}}]},
    ]}
    table = pa.table({"i": [15, 2000], "f": [1.5, 2.5], "s": ["a", "b"], "r": ["x", "y"],
                      "d": [dt.date(2020, 5, 17), dt.date(2021, 1, 1)]})
    out = cape.apply_policy(policy, table, keys={"k": bytes(range(32))})
    assert out.num_rows == 1 and out.column("i").to_pylist() == [20], out
    path = sys.argv[1]
    open(path + "/in.csv", "w").write("i,s\\n15,a\\n")
    open(path + "/p.yaml", "w").write("label: t\\nrules: [{match: {name: i}, "
                                       "actions: [{transform: {type: numeric-rounding, "
                                       "precision: -1}}]}]\\n")
    code = main(["apply", "--policy", path + "/p.yaml", "--input", path + "/in.csv",
                 "--output", path + "/out.parquet"])
    assert code == 0
    assert "pandas" not in sys.modules or sys.modules["pandas"] is None
    print("OK")
    """
)


def test_core_and_cli_run_without_pandas(tmp_path: Path) -> None:
    fake = tmp_path / "site" / "pandas"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'pandas'\")\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")
