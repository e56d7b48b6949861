"""Issue 9 item 5: anchors kept outside the database catch a truncated chain with an
older, validly signed anchor put back (the first-wave ``verify`` passed it)."""

from __future__ import annotations

import argparse
import json
import sqlite3
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi.testclient import TestClient

from cape_coordinator.app import create_app
from cape_coordinator.cli import UsageError, register
from cape_coordinator.config import Paths, Settings
from cape_coordinator.coordinator import Coordinator
from cape_coordinator.crypto import b64d
from cape_coordinator.services.base import Principal

PIPE = Principal("-", "job", "pipeline", ("orders",))


def _records(n: int) -> list[dict[str, object]]:
    return [
        {
            "record_id": str(uuid.uuid4()),
            "run_id": "anchored",
            "event": "policy.fetched",
            "time": "2026-01-01T00:00:00Z",
            "policy": {"label": "orders", "version": 1, "sha256": "ab"},
        }
        for _ in range(n)
    ]


def _verify(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="cape")
    register(parser.add_subparsers(dest="command", required=True), None)
    args = parser.parse_args(["audit", "verify", *argv])
    return int(args.func(args))


@pytest.fixture
def chain(tmp_path: Path):
    copy = tmp_path / "audit.jsonl"
    paths = Paths.resolve(str(tmp_path / "cape.db"))
    coord, admin = Coordinator.initialize(paths, Settings(audit_jsonl=str(copy)))
    return coord, paths, copy, admin


def test_truncation_with_an_older_signed_anchor_is_caught_by_an_external_anchor(chain, capsys):
    coord, paths, copy, _ = chain
    coord.post_audit(PIPE, _records(3))
    with coord.engine.connect() as conn:
        old_anchor = conn.exec_driver_sql(
            "SELECT value FROM settings WHERE name = 'audit_anchor'"
        ).scalar()
        old_count = json.loads(old_anchor)["count"]
    coord.post_audit(PIPE, _records(3))
    coord.close()
    # The attack: delete the tail, put back the older (validly signed) anchor.
    with sqlite3.connect(paths.sqlite_file) as con:
        con.execute("DELETE FROM audit WHERE seq > ?", (old_count,))
        con.execute("UPDATE settings SET value = ? WHERE name = 'audit_anchor'", (old_anchor,))
    db = str(paths.sqlite_file)
    assert _verify("--db", db) == 0  # the database alone cannot tell
    capsys.readouterr()
    assert _verify("--db", db, "--anchor", str(copy)) == 1
    assert "missing" in capsys.readouterr().out


def test_the_jsonl_copy_carries_each_commits_signed_anchor(chain):
    coord, _, copy, _ = chain
    coord.post_audit(PIPE, _records(2))
    last = json.loads(copy.read_text().splitlines()[-1])
    anchor = last["anchor"]
    assert (anchor["count"], anchor["hash"]) == (last["seq"], last["hash"])
    key = Ed25519PublicKey.from_public_bytes(b64d(coord.public_key_text))
    message = b"cape-audit-anchor\x00" + f"{anchor['count']}:{anchor['hash']}".encode()
    key.verify(b64d(anchor["signature"]), message)
    coord.close()


def test_anchor_endpoint_and_a_saved_anchor_file(chain, tmp_path):
    coord, paths, _, admin = chain
    coord.post_audit(PIPE, _records(2))
    with TestClient(create_app(coord)) as http:
        resp = http.get("/v1/audit/anchor", headers={"Authorization": f"Bearer {admin}"})
        assert http.get("/v1/audit/anchor").status_code == 401
    assert resp.status_code == 200
    saved = tmp_path / "anchor.json"
    saved.write_text(resp.text)
    assert resp.json()["count"] == coord.audit_count()
    coord.close()
    assert _verify("--db", str(paths.sqlite_file), "--anchor", str(saved)) == 0
    forged = dict(resp.json(), hash="0" * 64)
    saved.write_text(json.dumps(forged))
    with pytest.raises(UsageError, match="signature does not verify"):
        _verify("--db", str(paths.sqlite_file), "--anchor", str(saved))


def test_wal_is_truncated_while_serving(chain, monkeypatch):
    from cape_coordinator.services import chain as chain_module

    coord, paths, _, _ = chain
    monkeypatch.setattr(chain_module, "CHECKPOINT_SECONDS", 0.0)
    coord.post_audit(PIPE, _records(50))
    wal = Path(str(paths.sqlite_file) + "-wal")
    try:
        # The coordinator is still open: only a checkpoint (TRUNCATE) empties its WAL.
        assert not wal.exists() or wal.stat().st_size == 0
    finally:
        coord.close()
