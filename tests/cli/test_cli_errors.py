"""Every refused action: exit code 1, one clear message on stderr, no traceback, no output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from _cli_support import CSV_TEXT, DROP_SSN, KEY_HEX, leftovers, run, write

from cape_pipelines.io import CSV_INFER_BLOCK

MALFORMED_YAML = "label: t\nrules: [\n  - match: {name: ssn\n"

UNKNOWN_TYPE = """
label: t
rules:
  - match: {name: ssn}
    actions:
      - transform: {type: nope}
"""

WRONG_PARAM_TYPE = """
label: t
rules:
  - actions:
      - transform: {type: column-redact, columns: 5}
"""

MISSING_COLUMN = """
label: t
rules:
  - match: {name: nosuch}
    actions: [drop]
"""

CONDITION_UNKNOWN_COLUMN = """
label: t
rules:
  - actions:
      - transform: {type: row-redact, condition: "height > 3"}
"""

MISSING_KEY = """
label: t
rules:
  - match: {name: name}
    actions:
      - transform: {type: tokenizer, key: {secret: no-such-key}}
"""

TOKENIZER_BAD_PARAM = """
label: t
rules:
  - match: {name: name}
    actions:
      - transform: {type: tokenizer, key: {secret: k}, max_token_len: long}
"""

ROUND_A_STRING = """
label: t
rules:
  - match: {name: name}
    actions:
      - transform: {type: numeric-rounding, precision: 1}
"""

BAD_CSV = CSV_TEXT + "5,Eve\n"

CONDITION_TYPE_MISMATCH = """
label: t
rules:
  - actions:
      - transform: {type: row-redact, condition: "age == 'old'"}
"""

AUDITED, PRE_RUN = True, False

CASES = [
    # (policy, csv text, extra args, message regex, audited): cases refused while the command
    # line is read, before any run starts, leave no audit records (PRE_RUN).
    pytest.param(MALFORMED_YAML, CSV_TEXT, [], r"malformed YAML", AUDITED, id="malformed-yaml"),
    pytest.param(
        UNKNOWN_TYPE,
        CSV_TEXT,
        [],
        r"unknown transformation type 'nope'; known types: .*column-redact.*tokenizer",
        AUDITED,
        id="unknown-transformation",
    ),
    pytest.param(
        WRONG_PARAM_TYPE,
        CSV_TEXT,
        [],
        r"rules\[0\]\.actions\[0\]\.transform\.columns: Input should be a valid list",
        AUDITED,
        id="wrong-param-type",
    ),
    pytest.param(
        TOKENIZER_BAD_PARAM,
        CSV_TEXT,
        [],
        r"transform\.max_token_len: ",
        AUDITED,
        id="wrong-param-type-tokenizer",
    ),
    pytest.param(
        MISSING_COLUMN,
        CSV_TEXT,
        [],
        r"rules\[0\]\.match: column\(s\) 'nosuch' not in the data",
        AUDITED,
        id="missing-column",
    ),
    pytest.param(
        CONDITION_UNKNOWN_COLUMN, CSV_TEXT, [], r"height", AUDITED, id="condition-unknown-column"
    ),
    pytest.param(
        CONDITION_TYPE_MISMATCH,
        CSV_TEXT,
        [],
        r"rules\[0\]\.actions\[0\]\.transform: .*age",
        AUDITED,
        id="condition-type-mismatch",
    ),
    pytest.param(
        MISSING_KEY, CSV_TEXT, [], r"key 'no-such-key' not found", AUDITED, id="missing-key"
    ),
    pytest.param(
        ROUND_A_STRING,
        CSV_TEXT,
        [],
        r"column 'name': numeric-rounding needs",
        AUDITED,
        id="round-a-string",
    ),
    pytest.param(
        DROP_SSN,
        BAD_CSV,
        [],
        r"in\.csv: malformed CSV at line 6: expected 6 columns, found 2",
        AUDITED,
        id="malformed-csv-row",
    ),
    pytest.param(
        DROP_SSN,
        CSV_TEXT,
        ["--key", "k=zz-not-hex"],
        r"--key k is neither hex",
        PRE_RUN,
        id="key-not-hex",
    ),
    pytest.param(
        DROP_SSN,
        CSV_TEXT,
        ["--engine", "spork"],
        r"unknown engine 'spork'; available: .*pandas",
        AUDITED,
        id="unknown-engine",
    ),
    pytest.param(
        DROP_SSN,
        CSV_TEXT,
        ["--csv-type", "age=integer-ish"],
        r"--csv-type age: unknown type",
        PRE_RUN,
        id="unknown-csv-type",
    ),
    pytest.param(
        DROP_SSN,
        CSV_TEXT,
        ["--csv-type", "nosuch=string"],
        r"pinned CSV column\(s\) not in the file: nosuch",
        AUDITED,
        id="pinned-column-missing",
    ),
]


@pytest.mark.parametrize(("policy", "csv_text", "extra", "message", "audited"), CASES)
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_bad_input_is_refused_cleanly(
    tmp_path, capsys, policy, csv_text, extra, message, audited, fmt
):
    pol = write(tmp_path / "policy.yaml", policy)
    src = write(tmp_path / "in.csv", csv_text)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / f"result.{fmt}"
    audit = tmp_path / "audit.jsonl"
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
        audit,
        *extra,
    )
    assert r.code == 1
    lines = r.err.strip().splitlines()
    assert lines[0].startswith("cape: error: ")
    assert r.err.count("cape: error:") == 1
    assert "Traceback" not in r.err
    assert re.search(message, r.err), r.err
    if "invalid policy" not in lines[0]:
        assert len(lines) == 1, r.err
    assert not out.exists()
    assert leftovers(out_dir) == []
    if not audited:
        assert not audit.exists()
    else:
        events = [json.loads(line)["event"] for line in audit.read_text().splitlines()]
        assert events[0] == "run.started"
        assert events[-1] == "run.failed"


def test_malformed_row_in_a_later_file_leaves_no_partial_output(tmp_path, capsys):
    """The first file is already written to the temporary output when the second fails."""
    pol = write(tmp_path / "policy.yaml", DROP_SSN)
    src = tmp_path / "in"
    src.mkdir()
    write(src / "a.csv", CSV_TEXT)
    write(src / "b.csv", BAD_CSV)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "result.parquet"
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
        "1",
        "--audit-file",
        tmp_path / "a.jsonl",
    )
    assert r.code == 1
    assert "b.csv: malformed CSV at line 6" in r.err
    assert not out.exists()
    assert leftovers(out_dir) == []
    failed = json.loads((tmp_path / "a.jsonl").read_text().splitlines()[-1])
    assert failed["event"] == "run.failed"
    assert failed["error"]["type"] == "DataError"
    assert failed["rows_in"] == 4  # the first file's rows were read before the failure


def test_type_change_after_first_block_names_line_and_column_and_how_to_pin(tmp_path, capsys):
    """Types come from the first block; a later value of another type is a clear error."""
    rows = [f"{i},{10000 + i % 90000}" for i in range(150_000)]
    text = "id,zip\n" + "\n".join(rows) + "\n150000,AB123\n"
    src = tmp_path / "big.csv"
    src.write_text(text)
    assert src.stat().st_size > CSV_INFER_BLOCK  # the bad row is past the inferred block
    pol = write(
        tmp_path / "p.yaml",
        "label: t\nrules:\n  - match: {name: id}\n"
        "    on_missing_column: skip\n    actions: [drop]\n",
    )
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
    assert "big.csv: line 150002, column 'zip': value is not a valid int64" in r.err
    assert "--csv-type zip=string" in r.err
    assert "AB123" not in r.err  # the offending value is data: never echoed
    assert not out.exists()
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
        "--csv-type",
        "zip=string",
    )
    assert r.code == 0, r.err
    assert out.exists()


def test_existing_output_is_not_replaced_without_overwrite(tmp_path, capsys):
    pol = write(tmp_path / "p.yaml", DROP_SSN)
    src = write(tmp_path / "in.csv", CSV_TEXT)
    out = write(tmp_path / "out.csv", "keep me\n")
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
    assert "already exists; pass --overwrite" in r.err
    assert out.read_text() == "keep me\n"
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
        "--overwrite",
    )
    assert r.code == 0
    assert out.read_text().startswith('"id","name","age"')


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "missing.csv", r"input .*missing\.csv does not exist"),
        (lambda d: (d / "empty").mkdir() or d / "empty", r"holds no CSV or Parquet files"),
        (lambda d: write(d / "data.txt", "a\n1\n"), r"cannot tell the format of"),
    ],
    ids=["missing", "empty-directory", "unknown-suffix"],
)
def test_unreadable_input(tmp_path, capsys, setup, message):
    pol = write(tmp_path / "p.yaml", DROP_SSN)
    src = setup(tmp_path)
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
    assert r.code == 1
    assert re.search(message, r.err), r.err
    assert not (tmp_path / "o.csv").exists()


def test_output_inside_input_directory_is_refused(tmp_path, capsys):
    pol = write(tmp_path / "p.yaml", DROP_SSN)
    src = tmp_path / "in"
    src.mkdir()
    write(src / "a.csv", CSV_TEXT)
    r = run(
        capsys,
        "apply",
        "--policy",
        pol,
        "--input",
        src,
        "--output",
        src / "o.csv",
        "--audit-file",
        tmp_path / "a.jsonl",
    )
    assert r.code == 1
    assert "inside the input directory" in r.err


def test_unknown_output_format(tmp_path, capsys):
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
        tmp_path / "o.txt",
        "--audit-file",
        tmp_path / "a.jsonl",
    )
    assert r.code == 1
    assert "cannot tell the output format from 'o.txt'" in r.err
    assert not (tmp_path / "o.txt").exists()


def test_keys_never_appear_in_errors_or_audit(tmp_path, capsys):
    pol = write(tmp_path / "p.yaml", MISSING_COLUMN)
    src = write(tmp_path / "in.csv", CSV_TEXT)
    keys = write(tmp_path / "keys.yaml", f"other-key: {KEY_HEX}\n")
    r = run(
        capsys,
        "apply",
        "--policy",
        pol,
        "--input",
        src,
        "--output",
        tmp_path / "o.csv",
        "--keys-file",
        keys,
        "--key",
        f"k={KEY_HEX}",
        "--audit-file",
        tmp_path / "a.jsonl",
    )
    assert r.code == 1
    assert KEY_HEX not in r.err + r.out
    assert KEY_HEX not in (tmp_path / "a.jsonl").read_text()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a: [1\n", r"keys file .* is not valid YAML/JSON"),
        ("- a\n- b\n", r"must be a mapping of key name to hex value"),
        ("k: 5\n", r"entry 'k' is not"),
        ("k: nothex\n", r"key 'k' in .* is neither hex"),
    ],
    ids=["malformed", "not-a-mapping", "not-a-string", "not-hex"],
)
def test_bad_keys_file(tmp_path, capsys, content, message):
    pol = write(tmp_path / "p.yaml", DROP_SSN)
    src = write(tmp_path / "in.csv", CSV_TEXT)
    keys = write(tmp_path / "keys.yaml", content)
    r = run(
        capsys,
        "apply",
        "--policy",
        pol,
        "--input",
        src,
        "--output",
        tmp_path / "o.csv",
        "--keys-file",
        keys,
        "--audit-file",
        tmp_path / "a.jsonl",
    )
    assert r.code == 1
    assert re.search(message, r.err), r.err
    assert "nothex" not in r.err


def test_debug_shows_the_traceback(tmp_path, capsys):
    pol = write(tmp_path / "p.yaml", MISSING_COLUMN)
    src = write(tmp_path / "in.csv", CSV_TEXT)
    r = run(
        capsys,
        "--debug",
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
    assert r.code == 1
    assert "Traceback" in r.err
    assert r.err.strip().splitlines()[-1].startswith("cape: error:")


def test_keyboard_interrupt_mid_write_leaves_nothing(tmp_path, capsys, monkeypatch):
    from cape_pipelines import io as cape_io

    calls = {"n": 0}
    real_write = cape_io.ParquetOut.write

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real_write(self, batch)

    monkeypatch.setattr(cape_io.ParquetOut, "write", interrupted)
    pol = write(tmp_path / "p.yaml", DROP_SSN)
    src = write(tmp_path / "in.csv", CSV_TEXT)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = run(
        capsys,
        "apply",
        "--policy",
        pol,
        "--input",
        src,
        "--output",
        out_dir / "o.parquet",
        "--batch-size",
        "1",
        "--audit-file",
        tmp_path / "a.jsonl",
    )
    assert r.code == 130
    assert r.err.strip() == "cape: interrupted"
    assert list(out_dir.iterdir()) == []
    last = json.loads((tmp_path / "a.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "run.failed"
    assert last["error"]["type"] == "KeyboardInterrupt"


def test_internal_error_is_one_line_without_traceback(tmp_path, capsys, monkeypatch):
    from cape_pipelines import cli

    def boom(*args, **kwargs):
        raise RuntimeError("unexpected\nsecond line")

    monkeypatch.setattr(cli, "apply_files", boom)
    r = run(
        capsys,
        "apply",
        "--policy",
        "p.yaml",
        "--input",
        "i.csv",
        "--output",
        str(Path(tmp_path) / "o.csv"),
    )
    assert r.code == 70
    assert r.err.strip() == (
        "cape: internal error: RuntimeError: unexpected (run with --debug for the traceback)"
    )


def test_usage_error_exits_2(capsys):
    r = run(capsys, "apply", "--policy", "p.yaml")
    assert r.code == 2
    assert "the following arguments are required: --input, --output" in r.err
