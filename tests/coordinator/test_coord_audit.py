"""Audit: idempotent batches, runs, filters, and the hash chain catching every kind of tampering."""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import requests
from _coord_support import run_cli
from _db_snapshot import stores_nothing

from cape_coordinator.cli import register
from cape_coordinator.config import Paths, Settings
from cape_coordinator.store import Coordinator, Principal
from cape_pipelines.audit import MemorySink, RunContext
from coordinator_client import AuthError


def run_records(label: str = "customers", n_extra: int = 0, finish: str | None = "completed"):
    """A run's records as cape_pipelines.audit makes them."""
    policy = {"label": label, "version": 1, "sha256": "ab"}
    run = RunContext(engine="pandas", sink=MemorySink(), policy=policy)
    recs = [run.record("run.started")]
    recs += [run.record("policy.fetched", source="test") for _ in range(n_extra)]
    if finish == "completed":
        recs.append(
            run.record("run.completed", rows_in=10, rows_out=8, rows_redacted=2, columns={})
        )
    elif finish == "failed":
        recs.append(run.record("run.failed", error={"type": "PlanError", "message": "no column"}))
    return run.run_id, recs


def test_replayed_batch_stored_once(clients):
    pipeline, auditor = clients["pipeline"], clients["auditor"]
    run_id, recs = run_records(n_extra=3)
    assert pipeline.post_audit(recs) == {"accepted": 5, "duplicates": 0}
    assert pipeline.post_audit(recs) == {"accepted": 0, "duplicates": 5}
    assert pipeline.post_audit(recs[:2] + recs[:2]) == {"accepted": 0, "duplicates": 4}
    stored = auditor.list_audit(run_id=run_id)
    assert sorted(r["record"]["record_id"] for r in stored) == sorted(r["record_id"] for r in recs)
    assert clients["auditor"].verify_audit()["intact"] is True


def test_runs_derived_from_records(clients):
    pipeline, auditor = clients["pipeline"], clients["auditor"]
    ok_id, ok = run_records()
    bad_id, bad = run_records(finish="failed")
    open_id, still = run_records(finish=None)
    pipeline.post_audit(ok + bad + still)
    runs = {r["run_id"]: r for r in auditor.list_runs(limit=1000)}
    assert (runs[ok_id]["status"], runs[ok_id]["rows_in"], runs[ok_id]["rows_out"]) == (
        "succeeded",
        10,
        8,
    )
    assert (runs[ok_id]["engine"], runs[ok_id]["label"], runs[ok_id]["version"]) == (
        "pandas",
        "customers",
        1,
    )
    assert runs[ok_id]["started_at"] <= runs[ok_id]["ended_at"]
    assert (runs[bad_id]["status"], runs[bad_id]["error_type"]) == ("failed", "PlanError")
    assert runs[open_id]["status"] in ("running", "lost")
    # The session server calls a run lost after 5 s without records.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = {r["run_id"]: r["status"] for r in auditor.list_runs(status="lost", limit=1000)}
        if open_id in status:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the silent run never showed as lost")
    assert ok_id not in {r["run_id"] for r in auditor.list_runs(status="lost", limit=1000)}


def test_pipeline_cannot_post_for_another_label(clients):
    _, recs = run_records(label="billing")
    with pytest.raises(AuthError, match="label_not_allowed"):
        clients["pipeline"].post_audit(recs)


def test_audit_list_filters(clients):
    pipeline, auditor = clients["pipeline"], clients["auditor"]
    run_id, recs = run_records(label="matrix", n_extra=2)
    pipeline.post_audit(recs)
    assert len(auditor.list_audit(run_id=run_id)) == 4
    assert len(auditor.list_audit(run_id=run_id, event="policy.fetched")) == 2
    assert {
        r["record"]["run_id"]
        for r in auditor.list_audit(label="matrix", event="run.started", limit=1000)
    } >= {run_id}
    # since/until are the coordinator's receipt times (issue 9), not the records' own.
    t = auditor.list_audit(run_id=run_id)[1]["received_at"]
    assert len(auditor.list_audit(run_id=run_id, since=t)) == 4
    assert len(auditor.list_audit(run_id=run_id, until=t)) == 0
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert auditor.list_audit(run_id=run_id, since=future) == []
    seqs = [r["seq"] for r in auditor.list_audit(limit=1000)]
    assert seqs == sorted(seqs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cape")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub, None)
    return parser


def test_verify_through_the_coordinator(server, tokens, capsys):
    args = _parser().parse_args(
        ["audit", "verify", "--coordinator", server.url, "--token", tokens["auditor"]]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith("intact: ")
    anchor = out.rsplit(" ", 1)[1]
    args = _parser().parse_args(
        [
            "audit",
            "verify",
            "--coordinator",
            server.url,
            "--token",
            tokens["auditor"],
            "--expect",
            anchor,
        ]
    )
    assert args.func(args) == 0
    seq = anchor.split(":")[0]
    args = _parser().parse_args(
        [
            "audit",
            "verify",
            "--coordinator",
            server.url,
            "--token",
            tokens["auditor"],
            "--expect",
            f"{seq}:{'0' * 64}",
        ]
    )
    assert args.func(args) == 1


# ---- tampering with the database file --------------------------------------------------


@pytest.fixture
def chain_db(tmp_path):
    """A coordinator database (no server) holding 3 coordinator entries and 12 run records."""
    paths = Paths.resolve(str(tmp_path / "cape.db"))
    coord, _ = Coordinator.initialize(paths, Settings())
    admin = Principal("-", "admin", "admin")
    coord.create_token(admin, name="a1", role="author")
    coord.create_token(admin, name="p1", role="pipeline", labels=["customers"])
    pipe = Principal("-", "p1", "pipeline", ("customers",))
    for _ in range(4):
        coord.post_audit(pipe, run_records()[1])
    coord.close()
    return paths.sqlite_file


def _sql(path, *statements):
    con = sqlite3.connect(path)
    try:
        for stmt in statements:
            con.execute(stmt)
        con.commit()
    finally:
        con.close()


def _edit_body(path):
    con = sqlite3.connect(path)
    body = con.execute("SELECT body FROM audit WHERE seq = 7").fetchone()[0]
    con.close()
    entry = json.loads(body)
    entry["record"]["rows_out"] = 10
    return f"UPDATE audit SET body = '{json.dumps(entry)}' WHERE seq = 7"


TAMPERING = [
    # (what, SQL builder, a problem the verification must report)
    ("edited body", lambda p: [_edit_body(p)], "seq 7: hash does not match"),
    (
        "edited indexed column",
        lambda p: ["UPDATE audit SET label = 'other' WHERE seq = 9"],
        "column(s) label",
    ),
    ("deleted middle row", lambda p: ["DELETE FROM audit WHERE seq = 5"], "seq 6"),
    (
        "deleted last row",
        lambda p: ["DELETE FROM audit WHERE seq = (SELECT max(seq) FROM audit)"],
        "anchor",
    ),
    (
        "inserted row",
        lambda p: [
            "INSERT INTO audit SELECT 1000, 'x-' || record_id, kind, run_id, event, label, time,"
            " received_at, body, prev_hash, hash, sender FROM audit WHERE seq = 4"
        ],
        "seq 1000",
    ),
    (
        "renumbered rows",
        lambda p: ["UPDATE audit SET seq = seq + 100 WHERE seq > 10"],
        "entries missing or renumbered",
    ),
    (
        "forged anchor",
        lambda p: [
            'UPDATE settings SET value = \'{"count": 1, "hash": "00", "signature": "AA"}\''
            " WHERE name = 'audit_anchor'"
        ],
        "signature does not verify",
    ),
]


@pytest.mark.parametrize("what,edits,problem", TAMPERING, ids=[t[0] for t in TAMPERING])
def test_tampered_chain_fails_verification(chain_db, capsys, what, edits, problem):
    args = _parser().parse_args(["audit", "verify", "--db", str(chain_db)])
    assert args.func(args) == 0
    _sql(chain_db, *edits(chain_db))
    capsys.readouterr()
    assert args.func(args) == 1
    out = capsys.readouterr().out
    assert problem in out, out
    assert "NOT intact" in out


def test_verify_exit_code_from_the_command(chain_db):
    assert run_cli("audit", "verify", "--db", str(chain_db)).returncode == 0
    _sql(chain_db, "UPDATE audit SET event = 'run.failed' WHERE seq = 6")
    proc = run_cli("audit", "verify", "--db", str(chain_db), check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout


def test_audit_copies_to_jsonl(tmp_path):
    copy = tmp_path / "audit.jsonl"
    paths = Paths.resolve(str(tmp_path / "cape.db"))
    coord, _ = Coordinator.initialize(paths, Settings(audit_jsonl=str(copy)))
    pipe = Principal("-", "p1", "pipeline", ("customers",))
    _, recs = run_records()
    coord.post_audit(pipe, recs)
    coord.post_audit(pipe, recs)
    lines = [json.loads(line) for line in copy.read_text().splitlines()]
    assert [entry["seq"] for entry in lines] == list(range(1, len(lines) + 1))
    assert [e["entry"]["record"]["record_id"] for e in lines[-len(recs) :]] == [
        r["record_id"] for r in recs
    ]
    assert lines[-1]["hash"] == coord.verify_audit().last_hash
    coord.close()


def test_record_ids_are_uuid_like():
    _, recs = run_records()
    assert all(uuid.UUID(r["record_id"]) for r in recs)


def test_audit_needs_records(server, tokens):
    with stores_nothing(server):
        resp = requests.post(
            server.url + "/v1/audit",
            json={"records": []},
            headers={"Authorization": f"Bearer {tokens['pipeline']}"},
            timeout=30,
        )
    assert resp.status_code == 422
