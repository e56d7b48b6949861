"""``cape apply --engine pandas|dask|spark|beam``: one expectation, the pandas output file.

Every engine writes through the same writer, so the output files must be the
same bytes. The only thing that differs between two runs is the run id stamped
in the Parquet metadata (``cape.run_id``); every run here passes the same
``--run-id``, so the files are compared whole, with nothing normalised. The
audit record of each run must be the CLI's own (three records, none from the
engine adapter) with the same counts as the pandas run.

Beam pipelines cost seconds each, so Beam runs the two demo cases only.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from _cli_support import leftovers, run, write

from cape_pipelines.cli import EXIT_REFUSED, demo_keys, demo_paths, main

RUN_ID = "engines-cli-test-run"
ENGINES = ["dask", "spark", "beam"]
MODULES = {"beam": "apache_beam", "dask": "dask", "spark": "pyspark"}

# Edge cases of CSV parsing where Spark's and pandas' own CSV rules differ from Arrow's:
# quoted delimiters and quotes, empty and quoted-empty text, null spellings (NA, N/A,
# NaN, null) in typed columns but not in text, 1/0 booleans, fractional seconds,
# offsets that make a column zoned (UTC).
EDGE_CSV = """\
s,i,f,b,d,t,tz
"a,b",1,1.5,true,2024-01-01,2024-01-01 10:00:00,2024-01-01T10:00:00Z
,,,,,,
NA,2,NaN,False,2024-02-01,2024-01-01 10:00:00.5,2024-01-01T23:30:00+02:00
"",3,2,TRUE,2024-02-29,2024-01-01,2024-12-31 23:59:59Z
null,4,-0.0,1,2024-03-01,2024-06-30 23:59:59.999999,2024-06-30 10:00:00Z
"q""x",N/A,1e3,0,,,
"""

EDGE_POLICY = """
label: edge
rules:
  - match: {name: s}
    actions:
      - transform: {type: tokenizer, key: {secret: demo-name-key}, max_token_len: 12}
  - match: {names: [t, tz]}
    actions:
      - transform: {type: date-truncation, frequency: day}
"""

# A zoned column in a zone other than the Spark session's: truncating to a day must use
# the column's zone (Tokyo) on every engine.
ZONED_POLICY = """
label: zoned
rules:
  - match: {name: at}
    actions:
      - transform: {type: date-truncation, frequency: day}
"""

MISSING_COLUMN_POLICY = """
label: missing
on_missing_column: error
rules:
  - match: {name: loyalty_tier}
    actions: [drop]
"""


def _keys_file(directory: Path) -> Path:
    path = directory / "keys.json"
    path.write_text(json.dumps({k: v.hex() for k, v in demo_keys().items()}))
    return path


def _apply(policy: Path, source: Path, output: Path, engine: str, keys: Path, audit: Path) -> int:
    return main(
        [
            "apply",
            "--policy",
            str(policy),
            "--input",
            str(source),
            "--output",
            str(output),
            "--keys-file",
            str(keys),
            "--engine",
            engine,
            "--run-id",
            RUN_ID,
            "--audit-file",
            str(audit),
            "--no-progress",
        ]
    )


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Case name -> (policy, input): the demo as CSV and as a Parquet directory, and edges."""
    root = tmp_path_factory.mktemp("engine-inputs")
    customers, demo_policy = demo_paths()
    table = pacsv.read_csv(customers)
    parquet_dir = root / "customers_parquet"
    parquet_dir.mkdir()
    # Two files of several row groups each: the order of files and row groups must hold.
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), parquet_dir / "part-0.parquet", row_group_size=150)
    pq.write_table(table.slice(half), parquet_dir / "part-1.parquet", row_group_size=150)
    edge_csv = write(root / "edge.csv", EDGE_CSV)
    zoned = root / "zoned.parquet"
    at = pa.array(
        [0, 15 * 3600 * 10**6, 16 * 3600 * 10**6, None, 1_700_000_000_123_456],
        pa.timestamp("us", tz="Asia/Tokyo"),
    )
    pq.write_table(pa.table({"id": [1, 2, 3, 4, 5], "at": at}), zoned)
    return {
        "demo-csv": (demo_policy, customers),
        "demo-parquet-dir": (demo_policy, parquet_dir),
        "edge-csv": (write(root / "edge.yaml", EDGE_POLICY), edge_csv),
        "zoned-parquet": (write(root / "zoned.yaml", ZONED_POLICY), zoned),
    }


@pytest.fixture(scope="module")
def expected(cases, tmp_path_factory) -> dict[str, tuple[bytes, dict]]:
    """Case name -> (the pandas output file's bytes, its run.completed record)."""
    root = tmp_path_factory.mktemp("pandas-outputs")
    keys = _keys_file(root)
    out = {}
    for name, (policy, source) in cases.items():
        output, audit = root / f"{name}.parquet", root / f"{name}.jsonl"
        assert _apply(policy, source, output, "pandas", keys, audit) == 0
        out[name] = (output.read_bytes(), _records(audit)[-1])
    return out


def _engine(request, engine: str) -> None:
    """Skip if the engine is not installed; start the shared SparkSession for Spark."""
    pytest.importorskip(MODULES[engine])
    if engine == "spark":
        request.getfixturevalue("spark")


CASES = [
    # (engine, case)
    ("dask", "demo-csv"),
    ("dask", "demo-parquet-dir"),
    ("dask", "edge-csv"),
    ("dask", "zoned-parquet"),
    ("spark", "demo-csv"),
    ("spark", "demo-parquet-dir"),
    ("spark", "edge-csv"),
    ("spark", "zoned-parquet"),
    ("beam", "demo-csv"),
    ("beam", "demo-parquet-dir"),
]


@pytest.mark.parametrize(("engine", "case"), CASES)
def test_engine_output_is_the_pandas_file(request, tmp_path, cases, expected, engine, case):
    _engine(request, engine)
    policy, source = cases[case]
    output, audit = tmp_path / "out.parquet", tmp_path / "audit.jsonl"
    code = _apply(policy, source, output, engine, _keys_file(tmp_path), audit)
    assert code == 0
    want_bytes, want_record = expected[case]
    assert output.read_bytes() == want_bytes
    records = _records(audit)
    # The CLI's run only: the adapter's own records are switched off.
    assert [r["event"] for r in records] == ["run.started", "policy.fetched", "run.completed"]
    assert {r["run_id"] for r in records} == {RUN_ID}
    assert {r["engine"] for r in records} == {engine}
    done = records[-1]
    for field in ("rows_in", "rows_out", "rows_redacted", "columns", "policy"):
        assert done[field] == want_record[field], field
    assert leftovers(tmp_path) == []


def test_demo_cases_remove_rows_and_nulls(expected):
    """The demo cases exercise row removal and nulls (else the comparisons above prove less)."""
    for case in ("demo-csv", "demo-parquet-dir"):
        record = expected[case][1]
        assert record["rows_redacted"] > 0
        assert record["columns"]["salary"]["nulls"] > 0


def test_spark_restores_the_session_time_zone(request, tmp_path, cases):
    _engine(request, "spark")
    spark = request.getfixturevalue("spark")
    before = spark.conf.get("spark.sql.session.timeZone")
    policy, source = cases["zoned-parquet"]
    output, audit = tmp_path / "out.parquet", tmp_path / "audit.jsonl"
    assert _apply(policy, source, output, "spark", _keys_file(tmp_path), audit) == 0
    assert before != "Asia/Tokyo"
    assert spark.conf.get("spark.sql.session.timeZone") == before


@pytest.fixture
def lacking_dir(tmp_path) -> Path:
    """A Parquet directory whose second file lacks the ``email`` column the policy names."""
    table = pacsv.read_csv(demo_paths()[0])
    directory = tmp_path / "lacking"
    directory.mkdir()
    pq.write_table(table.slice(0, 500), directory / "a.parquet")
    pq.write_table(table.slice(500).drop_columns(["email"]), directory / "b.parquet")
    return directory


ERROR_CASES = [
    # (label, how the input is made, text the one-line message must hold)
    ("second file lacks a column", "lacking_dir", r"b\.parquet: lacks column\(s\) 'email'"),
    ("policy names a missing column", "missing_policy", r"column\(s\) 'loyalty_tier' not in"),
]


@pytest.mark.parametrize("engine", ["pandas", *ENGINES])
@pytest.mark.parametrize(("label", "make", "message"), ERROR_CASES)
def test_missing_column_is_one_line_and_no_output(
    request, tmp_path, capsys, engine, label, make, message
):
    if engine != "pandas":
        _engine(request, engine)
    if make == "lacking_dir":
        policy, source = demo_paths()[1], request.getfixturevalue("lacking_dir")
    else:
        policy, source = write(tmp_path / "p.yaml", MISSING_COLUMN_POLICY), demo_paths()[0]
    output = tmp_path / "out" / "result.parquet"
    r = run(
        capsys,
        "apply",
        "--policy",
        policy,
        "--input",
        source,
        "--output",
        output,
        "--keys-file",
        _keys_file(tmp_path),
        "--engine",
        engine,
        "--audit-file",
        tmp_path / "audit.jsonl",
    )
    assert r.code == EXIT_REFUSED, label
    lines = [line for line in r.err.splitlines() if line.startswith("cape:")]
    assert len(lines) == 1, r.err
    assert lines[0].startswith("cape: error: ")
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in r.err
    assert not output.exists()
    assert not output.parent.exists() or leftovers(output.parent) == []
    records = _records(tmp_path / "audit.jsonl")
    assert [r["event"] for r in records][-1] == "run.failed"


NOT_INSTALLED = r"""
import importlib.abc, sys

BLOCKED = sys.argv[1]

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == BLOCKED or name.startswith(BLOCKED + "."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
from cape_pipelines.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_not_installed_names_the_extra(tmp_path, engine):
    """In a fresh interpreter where the engine's package cannot be imported."""
    customers, policy = demo_paths()
    output = tmp_path / "out.parquet"
    argv = ["apply", "--policy", policy, "--input", customers, "--output", output]
    argv += ["--engine", engine, "--audit-file", tmp_path / "audit.jsonl"]
    proc = subprocess.run(
        [sys.executable, "-c", NOT_INSTALLED, MODULES[engine], *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == EXIT_REFUSED, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cape:")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"cape: error: engine {engine!r} is not available (")
    assert lines[0].endswith(f"install the '{engine}' extra")
    assert not output.exists()


def test_unknown_engine_lists_the_known_ones(tmp_path, capsys):
    customers, policy = demo_paths()
    r = run(
        capsys,
        "apply",
        "--policy",
        policy,
        "--input",
        customers,
        "--output",
        tmp_path / "out.parquet",
        "--engine",
        "flink",
        "--audit-file",
        tmp_path / "audit.jsonl",
    )
    assert r.code == EXIT_REFUSED
    assert "unknown engine 'flink'; available: " in r.err
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize("engine", ["dask", "spark"])
def test_transform_error_inside_the_engine_is_one_line(request, tmp_path, capsys, engine):
    """A failure inside the workers (not at plan time) still ends in one line and no output."""
    _engine(request, engine)
    reveal = write(
        tmp_path / "reveal.yaml",
        """
        label: reveal
        rules:
          - match: {name: phone}
            actions:
              - transform: {type: token-reverser, key: {secret: demo-phone-key}}
        """,
    )
    output = tmp_path / "out.parquet"
    r = run(
        capsys,
        "apply",
        "--policy",
        reveal,
        "--input",
        demo_paths()[0],
        "--output",
        output,
        "--keys-file",
        _keys_file(tmp_path),
        "--engine",
        engine,
        "--audit-file",
        tmp_path / "audit.jsonl",
    )
    assert r.code == EXIT_REFUSED
    lines = [line for line in r.err.splitlines() if line.startswith("cape:")]
    assert lines == [
        "cape: error: rules[0].actions[0].transform, column 'phone': "
        "the token at row 0 is not hexadecimal"
    ]
    assert not output.exists()
    assert leftovers(tmp_path) == []
    assert _records(tmp_path / "audit.jsonl")[-1]["event"] == "run.failed"
