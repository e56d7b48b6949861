"""``import cape_pipelines`` works without each engine; its adapter names the extra to install.

Each test runs a fresh interpreter in which a meta-path finder makes the
engine's package unimportable, as if it were not installed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = r"""
import importlib, importlib.abc, sys

BLOCKED = sys.argv[1]

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == BLOCKED or name.startswith(BLOCKED + "."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())

import pandas as pd
import pyarrow as pa
import cape_pipelines
from cape_pipelines.audit import MemorySink

policy = {"label": "t", "rules": [{"match": {"name": "ssn"}, "actions": ["drop"]}]}
frame = cape_pipelines.apply_policy(policy, pd.DataFrame({"a": [1], "ssn": ["x"]}),
                                    audit=MemorySink())
table = cape_pipelines.apply_policy(policy, pa.table({"a": [1], "ssn": ["x"]}),
                                    audit=MemorySink())
assert list(frame.columns) == ["a"] and table.column_names == ["a"]
assert BLOCKED not in sys.modules, "the core imported the engine"
try:
    importlib.import_module(sys.argv[2])
except ImportError as exc:
    print("ADAPTER-ERROR:", exc)
else:
    print("ADAPTER-IMPORTED")
"""

ENGINES = [
    # (extra, the engine's top-level package, the adapter)
    ("beam", "apache_beam", "cape_pipelines.beam"),
    ("dask", "dask", "cape_pipelines.dask"),
    ("spark", "pyspark", "cape_pipelines.spark"),
]


@pytest.mark.parametrize(("extra", "package", "adapter"), ENGINES, ids=[e[0] for e in ENGINES])
def test_core_works_and_adapter_names_the_extra(extra: str, package: str, adapter: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, package, adapter],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ADAPTER-ERROR:" in proc.stdout, proc.stdout
    assert f"pip install 'cape-pipelines[{extra}]'" in proc.stdout or (
        f"pip install cape-pipelines[{extra}]" in proc.stdout
    ), proc.stdout
