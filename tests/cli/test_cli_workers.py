"""``cape apply --workers N``: forked workers, output in input order, byte for byte the same.

Each test runs a real multi-batch input so that the pool is used (one batch
is done in-process). The output with 2 workers must be the very bytes of the
output with 1 (same ``--run-id``, which the files carry), on every output
format; the audit run must count every row exactly once; a stop signal, a
Ctrl-C to the process group or a worker killed by the system must leave no
temporary file, record ``run.failed`` and leave no worker process behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from cape_pipelines.inputs import InputSet
from tests.cli._cli_support import run

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fork and POSIX signals")

POLICY = """\
label: workers
rules:
  - match: {name: email}
    actions:
      - transform: {type: tokenizer, key: {secret: tok}}
  - match: {name: name}
    actions:
      - transform: {type: reversible-tokenizer, key: {secret: siv}}
  - match: {name: score}
    actions:
      - transform: {type: numeric-rounding, precision: 1}
  - actions:
      - transform: {type: row-redact, condition: "age < 18"}
"""
KEYS = {"CAPE_KEY_TOK": "ab" * 32, "CAPE_KEY_SIV": "cd" * 32}


def _csv(path: Path, rows: int, start: int = 0) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        fh.write("id,name,email,age,score\n")
        fh.writelines(
            f"{i},n{i % 997},user{i % 4001}@example.com,{i % 90},{(i * 37 % 1000) / 7}\n"
            for i in range(start, start + rows)
        )
    return path


def _apply(capsys, tmp_path: Path, src: Path, out: Path, workers: int, *extra: str):
    return run(
        capsys,
        "apply",
        "--policy",
        tmp_path / "p.yaml",
        "--input",
        src,
        "--output",
        out,
        "--batch-size",
        "1000",
        "--workers",
        str(workers),
        "--run-id",
        "00000000-0000-4000-8000-000000000001",
        "--no-progress",
        "--audit-file",
        tmp_path / f"audit-{workers}-{out.suffix[1:]}.jsonl",
        *extra,
    )


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_two_workers_write_the_bytes_one_writes(capsys, tmp_path, keyed, suffix):
    (tmp_path / "p.yaml").write_text(POLICY)
    # A directory of files, the last batch of each file short: batches of unequal sizes.
    src = tmp_path / "in"
    src.mkdir()
    _csv(src / "a.csv", 4_500)
    _csv(src / "b.csv", 2_300, start=4_500)
    one = _apply(capsys, tmp_path, src, tmp_path / f"one{suffix}", 1)
    two = _apply(capsys, tmp_path, src, tmp_path / f"two{suffix}", 2)
    assert one.code == 0 and two.code == 0, (one.err, two.err)
    assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()
    records = [
        json.loads(line)
        for w in (1, 2)
        for line in (tmp_path / f"audit-{w}-{suffix[1:]}.jsonl").read_text().splitlines()
    ]
    done = [r for r in records if r["event"] == "run.completed"]
    assert len(done) == 2
    kept = sum(1 for i in range(6_800) if i % 90 >= 18)
    for r in done:
        assert (r["rows_in"], r["rows_out"], r["rows_redacted"]) == (6_800, kept, 6_800 - kept)
    # The two runs differ only in time and their record ids.
    varying = {"ts", "time", "timestamp", "duration_s", "record_id", "seq", "prev_hash", "hash"}
    same = [{k: v for k, v in d.items() if k not in varying} for d in done]
    assert same[0] == same[1]


def _parquet(path: Path, rows: int, row_group: int, start: int = 0) -> Path:
    table = pacsv.read_csv(_csv(path.with_suffix(".csv"), rows, start))
    path.with_suffix(".csv").unlink()
    pq.write_table(table, path, row_group_size=row_group)
    return path


# Row groups (of 1,000-row batches): aligned, smaller and straddling batches, larger
# (then the parent reads that file itself), and uneven files in a directory.
@pytest.mark.parametrize("groups", [(1_000, 1_000), (300, 700), (2_500, 2_500), (1_000, 2_500)])
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_parquet_read_by_the_workers_gives_the_bytes_one_process_writes(
    capsys, tmp_path, keyed, groups, suffix
):
    (tmp_path / "p.yaml").write_text(POLICY)
    src = tmp_path / "in"
    src.mkdir()
    _parquet(src / "a.parquet", 4_500, groups[0])
    _parquet(src / "b.parquet", 2_300, groups[1], start=4_500)
    one = _apply(capsys, tmp_path, src, tmp_path / f"one{suffix}", 1)
    two = _apply(capsys, tmp_path, src, tmp_path / f"two{suffix}", 2)
    assert one.code == 0 and two.code == 0, (one.err, two.err)
    assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()
    done = [
        json.loads((tmp_path / f"audit-{w}-{suffix[1:]}.jsonl").read_text().splitlines()[-1])
        for w in (1, 2)
    ]
    kept = sum(1 for i in range(6_800) if i % 90 >= 18)
    for r in done:
        assert r["event"] == "run.completed"
        assert (r["rows_in"], r["rows_out"], r["rows_redacted"]) == (6_800, kept, 6_800 - kept)


def test_with_workers_the_parent_does_not_decode_parquet_input(
    capsys, tmp_path, keyed, monkeypatch
):
    (tmp_path / "p.yaml").write_text(POLICY)
    src = _parquet(tmp_path / "in.parquet", 6_000, 1_000)
    decoded: list[int] = []
    real = InputSet.file_batches

    def counted(self, path, batch_size=65_536):
        for batch in real(self, path, batch_size):
            decoded.append(os.getpid())
            yield batch

    monkeypatch.setattr(InputSet, "file_batches", counted)
    two = _apply(capsys, tmp_path, src, tmp_path / "two.parquet", 2)
    assert two.code == 0, two.err
    # Each worker read its own rows (the forks' counts never reach this list).
    assert decoded == []


def test_a_parquet_error_in_a_worker_names_the_file_and_rows_as_one_process_does(
    capsys, tmp_path, monkeypatch
):
    (tmp_path / "p.yaml").write_text(
        "label: bad\nrules:\n  - match: {name: email}\n    actions:\n"
        "      - transform: {type: token-reverser, key: {secret: siv}}\n"
    )
    monkeypatch.setenv("CAPE_KEY_SIV", KEYS["CAPE_KEY_SIV"])
    src = _parquet(tmp_path / "in.parquet", 3_500, 700)
    one = _apply(capsys, tmp_path, src, tmp_path / "one.csv", 1)
    two = _apply(capsys, tmp_path, src, tmp_path / "two.csv", 2)
    assert one.code == two.code != 0
    assert "in the batch of data rows 1-1000" in one.err
    assert one.err == two.err
    assert not (tmp_path / "two.csv").exists()


def test_an_error_in_a_worker_names_the_file_and_rows_as_one_process_does(
    capsys, tmp_path, monkeypatch
):
    (tmp_path / "p.yaml").write_text(
        "label: bad\nrules:\n  - match: {name: email}\n    actions:\n"
        "      - transform: {type: token-reverser, key: {secret: siv}}\n"
    )
    # monkeypatch, not os.environ: a key left in the environment changes where later
    # tests' keys come from (test_worker_keys found it).
    monkeypatch.setenv("CAPE_KEY_SIV", KEYS["CAPE_KEY_SIV"])
    src = _csv(tmp_path / "in.csv", 3_500)
    one = _apply(capsys, tmp_path, src, tmp_path / "one.csv", 1)
    two = _apply(capsys, tmp_path, src, tmp_path / "two.csv", 2)
    assert one.code == two.code != 0
    assert "in the batch of data rows 1-1000" in one.err
    assert one.err == two.err
    assert sorted(p.name for p in tmp_path.iterdir() if "cape-tmp" in p.name) == []
    assert not (tmp_path / "two.csv").exists()


def _start(
    tmp_path: Path, rows: int, workers: int, fmt: str = "csv", **popen
) -> subprocess.Popen[str]:
    (tmp_path / "p.yaml").write_text(POLICY)
    if fmt == "csv":
        src = _csv(tmp_path / "in.csv", rows)
    else:  # the workers read their own row groups
        src = _parquet(tmp_path / "in.parquet", rows, 2_000)
    (tmp_path / "out").mkdir()
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cape_pipelines.cli",
            "apply",
            "--policy",
            str(tmp_path / "p.yaml"),
            "--input",
            str(src),
            "--output",
            str(tmp_path / "out" / "o.parquet"),
            "--batch-size",
            "2000",
            "--workers",
            str(workers),
            "--no-progress",
            "--audit-file",
            str(tmp_path / "a.jsonl"),
        ],
        env={**os.environ, **KEYS},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _workers_once_running(proc: subprocess.Popen[str], out_dir: Path, count: int) -> list[Any]:
    deadline = time.monotonic() + 60
    parent = psutil.Process(proc.pid)
    while True:
        assert proc.poll() is None, f"finished before it could be signalled: {proc.stderr}"
        assert time.monotonic() < deadline, "no workers and temporary output within 60 s"
        children = parent.children()
        if len(children) >= count and any(p.name.endswith(".cape-tmp") for p in out_dir.iterdir()):
            return children
        time.sleep(0.01)


def _finish(proc: subprocess.Popen[str]) -> str:
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return err


def _assert_clean(tmp_path: Path, children: list[Any], error_type: str | None) -> None:
    assert list((tmp_path / "out").iterdir()) == []  # temp removed, destination never created
    last = json.loads((tmp_path / "a.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "run.failed"
    if error_type:
        assert last["error"]["type"] == error_type
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_sigterm_with_workers_stops_them_and_leaves_nothing(tmp_path, fmt):
    proc = _start(tmp_path, 400_000, 2, fmt)
    children = _workers_once_running(proc, tmp_path / "out", 2)
    proc.send_signal(signal.SIGTERM)
    err = _finish(proc)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "cape: terminated by SIGTERM"
    _assert_clean(tmp_path, children, "Terminated")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_ctrl_c_to_the_process_group_stops_parent_and_workers(tmp_path, fmt):
    proc = _start(tmp_path, 400_000, 2, fmt, start_new_session=True)
    children = _workers_once_running(proc, tmp_path / "out", 2)
    # A terminal sends Ctrl-C to every process of the foreground group.
    os.killpg(proc.pid, signal.SIGINT)
    err = _finish(proc)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "cape: interrupted"
    _assert_clean(tmp_path, children, None)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_worker_killed_by_the_system_fails_the_run_instead_of_hanging(tmp_path, fmt):
    proc = _start(tmp_path, 400_000, 2, fmt)
    children = _workers_once_running(proc, tmp_path / "out", 2)
    children[0].kill()  # what the out-of-memory killer does
    err = _finish(proc)
    assert proc.returncode not in (0, None), err
    assert "stopped unexpectedly" in err
    _assert_clean(tmp_path, children, None)


def test_workers_refused_for_engines_with_their_own_parallelism(capsys, tmp_path, keyed):
    (tmp_path / "p.yaml").write_text(POLICY)
    src = _csv(tmp_path / "in.csv", 10)
    res = _apply(capsys, tmp_path, src, tmp_path / "o.csv", 2, "--engine", "dask")
    assert res.code != 0
    assert "--workers is for --engine pandas" in res.err


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_workers_end_when_the_parent_is_killed(tmp_path, fmt):
    # SIGKILL (the out-of-memory killer, kill -9) gives the parent no chance to stop
    # them: the workers notice their parent is gone and exit instead of waiting forever.
    proc = _start(tmp_path, 400_000, 2, fmt)
    children = _workers_once_running(proc, tmp_path / "out", 2)
    proc.kill()
    proc.communicate(timeout=60)
    _, alive = psutil.wait_procs(children, timeout=15)
    for p in alive:
        p.kill()
    assert alive == []
