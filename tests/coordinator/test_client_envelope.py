"""Issue 9.4, client side: a policy is used only with a signed envelope that names it, and
never once a newer activation was seen (rollback); an offline copy only within a max age.

The coordinator here is a loopback stand-in signing with a real Ed25519 key, playing
the man in the middle: every response it serves below carries a valid signature.
"""

from __future__ import annotations

import base64
import hashlib
import json
import warnings

import pytest
import requests
from _coord_support import policy_doc
from _standin import Served, StandIn, b64e, envelope_json, keyed_doc

from cape_pipelines import cli
from coordinator_client import (
    Client,
    CoordinatorWarning,
    PolicyRefused,
    SignatureError,
)

_SIGNED_HEADERS = ("ETag", "X-Cape-Policy-Version", "X-Cape-Policy-Envelope", "X-Cape-Signature")


@pytest.fixture
def standin():
    s = StandIn()
    with s.running():
        yield s


def _client(standin: StandIn, tmp_path, **kwargs) -> Client:
    return Client(standin.url, "tok", public_key=standin.public_key, spool_dir=tmp_path, **kwargs)


def _offline(standin: StandIn, tmp_path, **kwargs) -> Client:
    return Client(
        "http://127.0.0.1:9",
        "tok",
        public_key=standin.public_key,
        spool_dir=tmp_path,
        timeout=2,
        **kwargs,
    )


def test_enveloped_policy_accepted_and_activation_remembered(standin, tmp_path):
    standin.activate(keyed_doc("customers", 1), seq=1)
    fetch = _client(standin, tmp_path).fetch_policy("customers")
    assert (fetch.policy.version, fetch.activation_seq, fetch.offline) == (1, 1, False)
    seen = json.loads((tmp_path / "policies" / "customers.seen.json").read_text())
    assert (seen["activation_seq"], seen["version"]) == (1, 1)
    # A 304 (same ETag) re-checks the cached copy and keeps working.
    assert _client(standin, tmp_path).get_policy("customers").version == 1


def test_mitm_serving_older_signed_version_after_newer_seen_is_refused(standin, tmp_path):
    old = standin.activate(keyed_doc("customers", 1), seq=1)
    client = _client(standin, tmp_path)
    assert client.get_policy("customers").version == 1
    standin.activate(keyed_doc("customers", 2, key="k2"), seq=2)
    assert client.get_policy("customers").version == 2
    # The attacker replays the superseded version 1, validly signed by the coordinator.
    standin.policies["customers"] = old
    with pytest.raises(PolicyRefused, match="older than activation 2 already seen; refused"):
        client.get_policy("customers")
    # A fresh client on the same cache (say, the pipeline restarted) refuses it too.
    with pytest.raises(PolicyRefused, match="rollback"):
        _client(standin, tmp_path).get_policy("customers")
    # An explicit rollback re-activates version 1 with a newer activation: accepted.
    standin.activate(keyed_doc("customers", 1), seq=3)
    assert client.get_policy("customers").version == 1


def test_same_activation_with_other_bytes_is_refused(standin, tmp_path):
    standin.activate(keyed_doc("customers", 2), seq=2)
    client = _client(standin, tmp_path)
    client.get_policy("customers")
    forged = keyed_doc("customers", 2)
    forged["rules"] = forged["rules"][1:]  # no longer drops ssn
    standin.policies["customers"] = standin.sign(forged, seq=2)
    with pytest.raises(PolicyRefused, match="activation 2 with other bytes"):
        client.get_policy("customers")


def test_replayed_envelope_of_another_label_is_refused(standin, tmp_path):
    """The orders response is the customers one, signature and all."""
    standin.activate(keyed_doc("customers", 5), seq=7)
    standin.policies["orders"] = standin.policies["customers"]
    with pytest.raises(PolicyRefused, match="envelope is for label 'customers', not 'orders'"):
        _client(standin, tmp_path).get_policy("orders")
    assert not (tmp_path / "policies" / "orders.json").exists()
    assert not (tmp_path / "policies" / "orders.seen.json").exists()


def test_envelope_for_another_version_is_refused(standin, tmp_path):
    standin.policies["customers"] = standin.sign(keyed_doc("customers", 1), seq=9, version=4)
    with pytest.raises(PolicyRefused, match="version 1 but its signed envelope says version 4"):
        _client(standin, tmp_path).get_policy("customers")


def test_signature_must_be_over_the_domain_separated_envelope(standin, tmp_path):
    # The same key signing the envelope without the prefix must not verify.
    standin.policies["customers"] = standin.sign(keyed_doc("customers", 1), seq=1, prefix=b"")
    with pytest.raises(SignatureError, match="does not verify against the pinned key"):
        _client(standin, tmp_path).get_policy("customers")


def test_envelope_hash_must_match_served_bytes(standin, tmp_path):
    served = standin.sign(keyed_doc("customers", 1), seq=1)
    other = json.dumps(keyed_doc("customers", 1)).encode()  # same policy, other bytes
    served.body = other
    served.headers["ETag"] = f'"{hashlib.sha256(other).hexdigest()}"'
    standin.policies["customers"] = served
    with pytest.raises(SignatureError, match="do not match the sha256 in its signed envelope"):
        _client(standin, tmp_path).get_policy("customers")


def test_unenveloped_response_is_refused(standin, tmp_path):
    """The old bare-body signature says nothing about the activation: stripping the
    envelope (a downgrade) is refused, before and after an envelope was seen."""
    doc = keyed_doc("customers", 1)
    served = standin.sign(doc, seq=1)
    del served.headers["X-Cape-Policy-Envelope"]
    served.headers["X-Cape-Signature"] = b64e(standin.signer.sign(served.body))
    standin.policies["customers"] = served
    with pytest.raises(PolicyRefused, match="has no signed envelope"):
        _client(standin, tmp_path).get_policy("customers")
    assert not (tmp_path / "policies" / "customers.json").exists()
    standin.activate(doc, seq=1)
    _client(standin, tmp_path).get_policy("customers")
    standin.policies["customers"] = served
    (tmp_path / "policies" / "customers.json").unlink()
    with pytest.raises(PolicyRefused, match="has no signed envelope"):
        _client(standin, tmp_path).get_policy("customers")


def test_edited_offline_cache_with_older_signed_copy_is_refused(standin, tmp_path):
    """An attacker with the cache directory swaps in a saved, validly signed older copy."""
    standin.activate(keyed_doc("customers", 1), seq=1)
    client = _client(standin, tmp_path)
    client.get_policy("customers")
    cache = tmp_path / "policies" / "customers.json"
    older = cache.read_text()
    standin.activate(keyed_doc("customers", 2), seq=2)
    client.get_policy("customers")
    cache.write_text(older)
    with pytest.raises(PolicyRefused, match="rollback"):
        _offline(standin, tmp_path).get_policy("customers")
    # And a cache whose envelope was edited (say, a higher activation) fails its signature.
    data = json.loads(older)
    envelope = json.loads(base64.urlsafe_b64decode(data["envelope"] + "=="))
    envelope["activation_seq"] = 99
    data["envelope"] = b64e(envelope_json(envelope))
    cache.write_text(json.dumps(data))
    with pytest.raises(SignatureError, match="cached policy's signature does not verify"):
        _offline(standin, tmp_path).get_policy("customers")


def _age_cache(tmp_path, label: str, seconds: float) -> None:
    cache = tmp_path / "policies" / f"{label}.json"
    data = json.loads(cache.read_text())
    data["checked_at"] -= seconds
    cache.write_text(json.dumps(data))


def test_offline_cache_older_than_max_age_is_refused(standin, tmp_path):
    standin.activate(keyed_doc("customers", 1), seq=1)
    _client(standin, tmp_path).get_policy("customers")
    with pytest.warns(CoordinatorWarning, match="unreachable; using cached policy customers"):
        fetch = _offline(standin, tmp_path, policy_max_age=3600).fetch_policy("customers")
    assert fetch.offline and fetch.policy.version == 1
    _age_cache(tmp_path, "customers", 2 * 3600)
    with pytest.raises(PolicyRefused, match=r"last checked online 2\.0 h ago, more than the"):
        _offline(standin, tmp_path, policy_max_age=3600).get_policy("customers")
    # The default is 24 hours; 0 lifts the limit.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CoordinatorWarning)
        assert _offline(standin, tmp_path).get_policy("customers").version == 1
        _age_cache(tmp_path, "customers", 48 * 3600)
        with pytest.raises(PolicyRefused, match=r"maximum age of 24\.0 h"):
            _offline(standin, tmp_path).get_policy("customers")
        assert _offline(standin, tmp_path, policy_max_age=0).get_policy("customers")
    # A copy claiming a check in the future was edited.
    _age_cache(tmp_path, "customers", -10 * 24 * 3600)
    with pytest.raises(PolicyRefused, match="in the future"):
        _offline(standin, tmp_path).get_policy("customers")


def test_max_age_env_and_cli_pass_through(standin, tmp_path, monkeypatch, capsys):
    standin.activate(keyed_doc("customers", 1), seq=1)
    spool = tmp_path / "spool"
    _client(standin, spool).get_policy("customers")
    _age_cache(spool, "customers", 600)
    monkeypatch.setenv("CAPE_POLICY_MAX_AGE", "60")
    with pytest.raises(PolicyRefused, match="maximum age of 60 s"):
        _offline(standin, spool).get_policy("customers")
    monkeypatch.delenv("CAPE_POLICY_MAX_AGE")
    data = tmp_path / "in.csv"
    data.write_text("ssn,age\n1,30\n")
    monkeypatch.setenv("CAPE_KEY_K1", "00" * 32)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    args = [
        "apply",
        "--policy-label",
        "customers",
        "--coordinator",
        "http://127.0.0.1:9",
        "--token",
        "tok",
        "--public-key",
        standin.public_key,
        "--input",
        str(data),
        "--output",
        str(tmp_path / "out.csv"),
        "--audit-file",
        str(tmp_path / "audit.jsonl"),
        "--policy-max-age",
        "60",
    ]
    # The CLI's client caches under XDG_CACHE_HOME: give it the aged copy.
    import coordinator_client.client as client_module

    target = client_module._default_dir("policies", "http://127.0.0.1:9")
    target.mkdir(parents=True)
    for name in ("customers.json", "customers.seen.json"):
        (target / name).write_bytes((spool / "policies" / name).read_bytes())
    assert cli.main(args) != 0
    assert "more than the maximum age of 60 s" in capsys.readouterr().err
    assert not (tmp_path / "out.csv").exists()
    with pytest.warns(CoordinatorWarning, match="unreachable; using cached policy"):
        assert cli.main([*args[:-1], "0"]) == 0
    assert (tmp_path / "out.csv").exists()


def test_cache_written_by_an_older_client(standin, tmp_path):
    """A copy without an envelope is never used offline, and is replaced online (no 304)."""
    served = standin.activate(keyed_doc("customers", 1), seq=1)
    cache = tmp_path / "policies" / "customers.json"
    cache.parent.mkdir(parents=True)
    old = {
        "etag": served.headers["ETag"],
        "signature": b64e(standin.signer.sign(served.body)),
        "body": served.body.decode(),
    }
    cache.write_text(json.dumps(old))
    with pytest.raises(PolicyRefused, match="cached policy customers has no signed envelope"):
        _offline(standin, tmp_path).get_policy("customers")
    assert _client(standin, tmp_path).fetch_policy("customers").activation_seq == 1
    assert json.loads(cache.read_text())["envelope"] == served.headers["X-Cape-Policy-Envelope"]


def test_real_coordinator_replay_refused_and_explicit_rollback_accepted(fresh_server, tmp_path):
    """The coordinator's own signed answer for version 1, replayed by a man in the middle
    after version 2 was seen, is refused; the reviewer's explicit rollback is accepted."""
    srv = fresh_server
    admin = srv.client(srv.admin_token)
    author, reviewer = (
        srv.client(admin.create_token(f"{r}-p", r)["token"]) for r in ("author", "reviewer")
    )
    pipeline = admin.create_token("job", "pipeline", labels=["customers"])["token"]

    def publish(column: str) -> int:
        version = author.push_policy(policy_doc("customers", column=column))["version"]
        author.submit_policy("customers", version)
        reviewer.approve_policy("customers", version)
        return version

    v1 = publish("ssn")
    captured = requests.get(
        f"{srv.url}/v1/policies/customers/active",
        headers={"Authorization": f"Bearer {pipeline}"},
        timeout=10,
    )
    client = srv.client(pipeline, spool_dir=tmp_path)
    assert client.fetch_policy("customers").activation_seq == 1
    v2 = publish("email")
    assert (client.fetch_policy("customers").policy.version, v2) == (2, 2)

    mitm = StandIn()
    mitm.policies["customers"] = Served(
        captured.content, {k: captured.headers[k] for k in _SIGNED_HEADERS}
    )
    with mitm.running():
        victim = Client(mitm.url, pipeline, public_key=srv.public_key, spool_dir=tmp_path)
        with pytest.raises(PolicyRefused, match=r"version 1, activation 1\) is older"):
            victim.get_policy("customers")
    reviewer.rollback_policy("customers", v1, reason="v2 breaks the nightly job")
    fetch = client.fetch_policy("customers")
    assert (fetch.policy.version, fetch.activation_seq) == (1, 3)
    with mitm.running():
        victim = Client(mitm.url, pipeline, public_key=srv.public_key, spool_dir=tmp_path)
        with pytest.raises(PolicyRefused, match="older than activation 3 already seen"):
            victim.get_policy("customers")
