"""Issue 9.7: a keyed policy survives a coordinator outage only by the operator's choice
(an encrypted key cache, or keys from the local chain), the run says it was offline, and
no plaintext key ever reaches the disk.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import stat
import time
from pathlib import Path

import pandas as pd
import pytest
from _coord_support import policy_doc

import cape_pipelines as cape
from cape_pipelines.errors import CapeError
from coordinator_client import (
    AuthError,
    Client,
    CoordinatorWarning,
    KeyCache,
    KeyCacheError,
)

WRAP = bytes(range(100, 132))
FRAME = pd.DataFrame({"age": [30, 41, 52, 63], "ssn": ["1", "2", "3", "4"]})


def _forms(key: bytes) -> list[bytes]:
    """Every way a key could be written down: raw, hex (both cases), base64 (both alphabets)."""
    b64 = base64.b64encode(key)
    url = base64.urlsafe_b64encode(key)
    return [key, key.hex().encode(), key.hex().upper().encode(), b64, b64.rstrip(b"="), url]


def _assert_no_key_on_disk(directories: list[Path], keys: list[bytes]) -> None:
    for directory in directories:
        for path in directory.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                for key in keys:
                    for form in _forms(key):
                        assert form not in data, f"key material in {path}"


# ---- the cache itself ---------------------------------------------------------------------


def test_sealed_roundtrip_0600_and_no_plaintext(tmp_path):
    cache = KeyCache(tmp_path / "kc", WRAP)
    secret = os.urandom(32)
    cache.store("http://c", "customers", "tok", {"k1": {1: secret, 2: secret[::-1]}})
    versions, _ = cache.load("http://c", "customers", "tok")
    assert versions == {"k1": {1: secret, 2: secret[::-1]}}
    (entry,) = (tmp_path / "kc").iterdir()
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "kc").stat().st_mode) == 0o700
    _assert_no_key_on_disk([tmp_path], [secret, secret[::-1], WRAP])
    assert "100" not in repr(cache) and "hidden" in repr(cache)
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(cache)


def test_entry_expires_after_ttl_and_is_erased(tmp_path):
    cache = KeyCache(tmp_path, WRAP, ttl=0.2)
    cache.store("http://c", "customers", "tok", {"k1": {1: b"x" * 32}})
    time.sleep(0.3)
    assert cache.load("http://c", "customers", "tok") is None
    assert not list(tmp_path.glob("*.keys"))


@pytest.mark.parametrize(
    "attack",
    ["extend expiry", "other token", "other wrapping key", "copied to another label", "bit flip"],
)
def test_tampered_or_misused_entry_does_not_decrypt(tmp_path, attack):
    cache = KeyCache(tmp_path, WRAP, ttl=60)
    cache.store("http://c", "customers", "tok", {"k1": {1: b"x" * 32}})
    (path,) = tmp_path.glob("*.keys")
    entry = json.loads(path.read_text())
    label, token, reader = "customers", "tok", cache
    if attack == "extend expiry":
        entry["expires_at"] += 10 * 24 * 3600
    elif attack == "other token":
        token = "another-token"
    elif attack == "other wrapping key":
        reader = KeyCache(tmp_path, bytes(32), ttl=60)
    elif attack == "copied to another label":
        label = "orders"
        path = cache._path("http://c", "orders")
    else:
        raw = bytearray(base64.urlsafe_b64decode(entry["ciphertext"] + "=="))
        raw[3] ^= 1
        entry["ciphertext"] = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    path.write_text(json.dumps(entry))
    with pytest.raises(KeyCacheError, match="does not decrypt"):
        reader.load("http://c", label, token)


def test_settings_name_their_problem(tmp_path, monkeypatch):
    for var in ("CAPE_KEY_CACHE_KEY", "CAPE_KEY_CACHE_KEY_FILE", "CAPE_KEY_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(KeyCacheError, match="needs a directory"):
        KeyCache.from_settings()
    with pytest.raises(KeyCacheError, match="needs a 32-byte wrapping key"):
        KeyCache.from_settings(tmp_path)
    monkeypatch.setenv("CAPE_KEY_CACHE_KEY", "ab" * 16)
    with pytest.raises(KeyCacheError, match="must be 32 bytes, not 16"):
        KeyCache.from_settings(tmp_path)
    monkeypatch.setenv("CAPE_KEY_CACHE_KEY", WRAP.hex())
    assert KeyCache.from_settings(tmp_path, ttl=5).ttl == 5
    keyfile = tmp_path / "wrap.key"
    keyfile.write_bytes(WRAP)
    assert KeyCache.from_settings(tmp_path, key_file=keyfile)
    with pytest.raises(KeyCacheError, match="cannot read the key cache key file"):
        KeyCache.from_settings(tmp_path, key_file=tmp_path / "missing")


# ---- against a real coordinator -----------------------------------------------------------


def _publish(srv):
    admin = srv.client(srv.admin_token)
    tokens = {
        role: admin.create_token(f"{role}-p", role, labels=labels)["token"]
        for role, labels in (("author", []), ("reviewer", []), ("auditor", []))
    }
    pipeline = admin.create_token("job", "pipeline", labels=["customers"])
    admin.create_key("cust-key", ["customers"])
    author = srv.client(tokens["author"])
    version = author.push_policy(policy_doc("customers", key="cust-key"))["version"]
    author.submit_policy("customers", version)
    srv.client(tokens["reviewer"]).approve_policy("customers", version)
    return admin, pipeline, srv.client(tokens["auditor"])


def test_keyed_policy_runs_during_outage_and_records_arrive_once(fresh_server, tmp_path):
    srv = fresh_server
    admin, pipeline, auditor = _publish(srv)
    spool, kc_dir = tmp_path / "spool", tmp_path / "keycache"

    def client(**kwargs):
        return Client(
            srv.url, pipeline["token"], public_key=srv.public_key, spool_dir=spool, **kwargs
        )

    online = client(key_cache=KeyCache(kc_dir, WRAP))
    expected = cape.apply_policy("customers", FRAME, client=online)
    key = online.get_keys("customers")["cust-key"]
    assert online.default_audit_sink().flush(30)
    online.close()

    srv.stop()
    # Without the cache (and no local key), a clear refusal naming the options.
    bare = client(timeout=2)
    with pytest.warns(CoordinatorWarning), pytest.raises(CapeError) as refused:
        cape.apply_policy("customers", FRAME, client=bare)
    message = str(refused.value)
    assert "key 'cust-key' of policy customers is not available" in message
    for option in ("--keys-file", "CAPE_KEY_CUST_KEY", "--key-cache", "CAPE_KEY_CACHE_KEY"):
        assert option in message
    bare.close()
    # The local provider chain works with the cached policy.
    local = client(timeout=2)
    with pytest.warns(CoordinatorWarning):
        out = cape.apply_policy("customers", FRAME, client=local, keys={"cust-key": key})
    pd.testing.assert_frame_equal(out, expected)
    local.default_audit_sink().close(timeout=0.5)
    local.close()
    # And so does the opt-in encrypted cache.
    offline = client(timeout=2, key_cache=KeyCache(kc_dir, WRAP))
    with pytest.warns(CoordinatorWarning, match="encrypted key cache"):
        out = cape.apply_policy("customers", FRAME, client=offline)
    pd.testing.assert_frame_equal(out, expected)
    offline.default_audit_sink().close(timeout=0.5)
    offline.close()
    pending = [json.loads(p.read_text()) for p in (spool / "pending").glob("*.json")]
    # Three offline runs (the refused one ends with run.failed), every record marked.
    assert len(pending) == 9 and all(r["offline"] is True for r in pending)
    assert sorted(r["event"] for r in pending).count("run.failed") == 1
    _assert_no_key_on_disk([spool, kc_dir], [key])

    srv.start()
    again = client()
    assert again.default_audit_sink().flush(60)
    again.close()
    entries = auditor.list_audit(label="customers", limit=1000)
    records = [e["record"] for e in entries if e["record"].get("run_id")]
    assert len(records) == 12 and len({r["record_id"] for r in records}) == 12
    offline_runs = {r["run_id"] for r in records if r.get("offline")}
    assert len(offline_runs) == 3
    fetched = [r for r in records if r["event"] == "policy.fetched" and r.get("offline")]
    assert all("offline" in r["source"] for r in fetched)
    statuses = sorted(r["status"] for r in auditor.list_runs(label="customers"))
    assert statuses == ["failed", "succeeded", "succeeded", "succeeded"]
    assert auditor.verify_audit()["intact"]

    # Once the token is revoked, the next online contact erases the cached keys.
    assert list(kc_dir.glob("*.keys"))
    (token_id,) = [t["id"] for t in admin.list_tokens() if t["name"] == "job"]
    admin.revoke_token(token_id)
    revoked = client(key_cache=KeyCache(kc_dir, WRAP))
    with pytest.raises(AuthError):
        revoked.get_policy("customers")
    assert not list(kc_dir.glob("*.keys"))
    shutil.rmtree(spool)


@pytest.mark.parametrize("status", [401, 403, 404])
def test_cached_keys_erased_when_the_coordinator_withdraws_them(tmp_path, status):
    from _standin import StandIn

    standin = StandIn()
    secret = os.urandom(32)
    standin.keys["customers"] = {"k1": {"versions": {"1": base64.b64encode(secret).decode()}}}
    with standin.running():
        client = Client(
            standin.url,
            "tok",
            public_key=standin.public_key,
            spool_dir=tmp_path / "spool",
            key_cache=KeyCache(tmp_path / "kc", WRAP),
        )
        assert client.get_key_versions("customers") == {"k1": {1: secret}}
        client.key_cache.store(client.url, "orders", "tok", {"k2": {1: b"y" * 32}})
        assert len(list((tmp_path / "kc").glob("*.keys"))) == 2
        standin.status_override = status
        with pytest.raises(CapeError):
            client.get_key_versions("customers")
    left = client.key_cache.load(client.url, "orders", "tok")
    # A 401 (the token is no more) erases every entry; a 403/404 only the label's.
    assert (left is None) == (status == 401)
    assert client.key_cache.load(client.url, "customers", "tok") is None
    _assert_no_key_on_disk([tmp_path], [secret])
