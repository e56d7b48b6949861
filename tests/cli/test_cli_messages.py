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
