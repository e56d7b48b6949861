"""`cape apply` and `cape reveal`: formats, metadata, audit records, progress, determinism."""

from __future__ import annotations

import io
import json
import sys
from datetime import datetime

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from _cli_support import CSV_TEXT, DROP_AND_MINORS, DROP_SSN, KEY_HEX, leftovers, run, write

from cape_pipelines.io import ROW_GROUP_SIZE, ParquetOut, Progress, read_output_metadata
from cape_pipelines.policy import load_policy


@pytest.fixture
def files(tmp_path):
    """A policy that drops ssn and removes minors, and the small CSV input."""
    return (
        write(tmp_path / "policy.yaml", DROP_AND_MINORS),
        write(tmp_path / "in.csv", CSV_TEXT),
    )


def _audit(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_csv_to_csv(tmp_path, capsys, files):
    pol, src = files
    out = tmp_path / "out.csv"
    r = run(
        capsys,
        "apply",
        "--policy",
        pol,
        "--input",
        src,
        "--output",
        out,
        "--audit-file",
        tmp_path / "a.jsonl",
    )
    assert r.code == 0, r.err
    assert out.read_text() == (
        '"id","name","age","country","signup"\n'
        '1,"Ada",34,"US",2024-01-02 03:04:05\n'
        '4,"Dmitri",61,"FR",2024-04-05 06:07:08\n'
    )
    assert leftovers(tmp_path) == []
    assert "wrote" in r.err and "2 rows (2 redacted)" in r.err


def test_csv_to_parquet_stamps_metadata_and_audit_run(tmp_path, capsys, files):
    pol, src = files
    out = tmp_path / "out.parquet"
    audit = tmp_path / "a.jsonl"
    r = run(
        capsys, "apply", "--policy", pol, "--input", src, "--output", out, "--audit-file", audit
    )
    assert r.code == 0, r.err
    table = pq.read_table(out)
    assert table.column_names == ["id", "name", "age", "country", "signup"]
    assert table.column("id").to_pylist() == [1, 4]
    assert table.schema.field("signup").type == pa.timestamp("ms")  # Parquet stores s as ms
    policy = load_policy(pol)
    records = _audit(audit)
    assert [r["event"] for r in records] == ["run.started", "policy.fetched", "run.completed"]
    run_id = records[0]["run_id"]
    assert {r["run_id"] for r in records} == {run_id}
    assert read_output_metadata(out) == {
        "cape.policy.label": "test-minors",
        "cape.policy.version": "1",
        "cape.policy.sha256": policy.sha256,
        "cape.run_id": run_id,
    }
    done = records[-1]
    expected = {"label": "test-minors", "version": 1, "sha256": policy.sha256}
    assert all(record["policy"] == expected for record in records)
    assert (done["rows_in"], done["rows_out"], done["rows_redacted"]) == (4, 2, 2)
    assert done["engine"] == "pandas"
    assert records[1]["source"] == str(pol)


def test_parquet_directory_to_parquet(tmp_path, capsys):
    pol = write(tmp_path / "p.yaml", DROP_SSN)
    src = tmp_path / "in"
    (src / "part=b").mkdir(parents=True)
    pq.write_table(pa.table({"id": [3, 4], "ssn": ["c", "d"]}), src / "part=b" / "x.parquet")
    pq.write_table(pa.table({"id": [1, 2], "ssn": ["a", "b"]}), src / "a.parquet")
    write(src / "_SUCCESS", "")
    write(src / ".a.parquet.crc", "junk")
    out = tmp_path / "out.parquet"
    r = run(
        capsys,
        "apply",
        "--policy",
        pol,
        "--input",
        src,
        "--output",
        out,
        "--audit-file",
        tmp_path / "a.jsonl",
        "--run-id",
        "run-42",
    )
    assert r.code == 0, r.err
    table = pq.read_table(out)
    assert table.to_pydict() == {"id": [1, 2, 3, 4]}  # files in sorted path order
    meta = read_output_metadata(out)
    assert meta["cape.run_id"] == "run-42"
    assert meta["cape.policy.label"] == "test-drop"
    assert meta["cape.policy.version"] == "2"


def test_parquet_files_with_different_columns_are_refused(tmp_path, capsys):
    pol = write(tmp_path / "p.yaml", DROP_SSN)
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"id": [1], "ssn": ["a"]}), src / "a.parquet")
    pq.write_table(pa.table({"id": [2], "ssn": ["b"], "email": ["e"]}), src / "b.parquet")
    out = tmp_path / "o.parquet"
    r = run(
        capsys,
        "apply",
        "--policy",
        pol,
        "--input",
        src,
        "--output",
        out,
        "--audit-file",
        tmp_path / "a.jsonl",
    )
    assert r.code == 1
    assert "b.parquet: has extra column(s) 'email'" in r.err
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_output_bytes_do_not_depend_on_batch_size(tmp_path, capsys, files, fmt):
    pol, src = files
    outputs = []
    for size in (1, 3, 65_536):
        out = tmp_path / f"out-{size}.{fmt}"
        r = run(
            capsys,
            "apply",
            "--policy",
            pol,
            "--input",
            src,
            "--output",
            out,
            "--batch-size",
            size,
            "--run-id",
            "fixed",
            "--audit-file",
            tmp_path / "a.jsonl",
        )
        assert r.code == 0, r.err
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


def test_parquet_writer_row_groups_are_fixed_size_whatever_the_batches(tmp_path):
    table = pa.table({"x": list(range(95)), "s": [str(i) for i in range(95)]})
    written = []
    for chunk in (1, 7, 95):
        path = tmp_path / f"rg-{chunk}.parquet"
        writer = ParquetOut(path, table.schema, {"cape.run_id": "r"}, row_group_size=10)
        for batch in table.to_batches(max_chunksize=chunk):
            writer.write(batch)
        writer.close()
        written.append(path.read_bytes())
        meta = pq.ParquetFile(path).metadata
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [10] * 9 + [5]
    assert written[0] == written[1] == written[2]
    assert ROW_GROUP_SIZE >= 65_536


def test_nanosecond_timestamps_are_written_as_microseconds_when_exact(tmp_path, capsys):
    pol = write(tmp_path / "p.yaml", DROP_SSN)
    ts = pa.array([datetime(2024, 1, 2, 3, 4, 5, 123456), None], pa.timestamp("ns", tz="UTC"))
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"ts": ts, "ssn": ["a", "b"]}), src)
    out = tmp_path / "out.parquet"
    r = run(
        capsys,
        "apply",
        "--policy",
        pol,
        "--input",
        src,
        "--output",
        out,
        "--audit-file",
        tmp_path / "a.jsonl",
    )
    assert r.code == 0, r.err
    got = pq.read_table(out)
    assert got.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert got.column("ts").to_pylist()[0].microsecond == 123456
    column = pq.ParquetFile(out).schema.column(0)
    assert column.logical_type.to_json() == (
        '{"Type": "Timestamp", "isAdjustedToUTC": true, "timeUnit": "microseconds", '
        '"is_from_converted_type": false, "force_set_converted_type": false}'
    )


def test_sub_microsecond_timestamps_stop_the_run_unless_kept_as_ns(tmp_path, capsys):
    pol = write(tmp_path / "p.yaml", DROP_SSN)
    src = tmp_path / "in.parquet"
    ts = pa.array([1_700_000_000_000_000_001], pa.timestamp("ns"))
    pq.write_table(pa.table({"ts": ts, "ssn": ["a"]}), src)
    out = tmp_path / "out.parquet"
    args = [
        "apply",
        "--policy",
        pol,
        "--input",
        src,
        "--output",
        out,
        "--audit-file",
        tmp_path / "a.jsonl",
    ]
    r = run(capsys, *args)
    assert r.code == 1
    assert "column 'ts' has timestamps with sub-microsecond precision" in r.err
    assert "--timestamp-unit ns" in r.err
    assert not out.exists() and leftovers(tmp_path) == []
    r = run(capsys, *args, "--timestamp-unit", "ns")
    assert r.code == 0, r.err
    got = pq.read_table(out)
    assert got.schema.field("ts").type == pa.timestamp("ns")
    assert got.column("ts").cast(pa.int64()).to_pylist() == [1_700_000_000_000_000_001]


def test_csv_column_empty_in_first_block_is_read_as_string(tmp_path, capsys):
    pol = write(tmp_path / "p.yaml", DROP_SSN)
    src = write(tmp_path / "in.csv", "id,ssn,note\n1,a,\n2,b,\n")
    out = tmp_path / "o.parquet"
    r = run(
        capsys,
        "apply",
        "--policy",
        pol,
        "--input",
        src,
        "--output",
        out,
        "--audit-file",
        tmp_path / "a.jsonl",
    )
    assert r.code == 0, r.err
    assert pq.read_schema(out).field("note").type == pa.string()


def test_pinned_csv_type(tmp_path, capsys):
    pol = write(tmp_path / "p.yaml", DROP_SSN)
    src = write(tmp_path / "in.csv", "zip,ssn\n01234,a\n98765,b\n")
    out = tmp_path / "o.csv"
    r = run(
        capsys,
        "apply",
        "--policy",
        pol,
        "--input",
        src,
        "--output",
        out,
        "--csv-type",
        "zip=string",
        "--audit-file",
        tmp_path / "a.jsonl",
    )
    assert r.code == 0, r.err
    assert out.read_text() == '"zip"\n"01234"\n"98765"\n'  # leading zero kept


def test_audit_goes_to_cape_audit_file_when_no_flag(tmp_path, capsys, files, monkeypatch):
    pol, src = files
    audit = tmp_path / "env-audit.jsonl"
    monkeypatch.setenv("CAPE_AUDIT_FILE", str(audit))
    r = run(capsys, "apply", "--policy", pol, "--input", src, "--output", tmp_path / "o.csv")
    assert r.code == 0, r.err
    assert [x["event"] for x in _audit(audit)] == ["run.started", "policy.fetched", "run.completed"]


def test_audit_goes_to_stderr_only_when_asked(tmp_path, capsys, files, monkeypatch):
    # issue 8: three JSON lines before every message buried it; stderr gets the
    # records with --verbose (as log lines) or --audit-file - (as JSON lines).
    pol, src = files
    monkeypatch.delenv("CAPE_AUDIT_FILE", raising=False)
    args = ["apply", "--policy", pol, "--input", src, "--output", tmp_path / "o.csv"]
    r = run(capsys, *args)
    assert r.code == 0, r.err
    assert "cape_pipelines.audit" not in r.err and "run.started" not in r.err

    r = run(capsys, *args, "--overwrite", "--verbose")
    assert r.code == 0, r.err
    logged = [line for line in r.err.splitlines() if line.startswith("cape: cape_pipelines.audit")]
    events = [json.loads(line.split(": ", 2)[2])["event"] for line in logged]
    assert events == ["run.started", "policy.fetched", "run.completed"]

    r = run(capsys, *args, "--overwrite", "--audit-file", "-")
    assert r.code == 0, r.err
    lines = [line for line in r.err.splitlines() if line.startswith("{")]
    assert [json.loads(line)["event"] for line in lines] == [
        "run.started",
        "policy.fetched",
        "run.completed",
    ]


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, capsys, files):
    pol, src = files
    r = run(
        capsys,
        "apply",
        "--policy",
        pol,
        "--input",
        src,
        "--output",
        tmp_path / "o.csv",
        "--audit-file",
        tmp_path / "a.jsonl",
    )
    assert r.code == 0
    assert "\r" not in r.err
    assert "[" not in r.err


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal(tmp_path, files, monkeypatch):
    from cape_pipelines.cli import main

    pol, _ = files
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(range(10)), "ssn": ["x"] * 10, "age": [30] * 10}), src)
    fake = _Tty()
    monkeypatch.setattr(sys, "stderr", fake)
    code = main(
        [
            "apply",
            "--policy",
            str(pol),
            "--input",
            str(src),
            "--output",
            str(tmp_path / "o.csv"),
            "--audit-file",
            str(tmp_path / "a.jsonl"),
        ]
    )
    assert code == 0
    text = fake.getvalue()
    assert "\rcape apply [" in text
    assert "100% 10/10 rows\n" in text
    fake = _Tty()
    monkeypatch.setattr(sys, "stderr", fake)
    code = main(
        [
            "apply",
            "--policy",
            str(pol),
            "--input",
            str(src),
            "--output",
            str(tmp_path / "o2.csv"),
            "--audit-file",
            str(tmp_path / "a.jsonl"),
            "--no-progress",
        ]
    )
    assert code == 0
    assert "\r" not in fake.getvalue()


def test_progress_without_total_counts_rows():
    stream = _Tty()
    bar = Progress(stream, None)
    bar.update(5)
    bar.update(7)
    bar.close()
    assert stream.getvalue().endswith("\rcape apply 12 rows\n")
    silent = Progress(None, 10)
    silent.update(10)
    silent.close()


def test_keys_from_file_and_flag(tmp_path, capsys):
    pol = write(
        tmp_path / "p.yaml",
        """
        label: t
        rules:
          - match: {name: name}
            actions:
              - transform: {type: tokenizer, key: {secret: name-key}}
    """,
    )
    src = write(tmp_path / "in.csv", CSV_TEXT)
    keys = write(tmp_path / "keys.yaml", f"name-key: {KEY_HEX}\n")
    out1, out2 = tmp_path / "a.csv", tmp_path / "b.csv"
    r = run(
        capsys,
        "apply",
        "--policy",
        pol,
        "--input",
        src,
        "--output",
        out1,
        "--keys-file",
        keys,
        "--audit-file",
        tmp_path / "a.jsonl",
    )
    assert r.code == 0, r.err
    r = run(
        capsys,
        "apply",
        "--policy",
        pol,
        "--input",
        src,
        "--output",
        out2,
        "--key",
        f"name-key={KEY_HEX}",
        "--audit-file",
        tmp_path / "a.jsonl",
    )
    assert r.code == 0, r.err
    assert out1.read_bytes() == out2.read_bytes()
    names = pacsv.read_csv(out1).column("name").to_pylist()
    assert "Ada" not in names and len(set(names)) == 4


REVERSIBLE = """
label: t
rules:
  - match: {names: [name, country]}
    actions:
      - transform: {type: reversible-tokenizer, key: {secret: rk}}
"""


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_reveal_round_trip(tmp_path, capsys, fmt, monkeypatch):
    pol = write(tmp_path / "p.yaml", REVERSIBLE)
    src = write(tmp_path / "in.csv", CSV_TEXT)
    protected = tmp_path / f"protected.{fmt}"
    r = run(
        capsys,
        "apply",
        "--policy",
        pol,
        "--input",
        src,
        "--output",
        protected,
        "--key",
        f"rk={KEY_HEX}",
        "--audit-file",
        tmp_path / "a.jsonl",
    )
    assert r.code == 0, r.err
    revealed = tmp_path / "revealed.csv"
    monkeypatch.setenv("CAPE_KEY_RK", KEY_HEX)
    r = run(
        capsys,
        "reveal",
        "--input",
        protected,
        "--output",
        revealed,
        "--columns",
        "name,country",
        "--key",
        "rk",
        "--audit-file",
        tmp_path / "a.jsonl",
    )
    assert r.code == 0, r.err
    assert pacsv.read_csv(revealed).to_pydict() == pacsv.read_csv(src).to_pydict()


def test_reveal_invalid_token_is_an_error_or_null(tmp_path, capsys):
    src = write(tmp_path / "in.csv", "id,phone\n1,00ff00ff\n")
    out = tmp_path / "o.csv"
    args = [
        "reveal",
        "--input",
        src,
        "--output",
        out,
        "--columns",
        "phone",
        "--key",
        f"rk={KEY_HEX}",
        "--audit-file",
        tmp_path / "a.jsonl",
    ]
    r = run(capsys, *args)
    assert r.code == 1
    assert r.err.startswith("cape: error: ")
    assert "in.csv, in the batch of data rows 1-1: " in r.err
    assert "column 'phone'" in r.err
    assert "Traceback" not in r.err
    assert not out.exists() and leftovers(tmp_path) == []
    r = run(capsys, *args, "--on-error", "null")
    assert r.code == 0, r.err
    assert pacsv.read_csv(out).column("phone").null_count == 1


@pytest.mark.parametrize("spelling", ["\\t", "tab", "\t"])
def test_tab_delimited(tmp_path, capsys, spelling):
    pol = write(tmp_path / "p.yaml", DROP_SSN)
    src = write(tmp_path / "in.csv", "id\tssn\tnote\n1\ta\tx,y\n")
    out = tmp_path / "o.csv"
    r = run(
        capsys,
        "apply",
        "--policy",
        pol,
        "--input",
        src,
        "--output",
        out,
        "--delimiter",
        spelling,
        "--audit-file",
        tmp_path / "a.jsonl",
    )
    assert r.code == 0, r.err
    assert out.read_text() == '"id"\t"note"\n1\t"x,y"\n'


def test_delimiter_must_be_one_character(tmp_path, capsys):
    pol = write(tmp_path / "p.yaml", DROP_SSN)
    src = write(tmp_path / "in.csv", CSV_TEXT)
    r = run(
        capsys,
        "apply",
        "--policy",
        pol,
        "--input",
        src,
        "--output",
        tmp_path / "o.csv",
        "--delimiter",
        ";;",
        "--audit-file",
        tmp_path / "a.jsonl",
    )
    assert r.code == 1
    assert r.err.startswith("cape: error: --delimiter takes one character")


def test_unreadable_parquet_file_in_a_directory(tmp_path, capsys):
    pol = write(tmp_path / "p.yaml", DROP_SSN)
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"id": [1], "ssn": ["a"]}), src / "a.parquet")
    (src / "b.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    out = tmp_path / "o.parquet"
    r = run(
        capsys,
        "apply",
        "--policy",
        pol,
        "--input",
        src,
        "--output",
        out,
        "--audit-file",
        tmp_path / "a.jsonl",
    )
    assert r.code == 1
    assert "b.parquet: not a readable Parquet file" in r.err
    assert not out.exists()
