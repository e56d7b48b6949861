"""Issue 9, server side: the coordinator tried as a malicious or broken pipeline would.

Each test here failed on the first-wave coordinator. Every refused write checks
that nothing of it was stored. The tests run in process (the app over a
``TestClient``) against SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _coord_support import policy_doc, run_cli
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi.testclient import TestClient

from cape_coordinator.app import create_app
from cape_coordinator.config import Paths, Settings
from cape_coordinator.coordinator import Coordinator
from cape_coordinator.services.base import Principal

ADMIN = Principal("-", "root", "admin")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Api:
    """The app in process, with one token per person of the story."""

    def __init__(self, coord: Coordinator):
        self.coord = coord
        self.http = TestClient(create_app(coord))
        self.tokens: dict[str, str] = {}
        for name, role, labels in (
            ("alice", "author", []),
            ("carol", "author", []),
            ("bob", "reviewer", []),
            ("orders-job", "pipeline", ["orders"]),
            ("orders-job-2", "pipeline", ["orders"]),
            ("customers-job", "pipeline", ["customers"]),
            ("audi", "auditor", []),
        ):
            self.tokens[name] = coord.tokens.create(ADMIN, name=name, role=role, labels=labels)[1]

    def call(self, who: str, method: str, path: str, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"}
        return self.http.request(method, path, headers=headers, **kw)

    def stored(self, run_id: str) -> list[dict[str, Any]]:
        return self.coord.ingest.list(run_id=run_id, limit=1000)


@pytest.fixture(params=["sqlite", "postgresql"])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    if request.param == "sqlite":
        paths = Paths.resolve(str(tmp_path / "c.db"))
    else:
        url = request.getfixturevalue("pg_cluster").new_database("trust")
        paths = Paths.resolve(url, str(tmp_path / "c.key"), str(tmp_path / "c.json"))
    settings = Settings(audit_jsonl=str(tmp_path / "copy" / "audit.jsonl"))
    coord, admin_token = Coordinator.initialize(paths, settings)
    api = Api(coord)
    api.tokens["admin"] = admin_token
    try:
        yield api
    finally:
        api.http.close()
        coord.close()


def record(run_id: str, event: str = "run.started", label: str | None = "orders", **kw: Any):
    rec: dict[str, Any] = {
        "record_id": str(uuid.uuid4()),
        "run_id": run_id,
        "event": event,
        "time": "2026-01-01T00:00:00.000000Z",
        "engine": "pandas",
    }
    if label is not None:
        rec["policy"] = {"label": label, "version": 1, "sha256": "ab"}
    rec.update(kw)
    return rec


# ---- 1. ingest bound to the sender's labels and runs ------------------------------------


def test_a_token_cannot_fail_another_labels_run(api):
    run = "customers-run"
    assert (
        api.call(
            "customers-job", "POST", "/v1/audit", json={"records": [record(run, label="customers")]}
        ).status_code
        == 200
    )
    # The first-wave hole: no `policy` in the record, so no label was checked. A record
    # must now name a label at all (issue 9.1), so it is refused before any run lookup.
    forged = record(run, "run.failed", label=None, error={"type": "Sabotage"})
    resp = api.call("orders-job", "POST", "/v1/audit", json={"records": [forged]})
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "record_invalid"
    assert resp.json()["error"]["index"] == 0
    assert resp.json()["error"]["record_id"] == forged["record_id"]
    # A label the token does not hold is refused before anything else.
    forged = record(run, "run.failed", label="customers")
    resp = api.call("orders-job", "POST", "/v1/audit", json={"records": [forged]})
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "label_not_allowed"
    # Naming its own label does not help either: the run is bound to its first sender.
    forged = record(run, "run.failed", label="orders")
    resp = api.call("orders-job", "POST", "/v1/audit", json={"records": [forged]})
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "run_not_yours"
    assert [e["record"]["event"] for e in api.stored(run)] == ["run.started"]
    status = {r["run_id"]: r["status"] for r in api.coord.runs.list()}
    assert status[run] == "running"


def test_a_record_naming_no_label_is_refused_even_in_its_own_run(api):
    # The hole left open before: a label-less record was still taken into a run of the
    # same token. Every record must name a label; the batch is refused whole.
    run = "own-run"
    started = record(run)
    assert (
        api.call("orders-job", "POST", "/v1/audit", json={"records": [started]}).status_code == 200
    )
    good = record(run, "policy.fetched")
    bare = record(run, "run.failed", label=None, error={"type": "Boom"})
    resp = api.call("orders-job", "POST", "/v1/audit", json={"records": [good, bare]})
    assert resp.status_code == 422
    err = resp.json()["error"]
    assert (err["code"], err["index"], err["record_id"]) == ("record_invalid", 1, bare["record_id"])
    assert "label" in err["message"]
    # A policy without its label is the same as none.
    bare = dict(record(run, "run.failed"), policy={"version": 1})
    resp = api.call("orders-job", "POST", "/v1/audit", json={"records": [bare]})
    assert (resp.status_code, resp.json()["error"]["code"]) == (422, "record_invalid")
    assert [e["record"]["event"] for e in api.stored(run)] == ["run.started"]
    assert {r["run_id"]: r["status"] for r in api.coord.runs.list()}[run] == "running"


def test_a_run_is_bound_to_its_first_token(api):
    run = "orders-run"
    first = record(run)
    assert api.call("orders-job", "POST", "/v1/audit", json={"records": [first]}).status_code == 200
    other = record(run, "run.completed")
    resp = api.call("orders-job-2", "POST", "/v1/audit", json={"records": [other]})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "run_not_yours"
    assert len(api.stored(run)) == 1


# ---- 2. record ids: conflicts are 409, never a silent drop ------------------------------


def test_a_predicted_record_id_cannot_silence_another_senders_record(api):
    # Beam derives record ids from the run id, so they can be predicted. Ids are
    # namespaced by sender (issue 9.2): a squatter posting B's ids first, from another
    # token and label, stores only its own records; B's real records are stored and
    # B's run completes. (Before, B's records were a 409 and ended in the spool's
    # rejected/ folder: still silenced.)
    from cape_pipelines.seam import record_id

    victim_run = "victim-run"
    ids = {e: record_id(victim_run, e) for e in ("run.started", "run.completed")}
    squat = [record("squat-run", e, label="customers", record_id=rid) for e, rid in ids.items()]
    resp = api.call("customers-job", "POST", "/v1/audit", json={"records": squat})
    assert resp.json() == {"accepted": 2, "duplicates": 0}
    real = [record(victim_run, e, record_id=rid, rows_in=3) for e, rid in ids.items()]
    resp = api.call("orders-job", "POST", "/v1/audit", json={"records": real})
    assert resp.status_code == 200 and resp.json() == {"accepted": 2, "duplicates": 0}
    assert [e["record"] for e in api.stored(victim_run)] == real
    assert [e["record"] for e in api.stored("squat-run")] == squat
    status = {r["run_id"]: r["status"] for r in api.coord.runs.list()}
    assert status[victim_run] == "succeeded"
    # Its sender's identical resend is still a duplicate, and the squatter's is too.
    resp = api.call("orders-job", "POST", "/v1/audit", json={"records": real})
    assert resp.json() == {"accepted": 0, "duplicates": 2}
    resp = api.call("customers-job", "POST", "/v1/audit", json={"records": squat})
    assert resp.json() == {"accepted": 0, "duplicates": 2}
    # The same id with other content from the id's own sender is still a conflict.
    changed = dict(real[1], rows_in=4)
    resp = api.call("orders-job", "POST", "/v1/audit", json={"records": [changed]})
    assert (resp.status_code, resp.json()["error"]["code"]) == (409, "record_conflict")
    assert len(api.stored(victim_run)) == 2
    assert api.coord.verify_audit().intact


def test_same_sender_resend_is_a_duplicate_other_content_a_conflict(api):
    rec = record("resend-run")
    post = lambda recs: api.call("orders-job", "POST", "/v1/audit", json={"records": recs})  # noqa: E731
    assert post([rec]).json() == {"accepted": 1, "duplicates": 0}
    assert post([rec]).json() == {"accepted": 0, "duplicates": 1}
    changed = dict(rec, event="run.failed")
    resp = post([changed])
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "record_conflict"
    twice = [record("resend-run", "policy.fetched")]
    twice.append(dict(twice[0], engine="other"))
    assert post(twice).status_code == 409
    assert [e["record"]["event"] for e in api.stored("resend-run")] == ["run.started"]


# ---- 3. receipt time ---------------------------------------------------------------------


def test_filters_and_runs_use_receipt_time(api):
    old = record("backdated", time="2001-01-01T00:00:00Z")
    done = record("backdated", "run.completed", time="2001-01-01T00:00:05Z")
    assert (
        api.call("orders-job", "POST", "/v1/audit", json={"records": [old, done]}).status_code
        == 200
    )
    entries = api.stored("backdated")
    received = entries[0]["received_at"]
    assert received > "2026"
    assert entries[0]["record"]["time"] == "2001-01-01T00:00:00Z"  # the client's, kept
    since = api.coord.ingest.list(run_id="backdated", since=_parse(received))
    assert len(since) == 2
    assert api.coord.ingest.list(run_id="backdated", until=_parse("2001-01-02T00:00:00Z")) == []
    run = next(r for r in api.coord.runs.list() if r["run_id"] == "backdated")
    assert run["started_at"] == received and run["ended_at"] == received
    assert run["client_started_at"] == "2001-01-01T00:00:00.000000Z"
    assert run["client_ended_at"] == "2001-01-01T00:00:05.000000Z"


def _parse(text: str):
    from cape_coordinator.db import parse_time

    return parse_time(text)


# ---- 6. a record the server cannot take is a 422 naming it ------------------------------


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    "bad",
    [
        {"deep": _nested(300)},
        {"note": "a\x00b"},
        {"engine": "ok", "error": {"message": "bell\x07"}},
        {"time": "yesterday"},
    ],
    ids=["300-deep", "NUL", "control", "bad-time"],
)
def test_a_poisoned_record_is_a_422_naming_it(api, bad):
    good = record("poison-run")
    poisoned = record("poison-run", "policy.fetched", **bad)
    before = api.coord.audit_count()
    resp = api.call("orders-job", "POST", "/v1/audit", json={"records": [good, poisoned]})
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert (err["code"], err["index"], err["record_id"]) == (
        "record_invalid",
        1,
        poisoned["record_id"],
    )
    assert api.coord.audit_count() == before


# ---- 4. the signed envelope, activation numbers, rollback, state from the chain ----------


def _push_and_approve(api: Api, label: str, column: str) -> int:
    version = api.call(
        "alice", "POST", "/v1/policies", json={"document": policy_doc(label, column)}
    ).json()["version"]
    assert (
        api.call("alice", "POST", f"/v1/policies/{label}/versions/{version}/submit").status_code
        == 200
    )
    resp = api.call("bob", "POST", f"/v1/policies/{label}/versions/{version}/approve")
    assert resp.status_code == 200, resp.text
    return int(version)


def _fetch(api: Api, label: str) -> tuple[bytes, dict[str, Any]]:
    resp = api.call("orders-job", "GET", f"/v1/policies/{label}/active")
    assert resp.status_code == 200, resp.text
    envelope_bytes = _b64d(resp.headers["X-Cape-Policy-Envelope"])
    key = Ed25519PublicKey.from_public_bytes(_b64d(api.coord.public_key_text))
    key.verify(
        _b64d(resp.headers["X-Cape-Signature"]), b"cape.policy-envelope.v1\n" + envelope_bytes
    )
    envelope = json.loads(envelope_bytes)
    assert (
        envelope_bytes
        == json.dumps(envelope, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    )
    assert envelope["sha256"] == hashlib.sha256(resp.content).hexdigest()
    assert int(resp.headers["X-Cape-Policy-Version"]) == envelope["version"]
    return resp.content, envelope


def test_signed_envelope_and_explicit_rollback(api):
    v1 = _push_and_approve(api, "orders", "ssn")
    _, env = _fetch(api, "orders")
    assert (env["label"], env["version"], env["activation_seq"]) == ("orders", v1, 1)
    assert env["activated_at"].endswith("Z") and len(env["activated_at"]) == 27
    # The signature covers the envelope, not the bare body any more.
    v2 = _push_and_approve(api, "orders", "email")
    _, env = _fetch(api, "orders")
    assert (env["version"], env["activation_seq"]) == (v2, 2)
    # Going back is an explicit rollback with a reason, and a newer activation.
    assert (
        api.call(
            "bob",
            "POST",
            f"/v1/policies/orders/versions/{v1}/rollback",
            json={"reason": "bad rule"},
        ).status_code
        == 200
    )
    _, env = _fetch(api, "orders")
    assert (env["version"], env["activation_seq"]) == (v1, 3)
    rolled = [e for e in api.coord.ingest.list(event="policy.rolled_back")]
    assert rolled[-1]["record"]["reason"] == "bad rule"
    assert rolled[-1]["record"]["from_version"] == v2
    assert api.coord.verify_audit().intact


def test_approving_a_stale_version_does_not_roll_back(api):
    stale = api.call(
        "alice", "POST", "/v1/policies", json={"document": policy_doc("orders", "a")}
    ).json()["version"]
    api.call("alice", "POST", f"/v1/policies/orders/versions/{stale}/submit")
    newer = _push_and_approve(api, "orders", "b")
    count = api.coord.audit_count()
    resp = api.call("bob", "POST", f"/v1/policies/orders/versions/{stale}/approve")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "stale_version"
    assert _fetch(api, "orders")[1]["version"] == newer
    assert api.coord.audit_count() == count
    assert api.coord.policies.info("orders", stale)["state"] == "in_review"


def test_a_state_flip_in_the_database_is_caught_and_not_served(api):
    v1 = _push_and_approve(api, "orders", "a")
    v2 = _push_and_approve(api, "orders", "b")
    from sqlalchemy import update

    from cape_coordinator import db

    with api.coord.engine.begin() as conn:
        conn.execute(
            update(db.policies).where(db.policies.c.version == v2).values(state="superseded")
        )
        conn.execute(update(db.policies).where(db.policies.c.version == v1).values(state="active"))
    assert _fetch(api, "orders")[1]["version"] == v2  # served from the chain, not the column
    result = api.coord.verify_audit()
    assert not result.intact
    assert any("policy orders" in p for p in result.problems), result.problems


def test_an_edited_stored_document_is_not_served(api):
    _push_and_approve(api, "orders", "a")
    from sqlalchemy import update

    from cape_coordinator import db

    with api.coord.engine.begin() as conn:
        conn.execute(update(db.policies).values(document='{"label":"orders","rules":[]}'))
    resp = api.call("orders-job", "GET", "/v1/policies/orders/active")
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "policy_integrity"


# ---- smaller findings ----------------------------------------------------------------------


def test_an_author_cannot_submit_another_authors_draft(api):
    version = api.call(
        "alice", "POST", "/v1/policies", json={"document": policy_doc("orders")}
    ).json()["version"]
    resp = api.call("carol", "POST", f"/v1/policies/orders/versions/{version}/submit")
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "not_author"
    assert api.coord.policies.info("orders", version)["state"] == "draft"


def test_token_creation_is_not_cacheable(api):
    resp = api.call("admin", "POST", "/v1/tokens", json={"name": "n", "role": "auditor"})
    assert resp.status_code == 201
    assert resp.headers["Cache-Control"] == "no-store"


def test_the_last_admin_cannot_revoke_itself(api):
    me = api.coord.tokens.authenticate(api.tokens["admin"])
    count = api.coord.audit_count()
    resp = api.call("admin", "POST", f"/v1/tokens/{me.token_id}/revoke")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "last_admin"
    assert api.coord.audit_count() == count
    assert api.call("admin", "GET", "/v1/tokens").status_code == 200
    # With a second admin, it may.
    api.call("admin", "POST", "/v1/tokens", json={"name": "second", "role": "admin"})
    assert api.call("admin", "POST", f"/v1/tokens/{me.token_id}/revoke").status_code == 200


def test_api_docs_are_off_unless_enabled(api):
    assert api.http.get("/openapi.json").status_code == 404
    assert api.http.get("/docs").status_code == 404


def test_audit_copy_is_created_0600(api, tmp_path):
    old = os.umask(0)
    try:
        api.call("orders-job", "POST", "/v1/audit", json={"records": [record("copy-run")]})
    finally:
        os.umask(old)
    copy = tmp_path / "copy" / "audit.jsonl"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600


def test_no_body_is_read_before_the_token_is_checked(api):
    import anyio

    app = api.http.app
    reads: list[int] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        reads.append(1)
        return {"type": "http.request", "body": b"{" * 4096, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    for auth in ([], [(b"authorization", b"Bearer cape_0000000000000000.nope")]):
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/audit",
            "raw_path": b"/v1/audit",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json"), *auth],
            "http_version": "1.1",
            "scheme": "http",
            "server": ("127.0.0.1", 80),
            "client": ("127.0.0.1", 1),
            "root_path": "",
            "app": app,
        }
        sent.clear()
        anyio.run(app, scope, receive, send)
        assert sent[0]["status"] == 401
    assert reads == []


# ---- offline recovery (SQLite file: the CLI opens it directly) ---------------------------------


def test_offline_admin_token_recovery_is_audited(tmp_path):
    db_file = tmp_path / "cape.db"
    run_cli("coordinator", "init", "--db", str(db_file))
    out = run_cli("coordinator", "admin-token", "--db", str(db_file), "--name", "ops").stdout
    token = out.strip().splitlines()[-1]
    coord = Coordinator.open(Paths.resolve(str(db_file)), Settings())
    try:
        assert coord.tokens.authenticate(token).role == "admin"
        made = [e["record"] for e in coord.ingest.list(event="token.created")]
        assert made[-1]["principal"] == "offline-recovery" and made[-1]["name"] == "ops"
        assert coord.verify_audit().intact
    finally:
        coord.close()
    with sqlite3.connect(db_file) as con:
        assert con.execute("SELECT count(*) FROM tokens WHERE role = 'admin'").fetchone()[0] == 2


def test_server_logs_never_print_exception_details(capsys):
    import logging
    import logging.config

    from cape_coordinator.logs import uvicorn_log_config

    logging.config.dictConfig(uvicorn_log_config())
    try:
        raise ValueError("4f1c-secret-from-a-request")
    except ValueError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    err = capsys.readouterr().err
    assert "Exception in ASGI application" in err and "ValueError" in err
    assert "4f1c-secret" not in err and "Traceback" not in err


@pytest.mark.parametrize("where", ["column", "key"])
def test_nul_in_a_policy_is_refused_and_nothing_stored(api, where):
    doc = policy_doc("orders", "ss\x00n")
    if where == "key":
        doc = {**policy_doc("orders"), "descr\x01ption": "x"}
    count = api.coord.audit_count()
    resp = api.call("alice", "POST", "/v1/policies", json={"document": doc})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "invalid_text"
    assert api.coord.audit_count() == count
    assert api.coord.policies.labels() == []


def test_nul_in_a_reason_is_refused_and_nothing_stored(api):
    version = api.call(
        "alice", "POST", "/v1/policies", json={"document": policy_doc("orders")}
    ).json()["version"]
    api.call("alice", "POST", f"/v1/policies/orders/versions/{version}/submit")
    resp = api.call(
        "bob", "POST", f"/v1/policies/orders/versions/{version}/reject", json={"reason": "no\x00"}
    )
    assert resp.status_code == 422
    assert api.coord.policies.info("orders", version)["state"] == "in_review"


def test_refusals_name_the_position_as_sent_and_runs_bind_within_a_batch(api):
    # Within one batch, a new run is bound to its first record's label too; the refusal
    # names the record's position as sent (the repeat of `a` before it counts).
    new = "new-run"
    a = record(new, label="orders")
    b = record(new, "run.completed", label="orders")
    stranger = api.coord.tokens.create(
        ADMIN, name="multi", role="pipeline", labels=["orders", "customers"]
    )[1]
    api.tokens["multi"] = stranger
    c = record(new, "run.failed", label="customers")
    resp = api.call("multi", "POST", "/v1/audit", json={"records": [a, b, a, c]})
    assert resp.status_code == 403
    err = resp.json()["error"]
    assert (err["code"], err["index"], err["record_id"]) == ("run_not_yours", 3, c["record_id"])
    assert api.stored(new) == []
