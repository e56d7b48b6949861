"""Schema migrations: a populated first-wave database (made before migrations existed)
is upgraded in place on SQLite and on PostgreSQL, keeping its data and its behaviour.

The first-wave schema is spelled out here as it was shipped (not imported), and
filled the way the first-wave coordinator wrote it: a sealed signing key, tokens,
policy versions in every state, a sealed key, a hash chain with its signed
anchor, and a run summary.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from sqlalchemy import (
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    inspect,
    select,
)

from cape_coordinator import migrate
from cape_coordinator.config import Paths, Settings
from cape_coordinator.coordinator import Coordinator
from cape_coordinator.crypto import (
    MasterKey,
    b64e,
    create_master_key_file,
    new_signing_key,
    new_token,
    public_key_text,
)
from cape_coordinator.services.base import Principal
from cape_pipelines.policy import canonical_json

FIRST_WAVE = MetaData()
Table(
    "settings",
    FIRST_WAVE,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
Table(
    "tokens",
    FIRST_WAVE,
    Column("id", String(32), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("role", String(16), nullable=False),
    Column("secret_hash", String(64), nullable=False),
    Column("labels", Text, nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("created_by", String(128), nullable=False),
    Column("expires_at", String(32)),
    Column("revoked_at", String(32)),
)
Table(
    "policies",
    FIRST_WAVE,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("label", String(128), nullable=False),
    Column("version", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("document", Text, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("author", String(128), nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("submitted_at", String(32)),
    Column("reviewed_by", String(128)),
    Column("reviewed_at", String(32)),
    Column("reason", Text),
    Column("activated_at", String(32)),
    Column("signature", String(128)),
    UniqueConstraint("label", "version", name="uq_policy_label_version"),
    Index("ix_policy_label_state", "label", "state"),
)
Table(
    "secrets",
    FIRST_WAVE,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False),
    Column("version", Integer, nullable=False),
    Column("sealed", LargeBinary, nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("created_by", String(128), nullable=False),
    UniqueConstraint("name", "version", name="uq_secret_name_version"),
)
Table(
    "secret_labels",
    FIRST_WAVE,
    Column("name", String(128), primary_key=True),
    Column("label", String(128), primary_key=True),
)
Table(
    "audit",
    FIRST_WAVE,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("record_id", String(128), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),
    Column("run_id", String(128)),
    Column("event", String(64), nullable=False),
    Column("label", String(128)),
    Column("time", String(32), nullable=False),
    Column("received_at", String(32), nullable=False),
    Column("body", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_run", "run_id"),
    Index("ix_audit_label_time", "label", "time"),
    Index("ix_audit_event_time", "event", "time"),
    Index("ix_audit_time", "time"),
)
Table(
    "runs",
    FIRST_WAVE,
    Column("run_id", String(128), primary_key=True),
    Column("engine", String(64)),
    Column("engine_version", String(64)),
    Column("label", String(128)),
    Column("version", Integer),
    Column("principal", String(128)),
    Column("status", String(16), nullable=False),
    Column("started_at", String(32)),
    Column("ended_at", String(32)),
    Column("last_seen", String(32), nullable=False),
    Column("rows_in", Integer),
    Column("rows_out", Integer),
    Column("rows_redacted", Integer),
    Column("error_type", String(128)),
    Column("records", Integer, nullable=False),
    Index("ix_runs_last_seen", "last_seen"),
)

T0 = "2026-06-01T10:00:00.000000Z"
LABEL = "orders"


def _anchor_message(count: int, last_hash: str) -> bytes:
    return b"cape-audit-anchor\x00" + f"{count}:{last_hash}".encode("ascii")


def _policy(version: int) -> bytes:
    doc = {
        "label": LABEL,
        "version": version,
        "rules": [{"match": {"name": f"col{version}"}, "actions": ["drop"]}],
    }
    return canonical_json(doc)


def fill_first_wave(url: str, key_file: Path) -> dict[str, str]:
    """A first-wave database at ``url`` as the first-wave coordinator left it; returns the
    tokens made (admin, pipeline)."""
    engine = create_engine(url)
    FIRST_WAVE.create_all(engine)
    master = MasterKey(create_master_key_file(key_file))
    signer, raw = new_signing_key()
    t = FIRST_WAVE.tables
    admin_id, admin_token, admin_hash = new_token()
    pipe_id, pipe_token, pipe_hash = new_token()
    entries: list[dict[str, object]] = []

    def own(event: str, **details: object) -> None:
        rec = {
            "record_id": f"own-{len(entries)}",
            "event": event,
            "time": T0,
            "principal": "admin",
            "role": "admin",
            **details,
        }
        entries.append({"kind": "coordinator", "source": "admin", "received_at": T0, "record": rec})

    own("token.created", token_id=admin_id, name="admin", token_role="admin", labels=[])
    own("token.created", token_id=pipe_id, name="job", token_role="pipeline", labels=[LABEL])
    for version in (1, 2):
        sha = hashlib.sha256(_policy(version)).hexdigest()
        own("policy.approved", label=LABEL, version=version, sha256=sha)
    for i, event in enumerate(("run.started", "run.completed")):
        rec = {
            "record_id": f"run-rec-{i}",
            "run_id": "run-1",
            "event": event,
            "time": f"2026-06-01T10:00:0{i + 1}.000000Z",
            "policy": {"label": LABEL, "version": 2},
            "engine": "pandas",
        }
        entries.append({"kind": "run", "source": "job", "received_at": T0, "record": rec})
    audit_rows, prev = [], "0" * 64
    for seq, entry in enumerate(entries, start=1):
        body = canonical_json(entry)
        digest = hashlib.sha256(bytes.fromhex(prev) + body).hexdigest()
        rec = entry["record"]
        assert isinstance(rec, dict)
        audit_rows.append(
            {
                "seq": seq,
                "record_id": rec["record_id"],
                "kind": entry["kind"],
                "run_id": rec.get("run_id"),
                "event": rec["event"],
                "label": rec["policy"]["label"] if "policy" in rec else rec.get("label"),
                "time": rec["time"],
                "received_at": T0,
                "body": body.decode(),
                "prev_hash": prev,
                "hash": digest,
            }
        )
        prev = digest
    anchor = {
        "count": len(audit_rows),
        "hash": prev,
        "signature": b64e(signer.sign(_anchor_message(len(audit_rows), prev))),
    }
    policies = []
    for version, state in ((1, "superseded"), (2, "active"), (3, "in_review")):
        body = _policy(version)
        policies.append(
            {
                "label": LABEL,
                "version": version,
                "state": state,
                "document": body.decode(),
                "sha256": hashlib.sha256(body).hexdigest(),
                "author": "alice",
                "created_at": T0,
                "submitted_at": T0,
                "reviewed_by": "bob" if state != "in_review" else None,
                "reviewed_at": T0 if state != "in_review" else None,
                "activated_at": T0 if state != "in_review" else None,
                "signature": b64e(signer.sign(body)) if state != "in_review" else None,
            }
        )
    token_row = {"created_at": T0, "created_by": "coordinator-init"}
    with engine.begin() as conn:
        conn.execute(
            t["settings"].insert(),
            [
                {"name": "schema_version", "value": "1"},
                {"name": "signing_key", "value": b64e(master.seal(raw, "signing-key:1"))},
                {"name": "public_key", "value": public_key_text(signer)},
                {"name": "audit_anchor", "value": json.dumps(anchor)},
            ],
        )
        conn.execute(
            t["tokens"].insert(),
            [
                {**token_row, "id": admin_id, "name": "admin", "role": "admin"}
                | {"secret_hash": admin_hash, "labels": "[]"},
                {**token_row, "id": pipe_id, "name": "job", "role": "pipeline"}
                | {"secret_hash": pipe_hash, "labels": json.dumps([LABEL])},
            ],
        )
        conn.execute(t["policies"].insert(), policies)
        conn.execute(
            t["secrets"].insert(),
            {
                "name": "k1",
                "version": 1,
                "sealed": master.seal(b"\x07" * 32, "secret:k1:1"),
                "created_at": T0,
                "created_by": "admin",
            },
        )
        conn.execute(t["secret_labels"].insert(), {"name": "k1", "label": LABEL})
        conn.execute(t["audit"].insert(), audit_rows)
        conn.execute(
            t["runs"].insert(),
            {
                "run_id": "run-1",
                "engine": "pandas",
                "label": LABEL,
                "version": 2,
                "status": "succeeded",
                "started_at": "2026-06-01T10:00:01.000000Z",
                "ended_at": "2026-06-01T10:00:02.000000Z",
                "last_seen": T0,
                "records": 2,
            },
        )
    engine.dispose()
    return {"admin": admin_token, "pipeline": pipe_token}


@pytest.fixture(params=["sqlite", "postgresql"])
def first_wave(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Paths, dict[str, str]]:
    if request.param == "sqlite":
        paths = Paths.resolve(str(tmp_path / "old.db"))
    else:
        url = request.getfixturevalue("pg_cluster").new_database("fw")
        paths = Paths.resolve(url, str(tmp_path / "old.key"), str(tmp_path / "old.json"))
    assert paths.key_file is not None
    tokens = fill_first_wave(paths.url, paths.key_file)
    return paths, tokens


def test_upgrade_keeps_data_and_behaviour(first_wave):
    paths, tokens = first_wave
    coord = Coordinator.open(paths, Settings(), upgrade=True)
    try:
        assert migrate.current(coord.engine) == migrate.head()
        with coord.engine.connect() as conn:
            assert inspect(conn).has_table("alembic_version")
        # The chain written before the upgrade still verifies, and grows on.
        before = coord.verify_audit()
        assert before.intact, before.problems
        assert before.count == 6
        admin = coord.tokens.authenticate(tokens["admin"])
        pipe = coord.tokens.authenticate(tokens["pipeline"])
        assert (admin.role, pipe.labels) == ("admin", (LABEL,))
        served = coord.policies.active(pipe, LABEL)
        assert (served.body, served.version) == (_policy(2), 2)
        assert served.sha256 == hashlib.sha256(served.body).hexdigest()
        assert json.loads(served.envelope)["activation_seq"] == 2
        assert [p["state"] for p in coord.policies.history(LABEL)] == [
            "superseded",
            "active",
            "in_review",
        ]
        keys = coord.secrets.for_label(pipe, LABEL)
        assert keys["k1"]["versions"] == {"1": b64e(b"\x07" * 32)}
        runs = coord.runs.list()
        assert [(r["run_id"], r["status"], r["records"]) for r in runs] == [
            ("run-1", "succeeded", 2)
        ]
        reviewer = Principal("-", "bob", "reviewer")
        coord.policies.approve(reviewer, LABEL, 3)
        assert coord.policies.active(pipe, LABEL).version == 3
        new = {
            "record_id": "after-upgrade",
            "run_id": "run-2",
            "event": "run.started",
            "time": "2026-06-02T00:00:00Z",
            "policy": {"label": LABEL, "version": 3},
        }
        assert coord.post_audit(pipe, [new])["accepted"] == 1
        # Record ids are now unique per sender (0005): another token's record may reuse
        # an id, here one the first wave stored and one just posted.
        other = Principal("other-token", "job-2", "pipeline", (LABEL,))
        reused = [
            dict(new, run_id="run-3"),
            dict(new, record_id="run-rec-0", run_id="run-3", event="run.completed"),
        ]
        assert coord.post_audit(other, reused) == {"accepted": 2, "duplicates": 0}
        after = coord.verify_audit()
        assert after.intact, after.problems
        assert after.count > before.count
        with coord.engine.connect() as conn:
            old = conn.execute(
                select(FIRST_WAVE.tables["audit"].c.hash).where(
                    FIRST_WAVE.tables["audit"].c.seq == 6
                )
            ).scalar_one()
        assert old == before.last_hash
    finally:
        coord.close()
    # A second upgrade is a no-op, and a plain open now works.
    again = Coordinator.open(paths, Settings())
    try:
        assert migrate.upgrade(again.engine) == (migrate.head(), migrate.head())
    finally:
        again.close()


def test_upgrade_command_and_fresh_init_are_at_head(tmp_path: Path):
    from _coord_support import run_cli

    db = tmp_path / "old.db"
    fill_first_wave(f"sqlite:///{db}", tmp_path / "old.db.key")
    out = run_cli("coordinator", "upgrade", "--db", str(db)).stdout
    assert f"revision {migrate.head()}" in out
    fresh = tmp_path / "new.db"
    run_cli("coordinator", "init", "--db", str(fresh))
    engine = create_engine(f"sqlite:///{fresh}")
    try:
        assert migrate.current(engine) == migrate.head()
    finally:
        engine.dispose()
