"""The client: signature checks before a policy is used, the ETag cache, offline fallback,
and the durable audit spool across a coordinator outage and a client restart."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from _coord_support import policy_doc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import cape_pipelines as cape
from cape_pipelines.audit import MemorySink, RunContext
from coordinator_client import (
    Client,
    CoordinatorWarning,
    SignatureError,
    Unavailable,
)


def _other_key() -> bytes:
    return Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _activate(clients, label, column="ssn", key=None):
    v = clients["author"].push_policy(policy_doc(label, column=column, key=key))["version"]
    clients["author"].submit_policy(label, v)
    clients["reviewer"].approve_policy(label, v)
    return v


@pytest.fixture(scope="module")
def customers(clients):
    """customers is active, perturbing age with a coordinator key."""
    if "cust-key" not in {k["name"] for k in clients["admin"].list_keys()}:
        clients["admin"].create_key("cust-key", ["customers"])
    return _activate(clients, "customers", key="cust-key")


def test_wrong_pinned_key_refused_before_returning(server, tokens, customers, tmp_path):
    client = Client(server.url, tokens["pipeline"], public_key=_other_key(), spool_dir=tmp_path)
    with pytest.raises(SignatureError, match="does not verify against the pinned key"):
        client.get_policy("customers")
    assert not (tmp_path / "policies" / "customers.json").exists()


def test_no_pinned_key_refused(server, tokens, tmp_path, monkeypatch):
    monkeypatch.delenv("CAPE_COORDINATOR_PUBLIC_KEY", raising=False)
    client = Client(server.url, tokens["pipeline"], spool_dir=tmp_path)
    with pytest.raises(SignatureError, match="no pinned public key"):
        client.get_policy("customers")


@pytest.mark.parametrize(
    "field,tamper",
    [
        ("body", lambda s: s.replace('"ssn"', '"nothing"')),  # the document no longer drops ssn
        ("signature", lambda s: s[:-4] + ("AAAA" if not s.endswith("AAAA") else "BBBB")),
    ],
)
def test_modified_cache_refused(server, tokens, customers, tmp_path, field, tamper):
    client = server.client(tokens["pipeline"], spool_dir=tmp_path)
    assert client.get_policy("customers").version == customers
    cache = tmp_path / "policies" / "customers.json"
    data = json.loads(cache.read_text())
    data[field] = tamper(data[field])
    cache.write_text(json.dumps(data))
    # The coordinator answers 304 (same ETag): the client must re-verify what it holds.
    with pytest.raises(SignatureError, match="cached policy"):
        client.get_policy("customers")
    # And with the coordinator unreachable, the tampered cache is refused too.
    offline = Client(
        "http://127.0.0.1:9",
        tokens["pipeline"],
        public_key=server.public_key,
        spool_dir=tmp_path,
        timeout=2,
    )
    with pytest.raises(SignatureError):
        offline.get_policy("customers")


def test_offline_uses_last_verified_policy_with_warning(server, tokens, customers, tmp_path):
    client = server.client(tokens["pipeline"], spool_dir=tmp_path)
    online = client.get_policy("customers")
    offline = Client(
        "http://127.0.0.1:9",
        tokens["pipeline"],
        public_key=server.public_key,
        spool_dir=tmp_path,
        timeout=2,
    )
    with pytest.warns(CoordinatorWarning, match="unreachable; using cached policy customers"):
        cached = offline.get_policy("customers")
    assert (cached.version, cached.sha256) == (online.version, online.sha256)
    with pytest.raises(Unavailable):
        Client(
            "http://127.0.0.1:9",
            tokens["pipeline"],
            public_key=server.public_key,
            spool_dir=tmp_path / "empty",
            timeout=2,
        ).get_policy("customers")


def test_policy_and_keys_apply(server, tokens, customers, tmp_path):
    client = server.client(tokens["pipeline"], spool_dir=tmp_path)
    policy, resolver = client.policy_and_keys("customers")
    frame = pd.DataFrame({"age": [30, 40, 50], "ssn": ["1", "2", "3"]})
    sink = client.audit_sink()
    out = cape.apply_policy(policy, frame, resolver=resolver, audit=sink)
    assert list(out.columns) == ["age"]
    assert sink.flush(30)
    explicit = cape.apply_policy(
        policy, frame, keys=client.get_keys("customers"), audit=MemorySink()
    )
    pd.testing.assert_frame_equal(out, explicit)
    client.close()


def test_coordinator_down_mid_run_delivered_once(fresh_server, tmp_path):
    """Records emitted while the coordinator is down are spooled, then delivered exactly once
    by a new client process on the same spool after the coordinator is back."""
    srv = fresh_server
    admin = srv.client(srv.admin_token)
    token = admin.create_token("job", "pipeline", labels=["customers"])["token"]
    spool = tmp_path / "spool"

    client = srv.client(token, spool_dir=spool, timeout=2)
    sink = client.audit_sink(min_backoff=0.05, max_backoff=0.5)
    run = RunContext(
        engine="pandas", sink=sink, policy={"label": "customers", "version": 1, "sha256": "x"}
    )
    started = run.started()
    assert sink.flush(30)

    srv.stop()
    emitted = [started]
    for _ in range(20):
        emitted.append(run.emit("policy.fetched", source="test"))
    emitted.append(run.record("run.completed", rows_in=5, rows_out=5, rows_redacted=0, columns={}))
    sink.emit(emitted[-1])
    assert sink.pending_count() == 21
    assert not sink.flush(1.0)
    sink.close(timeout=0.5)  # the process ends with its records still spooled
    assert len(list((spool / "pending").glob("*.json"))) == 21

    srv.start()
    again = srv.client(token, spool_dir=spool)
    # Re-post some already-delivered records: the coordinator must not store them twice.
    again.post_audit(emitted[:3])
    restarted = again.audit_sink()
    assert restarted.flush(60)
    restarted.close()

    auditor = srv.client(admin.create_token("aud", "auditor")["token"])
    stored = auditor.list_audit(run_id=run.run_id, limit=1000)
    ids = [e["record"]["record_id"] for e in stored]
    assert sorted(ids) == sorted(r["record_id"] for r in emitted)
    assert len(ids) == len(set(ids)) == 22
    assert auditor.list_runs()[0]["status"] == "succeeded"
    assert auditor.verify_audit()["intact"]


def test_refused_record_moved_aside(fresh_server, tmp_path):
    srv = fresh_server
    admin = srv.client(srv.admin_token)
    token = admin.create_token("job", "pipeline", labels=["customers"])["token"]
    client = srv.client(token, spool_dir=tmp_path)
    sink = client.audit_sink()
    # Every record names its label (issue 9.1), so the good one does too.
    policy = {"label": "customers", "version": 1, "sha256": "ab"}
    good = RunContext(engine="pandas", sink=sink, policy=policy).record("run.started")
    sink.emit({**good, "record_id": "bad", "event": "not.an.event"})
    sink.emit(good)
    assert sink.flush(30)
    sink.close()
    # The refused record is set aside with the reason beside it (issue 9.6).
    rejected = sorted(p.name for p in (tmp_path / "rejected").iterdir())
    assert [n.endswith("-bad.json") for n in rejected] == [True, False]
    assert rejected[1] == rejected[0][: -len(".json")] + ".reason.json"
    reason = json.loads((tmp_path / "rejected" / rejected[1]).read_text())
    assert (reason["status"], reason["tries"]) == (422, 5)
