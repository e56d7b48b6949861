"""The installed ``cape`` console script, run as a subprocess: exit codes and stderr."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _cli_support import CSV_TEXT, DROP_SSN, write

CAPE = shutil.which("cape", path=str(Path(sys.executable).parent)) or shutil.which("cape")


def _cape(*args, cwd):
    if CAPE is None:
        pytest.skip("the cape console script is not installed")
    env = {k: v for k, v in os.environ.items() if k != "CAPE_AUDIT_FILE"}
    return subprocess.run(
        [CAPE, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
        check=False,
    )


def test_console_script_applies_a_policy(tmp_path):
    pol = write(tmp_path / "p.yaml", DROP_SSN)
    src = write(tmp_path / "in.csv", CSV_TEXT)
    p = _cape(
        "apply",
        "--policy",
        pol,
        "--input",
        src,
        "--output",
        "o.parquet",
        "--audit-file",
        "a.jsonl",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "o.parquet").exists()
    assert "\r" not in p.stderr  # stderr is a pipe: no progress bar


@pytest.mark.parametrize(
    ("args", "code", "first_line"),
    [
        (["policy", "validate", "bad.yaml"], 1, "cape: error: invalid policy bad.yaml"),
        (["apply", "--policy", "p.yaml"], 2, "usage: cape apply"),
        (["frobnicate"], 2, "usage: cape"),
    ],
    ids=["malformed-policy", "missing-arguments", "unknown-command"],
)
def test_console_script_exit_codes(tmp_path, args, code, first_line):
    write(tmp_path / "bad.yaml", "label: t\nrules: [\n")
    p = _cape(*args, cwd=tmp_path)
    assert p.returncode == code
    assert p.stderr.startswith(first_line), p.stderr
    assert "Traceback" not in p.stderr
