"""``cape catalog ...`` and ``cape policy plan --dataset`` against a live coordinator, run as a
script would run them (a subprocess with CAPE_TOKEN): scan, review the proposals, write a
policy by tag, and see its coverage."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _browser import LiveServer
from _console_support import ROOT, Coord, make_coord
from _synthetic import dataset


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Coord, LiveServer]]:
    c = make_coord(tmp_path_factory.mktemp("catalog-cli"))
    srv = LiveServer(c.app)
    srv.start()
    try:
        yield c, srv
    finally:
        srv.stop()
        c.coord.close()


def cape(
    live: tuple[Coord, LiveServer] | None, who: str | None, *args: str, ok: bool = True
) -> str:
    env = dict(os.environ)
    env.pop("CAPE_COORDINATOR_URL", None)
    env.pop("CAPE_TOKEN", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if live is not None and who is not None:
        c, srv = live
        env.update(CAPE_COORDINATOR_URL=srv.url, CAPE_TOKEN=c.tokens[who])
    proc = subprocess.run(
        [sys.executable, "-m", "cape_pipelines.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
        return proc.stdout
    assert proc.returncode != 0, proc.stdout
    return proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "customers.csv"
    cols = ["customer_id", "email", "ssn", "card_number", "order_number", "note"]
    dataset(rows=200).select(cols).to_pandas().to_csv(path, index=False)
    return path


def test_scan_alone_needs_no_coordinator_and_tags_nothing(sample):
    out = json.loads(cape(None, None, "catalog", "scan", str(sample), "--json"))
    assert out["rows"] == 200 and out["schema"]["customer_id"] == "int64"
    found = {(p["column"], p["tag"]) for p in out["proposals"]}
    assert found == {
        ("email", "pii.email"),
        ("ssn", "pii.ssn"),
        ("card_number", "financial.card_number"),
    }


def test_scan_review_then_plan_by_tag_with_coverage(live, sample, tmp_path):
    c, _ = live
    out = cape(live, "author", "catalog", "scan", str(sample), "--dataset", "customers")
    assert "stored as pending" in out
    assert c.coord.catalog.column_tags("customers") == {}
    pending = json.loads(
        cape(live, "reviewer", "catalog", "proposals", "--dataset", "customers", "--json")
    )
    ids = {p["column"]: p["id"] for p in pending}
    assert set(ids) == {"email", "ssn", "card_number"}
    # The author who scanned may not decide: a one-line reason, a failing exit, nothing tagged.
    err = cape(live, "author", "catalog", "accept", str(ids["email"]), ok=False)
    assert "may not" in err or "forbidden" in err
    assert c.coord.catalog.column_tags("customers") == {}
    out = cape(live, "reviewer", "catalog", "accept", str(ids["email"]), str(ids["ssn"]))
    assert "customers.email tagged pii.email" in out
    cape(live, "reviewer", "catalog", "reject", str(ids["card_number"]), "--reason", "test data")
    assert c.coord.catalog.column_tags("customers") == {"email": ["pii.email"], "ssn": ["pii.ssn"]}
    shown = cape(live, "auditor", "catalog", "show", "customers")
    assert "pii.email (bob " in shown

    policy = tmp_path / "p.yaml"
    policy.write_text(
        "label: customers\n"
        "rules:\n"
        "  - match: {tag: pii.email}\n"
        "    actions: [drop]\n"
        "  - match: {name: nickname}\n"
        "    on_missing_column: skip\n"
        "    actions: [drop]\n",
        encoding="utf-8",
    )
    plan = json.loads(
        cape(
            live,
            "author",
            "policy",
            "plan",
            str(policy),
            "--data",
            str(sample),
            "--dataset",
            "customers",
            "--json",
        )
    )
    email = next(r for r in plan["columns"] if r["column"] == "email")
    assert email["status"] != "kept" and email["output_type"] is None, email
    assert plan["coverage"]["uncovered"] == [{"column": "ssn", "tags": ["pii.ssn"]}]
    assert plan["coverage"]["unmatched_rules"] == [2]
    text = cape(
        live,
        "author",
        "policy",
        "plan",
        str(policy),
        "--data",
        str(sample),
        "--dataset",
        "customers",
    )
    assert "uncovered: column 'ssn' tagged pii.ssn matches no rule" in text
    # Without the catalog, the tag rule matches nothing and email is kept.
    plain = json.loads(
        cape(None, None, "policy", "plan", str(policy), "--data", str(sample), "--json")
    )
    assert next(r for r in plain["columns"] if r["column"] == "email")["output_type"] == "string"
    # coverage exits 1 while incomplete
    err = cape(
        live, "author", "catalog", "coverage", "customers", "--policy", str(policy), ok=False
    )
    assert "uncovered: column 'ssn' tagged pii.ssn matches no rule" in err


@pytest.mark.parametrize("engine", ["pandas", "dask"])
def test_apply_resolves_tag_rules_through_the_catalog(live, sample, tmp_path, engine):
    c, _ = live
    catalog, admin = c.coord.catalog, c.principals["admin"]
    name = f"apply-{engine}"
    catalog.register(admin, name, "alice", {"customer_id": "int64", "email": "string"})
    catalog.tag(admin, name, "email", "pii.email")
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "label: customers\nrules:\n  - match: {tag: pii.email}\n    actions: [drop]\n",
        encoding="utf-8",
    )
    out = tmp_path / "out.csv"
    audit = tmp_path / "audit.jsonl"
    args = ["apply", "--policy", str(policy), "--input", str(sample), "--output", str(out)]
    args += ["--engine", engine, "--audit-file", str(audit), "--no-progress"]
    cape(live, "pipeline", *args, "--dataset", name)
    assert "email" not in _header(out) and "customer_id" in _header(out)
    # The same policy without the catalog drops nothing.
    out.unlink()
    cape(None, None, *args)
    assert "email" in _header(out)


def _header(path: Path) -> list[str]:
    with path.open(encoding="utf-8", newline="") as f:
        return next(csv.reader(f))


def test_scan_reads_national_phone_numbers_in_the_region_given(tmp_path):
    pytest.importorskip("phonenumbers")
    path = tmp_path / "uk.csv"
    path.write_text("tel\n" + "020 7946 0958\n0161 496 0000\n" * 5)
    found = json.loads(cape(None, None, "catalog", "scan", str(path), "--json"))["proposals"]
    assert found == []
    out = cape(None, None, "catalog", "scan", str(path), "--json", "--phone-region", "GB")
    assert [(p["column"], p["tag"]) for p in json.loads(out)["proposals"]] == [("tel", "pii.phone")]
    err = cape(None, None, "catalog", "scan", str(path), "--phone-region", "uk", ok=False)
    assert "--phone-region" in err
