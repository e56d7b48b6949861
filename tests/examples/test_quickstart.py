"""examples/quickstart.py runs to the end (its own asserts check what it shows)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"


def test_quickstart_runs():
    proc = subprocess.run(
        [sys.executable, str(QUICKSTART)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "policy customers-demo v1" in proc.stdout
    assert "revealed" in proc.stdout
    assert "run.completed" in proc.stdout
