"""SIGTERM and SIGHUP (what Kubernetes, Airflow and systemd send) stop ``cape apply`` like Ctrl-C.

A real ``cape apply`` subprocess gets the real signal mid-run: the temporary
output is removed, the destination is never created, ``run.failed`` is in the
audit file, and the exit code is 128 + the signal (143, 129).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

POLICY = """\
label: signals
rules:
  - match: {name: email}
    actions:
      - transform: {type: tokenizer, key: {secret: tok}}
"""


def _big_csv(path: Path, rows: int) -> None:
    with path.open("w", encoding="utf-8") as fh:
        fh.write("id,email\n")
        fh.writelines(f"{i},user{i}@example.com\n" for i in range(rows))


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_stop_signal_mid_run_leaves_nothing_and_records_the_failure(tmp_path, sig, code):
    (tmp_path / "p.yaml").write_text(POLICY)
    _big_csv(tmp_path / "in.csv", 300_000)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {**os.environ, "CAPE_KEY_TOK": "ab" * 32}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cape_pipelines.cli",
            "apply",
            "--policy",
            str(tmp_path / "p.yaml"),
            "--input",
            str(tmp_path / "in.csv"),
            "--output",
            str(out_dir / "o.parquet"),
            "--batch-size",
            "2000",
            "--no-progress",
            "--audit-file",
            str(tmp_path / "a.jsonl"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.endswith(".cape-tmp") for p in out_dir.iterdir()):
            assert proc.poll() is None, f"finished before it could be signalled: {proc.stderr}"
            assert time.monotonic() < deadline, "no temporary output within 60 s"
            time.sleep(0.01)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == f"cape: terminated by {signal.Signals(sig).name}"
    assert list(out_dir.iterdir()) == []  # temp removed, destination never created
    last = json.loads((tmp_path / "a.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "run.failed"
    assert last["error"]["type"] == "Terminated"
