"""`cape policy validate|schema|plan`, the extension hook, and `cape demo`."""

from __future__ import annotations

import argparse
import json
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
from _cli_support import CSV_TEXT, DROP_AND_MINORS, run, write

from cape_pipelines.cli import build_parser, demo_keys, demo_paths
from cape_pipelines.policy import load_policy


def test_validate_ok(tmp_path, capsys):
    pol = write(tmp_path / "p.yaml", DROP_AND_MINORS)
    r = run(capsys, "policy", "validate", pol)
    assert r.code == 0
    assert r.out == f"ok: test-minors v1 sha256:{load_policy(pol).sha256}\n"


def test_validate_lists_every_problem(tmp_path, capsys):
    pol = write(
        tmp_path / "p.yaml",
        """
        label: Not A Label
        rules:
          - match: {name: a, regex: b}
            actions:
              - transform: {type: nope}
    """,
    )
    r = run(capsys, "policy", "validate", pol)
    assert r.code == 1
    assert r.out == ""
    assert r.err.startswith(f"cape: error: invalid policy {pol}")
    assert "label: label must match" in r.err
    assert "match takes exactly one of name, names, regex, tag" in r.err
    assert "Traceback" not in r.err


def test_validate_missing_file(tmp_path, capsys):
    r = run(capsys, "policy", "validate", tmp_path / "nope.yaml")
    assert r.code == 1
    assert "file not found" in r.err


def test_schema_is_json_schema(capsys):
    r = run(capsys, "policy", "schema")
    assert r.code == 0
    schema = json.loads(r.out)
    assert schema["title"] == "Cape Pipelines policy"
    variants = {v["title"] for v in schema["$defs"]["Transformation"]["oneOf"]}
    assert {"column-redact", "row-redact"} <= variants


def test_plan_table(tmp_path, capsys):
    pol = write(tmp_path / "p.yaml", DROP_AND_MINORS)
    src = write(tmp_path / "in.csv", CSV_TEXT)
    r = run(capsys, "policy", "plan", pol, "--data", src)
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0] == f"policy test-minors v1 on {src} (csv)"
    assert lines[1].split() == ["COLUMN", "INPUT", "TYPE", "STATUS", "OUTPUT", "TYPE", "ACTIONS"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["ssn"][:3] == ["ssn", "string", "dropped"]
    assert rows["age"][:4] == ["age", "int64", "untouched", "int64"]
    assert lines[-1].startswith("(rows)")
    assert lines[-1].endswith("rules[0].actions[0].transform: row-redact where age < 18")


def test_plan_json_reads_only_the_schema(tmp_path, capsys):
    pol = write(tmp_path / "p.yaml", DROP_AND_MINORS)
    src = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [1], "ssn": ["x"], "age": [3]}), src)
    r = run(capsys, "policy", "plan", pol, "--data", src, "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["policy"]["label"] == "test-minors"
    by_col = {c["column"]: c for c in doc["columns"]}
    assert by_col["ssn"]["status"] == "dropped"
    assert by_col["id"]["status"] == "untouched"
    assert by_col[None]["status"] == "row-filter"
    assert doc["missing_keys"] == []


def test_plan_reports_missing_keys_without_needing_them(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CAPE_KEY_NAME_KEY", raising=False)
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
    r = run(capsys, "policy", "plan", pol, "--data", src)
    assert r.code == 0, r.err
    assert "keys not available here (needed to apply): name-key" in r.out
    assert "transformed" in r.out


def test_plan_missing_column(tmp_path, capsys):
    pol = write(
        tmp_path / "p.yaml", "label: t\nrules:\n  - match: {name: zz}\n    actions: [drop]\n"
    )
    src = write(tmp_path / "in.csv", CSV_TEXT)
    r = run(capsys, "policy", "plan", pol, "--data", src)
    assert r.code == 1
    assert "column(s) 'zz' not in the data" in r.err


def test_coordinator_commands_are_registered_through_the_hook(monkeypatch, capsys):
    seen = {}

    def register(sub, policy_sub):
        push = policy_sub.add_parser("push", help="push a policy")
        push.add_argument("file")
        push.set_defaults(func=lambda args: seen.setdefault("pushed", args.file) and 3)
        serve = sub.add_parser("coordinator")
        serve.set_defaults(func=lambda args: 0)

    fake = types.ModuleType("cape_coordinator.cli")
    fake.register = register
    monkeypatch.setitem(sys.modules, "cape_coordinator.cli", fake)
    parser = build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    r = run(capsys, "policy", "push", "x.yaml")
    assert r.code == 3
    assert seen == {"pushed": "x.yaml"}
    assert run(capsys, "coordinator").code == 0


def test_hook_is_skipped_when_the_coordinator_is_absent(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cape_coordinator.cli", None)  # import raises ImportError
    r = run(capsys, "policy", "push", "x.yaml")
    assert r.code == 2
    assert "invalid choice: 'push'" in r.err


def test_demo_policy_and_data_are_bundled():
    data, policy = demo_paths()
    assert data.is_file() and policy.is_file()
    header = data.read_text().splitlines()[0].split(",")
    assert header == [
        "customer_id",
        "name",
        "email",
        "phone",
        "ssn",
        "birthdate",
        "age",
        "country",
        "salary",
        "signup",
    ]
    assert len(data.read_text().splitlines()) == 1001
    keys = demo_keys()
    assert all(len(k) == 32 for k in keys.values())
    assert len(set(keys.values())) == len(keys)


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo.parquet"
    audit = tmp_path / "audit.jsonl"
    r = run(capsys, "demo", "--output", out, "--audit-file", audit)
    assert r.code == 0, r.err
    assert "Before" in r.out and "After" in r.out
    assert "PUBLIC demo keys" in r.out
    table = pq.read_table(out)
    assert "ssn" not in table.column_names
    assert table.num_rows < 1000  # minors removed
    assert min(table.column("age").to_pylist()) >= 18
    events = [json.loads(line)["event"] for line in audit.read_text().splitlines()]
    assert events == ["run.started", "policy.fetched", "run.completed"]
    assert '"event": "run.completed"' in r.out
