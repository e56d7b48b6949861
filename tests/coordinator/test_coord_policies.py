"""The review workflow, validation of pushed policies, diffs and the signed active version."""

from __future__ import annotations

import hashlib
import json

import pytest
import requests
from _coord_support import new_label, policy_doc
from _db_snapshot import stores_nothing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from coordinator_client import AuthError, CoordinatorError, NotFound
from coordinator_client._b64 import b64d


def test_review_workflow(server, clients):
    author, reviewer, pipeline = clients["author"], clients["reviewer"], clients["pipeline"]
    label = new_label("flow")
    v1 = author.push_policy(policy_doc(label))
    assert (v1["version"], v1["state"], v1["author"]) == (1, "draft", "author-person")

    with pytest.raises(CoordinatorError, match=r"409 invalid_state.*draft, not in_review"):
        reviewer.approve_policy(label, 1)
    assert author.submit_policy(label, 1)["state"] == "in_review"
    with pytest.raises(CoordinatorError, match="409 invalid_state"):
        author.submit_policy(label, 1)  # submitted versions are immutable

    with pytest.raises(NotFound):
        reviewer.diff_policy(label, 1, 2)
    approved = reviewer.approve_policy(label, 1)
    assert (approved["state"], approved["reviewed_by"]) == ("active", "reviewer-person")

    author.push_policy(policy_doc(label, column="social"))
    author.submit_policy(label, 2)
    with pytest.raises(CoordinatorError, match="422"):
        reviewer.reject_policy(label, 2, "   ")
    rejected = reviewer.reject_policy(label, 2, "drops the wrong column")
    assert (rejected["state"], rejected["reason"]) == ("rejected", "drops the wrong column")
    with pytest.raises(CoordinatorError, match="409"):
        reviewer.approve_policy(label, 2)

    author.push_policy(policy_doc(label, column="tax_id"))
    author.submit_policy(label, 3)
    reviewer.approve_policy(label, 3)
    states = [(v["version"], v["state"]) for v in author.policy_history(label)]
    assert states == [(1, "superseded"), (2, "rejected"), (3, "active")]

    diff = reviewer.diff_policy(label, 1, 3)
    assert f"--- {label}@1" in diff and f"+++ {label}@3" in diff
    assert "-    name: ssn" in diff and "+    name: tax_id" in diff
    assert "-version: 1" in diff and "+version: 3" in diff

    # The pipeline token is allowed only its labels (customers, matrix).
    with pytest.raises(AuthError, match="label_forbidden"):
        pipeline.get_policy(label)


def test_author_cannot_approve_own_policy(server, clients):
    """A person holding both an author and a reviewer token still cannot approve their own."""
    admin = clients["admin"]
    author_token = admin.create_token("dana", "author")["token"]
    reviewer_token = admin.create_token("dana", "reviewer")["token"]
    label = new_label("self")
    server.client(author_token).push_policy(policy_doc(label))
    server.client(author_token).submit_policy(label, 1)
    with pytest.raises(AuthError, match="403 self_approval"):
        server.client(reviewer_token).approve_policy(label, 1)
    with pytest.raises(AuthError, match="403 forbidden"):
        server.client(author_token).approve_policy(label, 1)
    assert clients["reviewer"].approve_policy(label, 1)["state"] == "active"


def test_active_policy_signed_with_etag(server, clients, tokens):
    label = "matrix"
    author, reviewer = clients["author"], clients["reviewer"]
    v = author.push_policy(policy_doc(label, column="secret_col"))["version"]
    author.submit_policy(label, v)
    reviewer.approve_policy(label, v)
    headers = {"Authorization": f"Bearer {tokens['pipeline']}"}
    resp = requests.get(f"{server.url}/v1/policies/{label}/active", headers=headers, timeout=30)
    assert resp.status_code == 200
    body = resp.content
    assert resp.headers["ETag"] == f'"{hashlib.sha256(body).hexdigest()}"'
    assert int(resp.headers["X-Cape-Policy-Version"]) == v
    public = Ed25519PublicKey.from_public_bytes(b64d(server.public_key))
    # Issue 9: the signature covers a domain-separated envelope naming the body's hash.
    envelope = b64d(resp.headers["X-Cape-Policy-Envelope"])
    public.verify(b64d(resp.headers["X-Cape-Signature"]), b"cape.policy-envelope.v1\n" + envelope)
    assert json.loads(envelope)["sha256"] == hashlib.sha256(body).hexdigest()
    again = requests.get(
        f"{server.url}/v1/policies/{label}/active",
        headers={**headers, "If-None-Match": resp.headers["ETag"]},
        timeout=30,
    )
    assert again.status_code == 304 and again.content == b""
    policy = clients["pipeline"].get_policy(label)
    assert (policy.label, policy.version) == (label, v)
    assert policy.sha256 == hashlib.sha256(body).hexdigest()


def test_only_the_active_version_is_served(server, clients):
    label = new_label("draftonly")
    clients["author"].push_policy(policy_doc(label))
    with pytest.raises(NotFound, match="active policy"):
        clients["auditor"].request("GET", f"/v1/policies/{label}/active")


MALFORMED = [
    # (document, a location the 422 must name)
    ({"label": "Bad Label", "rules": [{"match": {"name": "a"}, "actions": ["drop"]}]}, "label"),
    ({"label": "ok"}, "rules"),
    (
        {"label": "ok", "rules": [{"match": {"name": "a", "regex": "b"}, "actions": ["drop"]}]},
        "rules[0].match",
    ),
    (
        {
            "label": "ok",
            "rules": [
                {"match": {"name": "a"}, "actions": [{"transform": {"type": "numeric-rounding"}}]}
            ],
        },
        "rules[0].actions[0].transform.precision",
    ),
    (
        {
            "label": "ok",
            "rules": [{"match": {"name": "a"}, "actions": [{"transform": {"type": "nope"}}]}],
        },
        "rules[0].actions[0].transform.type",
    ),
    ({"label": "ok", "rules": [{"actions": ["drop"]}], "surprise": 1}, "surprise"),
]


@pytest.mark.parametrize("document,location", MALFORMED)
def test_malformed_policy_rejected_with_locations(server, tokens, document, location):
    with stores_nothing(server):
        resp = requests.post(
            server.url + "/v1/policies",
            json={"document": document},
            headers={"Authorization": f"Bearer {tokens['author']}"},
            timeout=30,
        )
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert error["code"] == "invalid_policy"
    assert location in [p["loc"] for p in error["problems"]], error["problems"]


def test_inline_key_material_refused(server, clients):
    label = new_label("inline")
    doc = policy_doc(label)
    doc["rules"].append(  # type: ignore[union-attr]
        {
            "match": {"name": "age"},
            "actions": [
                {
                    "transform": {
                        "type": "numeric-perturbation",
                        "min": -1,
                        "max": 1,
                        "key": "do-not-echo-this-key",
                    }
                }
            ],
        }
    )
    with pytest.raises(
        CoordinatorError, match=r"422 inline_key.*rules\[1\]\.actions\[0\]\.transform\.key"
    ) as info:
        clients["author"].push_policy(doc)
    assert "do-not-echo-this-key" not in str(info.value)


def test_pushed_version_number_replaces_the_files(server, clients):
    label = new_label("numbered")
    doc = {**policy_doc(label), "version": 42}
    assert clients["author"].push_policy(doc)["version"] == 1
    shown = clients["auditor"].show_policy(label, 1)
    assert shown["document"]["version"] == 1
