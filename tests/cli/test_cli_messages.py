"""CLI messages a user can act on (issue 8): encodings, pipes, keys, reveal, CSV types, audit."""

from __future__ import annotations

import codecs
import os
import sys

import pytest
from _cli_support import DROP_SSN, run, write

KEYED = """
label: keyed
rules:
  - match: {name: name}
    actions:
      - transform: {type: tokenizer, key: {secret: name-key}}
"""


# ---------------------------------------------------------------- encodings


@pytest.mark.parametrize(
    ("data", "where", "hint"),
    [
        (b"id,n\xe9m\n1,x\n", "byte 4 (header)", "--encoding"),
        (codecs.BOM_UTF16_LE + "id,ssn\n1,x\n".encode("utf-16-le"), "byte 0", "--encoding utf-16"),
        (b"id,name\n1,ok\n2,\xe9t\xe9\n", "byte 15 (column 'name')", "--encoding"),
    ],
)
def test_a_csv_that_is_not_utf8_is_a_data_error_naming_the_byte(
    tmp_path, capsys, data, where, hint
):
    pol = write(tmp_path / "p.yaml", DROP_SSN)
    src = tmp_path / "in.csv"
    src.write_bytes(data)
    r = run(capsys, "apply", "--policy", pol, "--input", src, "--output", tmp_path / "o.csv")
    assert r.code == 1, r.err
    last = r.err.strip().splitlines()[-1]
    assert last.startswith(f"cape: error: {src}: not utf-8 text at {where}"), last
    assert hint in last
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.parametrize(
    ("encoding", "data"),
    [
        ("latin-1", "id,name,ssn\n1,Zoë,900\n".encode("latin-1")),
        ("utf-16", "id,name,ssn\n1,Zoë,900\n".encode("utf-16")),
        ("cp1252", "id,name,ssn\n1,Zoë €,900\n".encode("cp1252")),
    ],
)
def test_encoding_reads_such_files(tmp_path, capsys, encoding, data):
    pol = write(tmp_path / "p.yaml", DROP_SSN)
    src = tmp_path / "in.csv"
    src.write_bytes(data)
    out = tmp_path / "o.csv"
    r = run(
        capsys, "apply", "--policy", pol, "--input", src, "--output", out, "--encoding", encoding
    )
    assert r.code == 0, r.err
    text = out.read_text(encoding="utf-8")
    assert "Zoë" in text and "ssn" not in text


def test_an_unknown_encoding_is_refused(tmp_path, capsys):
    pol = write(tmp_path / "p.yaml", DROP_SSN)
    src = write(tmp_path / "in.csv", "id,ssn\n1,x\n")
    r = run(
        capsys,
        "apply",
        "--policy",
        pol,
        "--input",
        src,
        "--output",
        tmp_path / "o.csv",
        "--encoding",
        "klingon",
    )
    assert r.code == 1
    assert "--encoding klingon: unknown encoding" in r.err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX FIFOs")
def test_a_fifo_input_says_it_is_not_a_regular_file(tmp_path, capsys):
    pol = write(tmp_path / "p.yaml", DROP_SSN)
    fifo = tmp_path / "in.csv"
    os.mkfifo(fifo)
    r = run(capsys, "apply", "--policy", pol, "--input", fifo, "--output", tmp_path / "o.csv")
    assert r.code == 1
    assert f"input {fifo} is not a regular file or a directory" in r.err


@pytest.mark.spark
def test_no_progress_turns_off_sparks_console_bar():
    # PySpark counts as a shell, where Spark shows "[Stage 0:>" bars on stderr.
    script = (
        "from cape_pipelines.spark.files import session\n"
        "s = session(console_progress=False)\n"
        "print(s.sparkContext.getConf().get('spark.ui.showConsoleProgress'))\n"
        "s.stop()\n"
    )
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "false"


# ---------------------------------------------------------------- messages in CLI terms


def test_a_missing_key_names_the_cli_ways_to_give_it(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CAPE_KEY_NAME_KEY", raising=False)
    pol = write(tmp_path / "p.yaml", KEYED)
    src = write(tmp_path / "in.csv", "id,name\n1,Ada\n")
    r = run(capsys, "apply", "--policy", pol, "--input", src, "--output", tmp_path / "o.csv")
    assert r.code == 1
    last = r.err.strip().splitlines()[-1]
    assert "keys=" not in last
    assert "--key name-key=HEX" in last and "--keys-file" in last and "CAPE_KEY_NAME_KEY" in last


def test_reveal_of_an_absent_column_names_the_columns_not_a_policy(tmp_path, capsys):
    src = write(tmp_path / "in.csv", "id,phone\n1,00ff\n")
    r = run(
        capsys,
        "reveal",
        "--input",
        src,
        "--output",
        tmp_path / "o.csv",
        "--columns",
        "nosuch",
        "--key",
        "k=" + "ab" * 32,
    )
    assert r.code == 1
    last = r.err.strip().splitlines()[-1]
    assert last == f"cape: error: --columns: no column 'nosuch' in {src} (columns: id, phone)"
    assert "on_missing_column" not in r.err


def test_a_pinned_type_error_names_the_column(tmp_path, capsys):
    pol = write(tmp_path / "p.yaml", DROP_SSN)
    src = write(tmp_path / "in.csv", "id,zip,ssn\n1,AB12,x\n")
    r = run(
        capsys,
        "apply",
        "--policy",
        pol,
        "--input",
        src,
        "--output",
        tmp_path / "o.csv",
        "--csv-type",
        "zip=int64",
    )
    assert r.code == 1
    last = r.err.strip().splitlines()[-1]
    assert "column 'zip': value is not a valid int64" in last
    assert "--csv-type zip=" in last and "AB12" not in last


def test_a_header_only_csv_hints_at_csv_type(tmp_path, capsys):
    pol = write(
        tmp_path / "p.yaml",
        """
        label: r
        rules:
          - match: {name: age}
            actions:
              - transform: {type: numeric-rounding, precision: -1}
        """,
    )
    src = write(tmp_path / "in.csv", "id,age\n")
    r = run(capsys, "apply", "--policy", pol, "--input", src, "--output", tmp_path / "o.csv")
    assert r.code == 1
    last = r.err.strip().splitlines()[-1]
    assert "the CSV has no data rows" in last and "--csv-type COLUMN=TYPE" in last


def test_readme_using_it_commands_run_on_the_written_samples(tmp_path, capsys, monkeypatch):
    # README "Using it": where policy.yaml, customers.csv and keys.yaml come from.
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "demo", "--write-samples", "try").code == 0
    monkeypatch.chdir(tmp_path / "try")
    assert sorted(p.name for p in (tmp_path / "try").iterdir()) == [
        "customers.csv",
        "keys.yaml",
        "policy.yaml",
    ]
    steps = [
        ["policy", "validate", "policy.yaml"],
        ["policy", "plan", "policy.yaml", "--data", "customers.csv"],
        [
            "apply",
            "--policy",
            "policy.yaml",
            "--input",
            "customers.csv",
            "--output",
            "protected.parquet",
            "--keys-file",
            "keys.yaml",
            "--audit-file",
            "audit.jsonl",
        ],
        [
            "reveal",
            "--input",
            "protected.parquet",
            "--output",
            "revealed.csv",
            "--columns",
            "phone",
            "--key",
            "demo-phone-key",
            "--keys-file",
            "keys.yaml",
        ],
    ]
    for argv in steps:
        r = run(capsys, *argv)
        assert r.code == 0, (argv, r.err)
    # a second --write-samples never replaces files
    monkeypatch.chdir(tmp_path)
    r = run(capsys, "demo", "--write-samples", "try")
    assert r.code == 1 and "already exist" in r.err
