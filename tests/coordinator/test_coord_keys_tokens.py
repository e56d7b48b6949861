"""Secrets (served only to pipeline tokens of their labels, rotation) and token life cycle."""

from __future__ import annotations

import base64
import json
import time

import pytest
import requests
from _coord_support import new_label

from coordinator_client import AuthError, CoordinatorError, NotFound


def test_keys_served_to_pipelines_of_their_label_only(server, clients):
    admin, pipeline = clients["admin"], clients["pipeline"]
    name = new_label("email-key")
    info = admin.create_key(name, ["customers"])
    assert (info["current"], info["labels"]) == (1, ["customers"])
    keys = pipeline.get_keys("customers")
    assert len(keys[name]) == 32

    other = admin.create_token("other-job", "pipeline", labels=["billing"])["token"]
    with pytest.raises(AuthError, match="403 label_forbidden"):
        server.client(other).get_keys("customers")
    assert name not in server.client(other).get_keys("billing")


def test_rotation_keeps_old_versions(server, clients):
    admin, pipeline = clients["admin"], clients["pipeline"]
    name = new_label("rot-key")
    admin.create_key(name, ["customers"])
    first = pipeline.get_keys("customers")[name]
    assert admin.rotate_key(name)["current"] == 2
    versions = pipeline.get_key_versions("customers")[name]
    assert versions[1] == first and versions[2] != first and set(versions) == {1, 2}
    assert pipeline.get_keys("customers")[name] == versions[2]
    _, provide = pipeline.key_provider("customers")
    assert provide(name) == versions[2]
    assert provide(f"{name}@1") == first
    assert provide("no-such-key") is None


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda c: c.create_key("dup-key", ["customers"]), CoordinatorError, "409 key_exists"),
        (lambda c: c.rotate_key("never-made"), NotFound, "404"),
        (lambda c: c.create_key("bad name!", ["customers"]), CoordinatorError, "422"),
        (lambda c: c.create_key("no-labels", []), CoordinatorError, "422"),
        (lambda c: c.create_key("bad-label", ["Not Ok"]), CoordinatorError, "422"),
    ],
)
def test_key_requests_refused(clients, call, error, match):
    if "dup-key" not in {k["name"] for k in clients["admin"].list_keys()}:
        clients["admin"].create_key("dup-key", ["customers"])
    with pytest.raises(error, match=match):
        call(clients["admin"])


def test_key_material_appears_in_no_other_response(server, clients, tokens):
    name = new_label("hidden-key")
    clients["admin"].create_key(name, ["customers"])
    material = clients["pipeline"].get_key_versions("customers")[name][1]
    encodings = {
        material.hex(),
        material.hex().upper(),
        base64.b64encode(material).decode(),
        base64.urlsafe_b64encode(material).decode().rstrip("="),
    }
    for role in ("admin", "auditor"):
        headers = {"Authorization": f"Bearer {tokens[role]}"}
        for path in ("/v1/keys", "/v1/audit?limit=1000", "/v1/tokens", "/v1/runs"):
            text = requests.get(server.url + path, headers=headers, timeout=30).text
            assert not any(e in text for e in encodings), (role, path)
    reads = clients["auditor"].list_audit(event="key.read", label="customers", limit=1000)
    assert any(name in r["record"]["keys"] for r in reads)
    assert all(r["record"]["keys"][name] == [1] for r in reads if name in r["record"]["keys"])


def test_token_create_list_revoke(server, clients):
    admin = clients["admin"]
    made = admin.create_token("temp-auditor", "auditor")
    token = made["token"]
    assert server.client(token).whoami()["role"] == "auditor"
    listed = {t["id"]: t for t in admin.list_tokens()}
    assert made["id"] in listed
    assert token not in json.dumps(admin.list_tokens())
    assert token.split(".", 1)[1] not in json.dumps(admin.list_tokens())
    admin.revoke_token(made["id"])
    with pytest.raises(AuthError, match="401 token_revoked"):
        server.client(token).whoami()
    with pytest.raises(CoordinatorError, match="409 already_revoked"):
        admin.revoke_token(made["id"])
    events = [r["record"]["event"] for r in clients["auditor"].list_audit(limit=1000)]
    assert "token.created" in events and "token.revoked" in events


def test_expired_token_refused(server, clients):
    made = clients["admin"].create_token("short-lived", "auditor", expires_in=1)
    assert made["expires_at"] is not None
    client = server.client(made["token"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            client.whoami()
        except AuthError as exc:
            assert exc.code == "token_expired"
            break
        time.sleep(0.25)
    else:
        pytest.fail("the token never expired")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "p", "role": "pipeline"}, "labels_required"),
        ({"name": "a", "role": "auditor", "labels": ["customers"]}, "labels_not_allowed"),
        ({"name": "x", "role": "root"}, "422"),
        ({"name": "bad name", "role": "auditor"}, "422 invalid_name"),
        ({"name": "p", "role": "pipeline", "labels": ["Not A Label"]}, "invalid_label"),
    ],
)
def test_token_requests_refused(clients, kwargs, match):
    kwargs = dict(kwargs)  # the parameters are shared by the SQLite and PostgreSQL runs
    admin = clients["admin"]
    with pytest.raises(CoordinatorError, match=match):
        admin.create_token(kwargs.pop("name"), kwargs.pop("role"), **kwargs)
