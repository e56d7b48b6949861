"""The role x endpoint matrix: each endpoint admits exactly its roles, none without a token."""

from __future__ import annotations

import pytest
import requests
from _coord_support import ROLES
from _db_snapshot import row_counts

ALL = set(ROLES)
READERS = {"admin", "author", "reviewer", "auditor"}
AUDITORS = {"admin", "auditor"}

# (method, path, JSON body, roles admitted). Bodies and targets are chosen so an admitted
# call changes nothing (422 for a body that does not validate, 404 for a missing target).
MATRIX: list[tuple[str, str, object, set[str]]] = [
    ("GET", "/v1/whoami", None, ALL),
    ("GET", "/v1/signing-key", None, ALL),
    ("POST", "/v1/tokens", {}, {"admin"}),
    ("GET", "/v1/tokens", None, {"admin"}),
    ("POST", "/v1/tokens/0000000000000000/revoke", None, {"admin"}),
    ("GET", "/v1/policies", None, READERS),
    ("POST", "/v1/policies", {}, {"author"}),
    ("GET", "/v1/policies/no-such/versions", None, READERS),
    ("GET", "/v1/policies/no-such/versions/1", None, READERS),
    ("POST", "/v1/policies/no-such/versions/1/submit", None, {"author"}),
    ("POST", "/v1/policies/no-such/versions/1/approve", None, {"reviewer"}),
    ("POST", "/v1/policies/no-such/versions/1/reject", {"reason": "no"}, {"reviewer"}),
    ("POST", "/v1/policies/no-such/versions/1/rollback", {"reason": "no"}, {"reviewer"}),
    ("GET", "/v1/policies/no-such/diff?from=1&to=2", None, READERS),
    ("GET", "/v1/policies/matrix/active", None, ALL),
    ("POST", "/v1/keys", {}, {"admin"}),
    ("GET", "/v1/keys", None, AUDITORS),
    ("POST", "/v1/keys/no-such/rotate", None, {"admin"}),
    ("GET", "/v1/labels/matrix/keys", None, {"pipeline"}),
    ("POST", "/v1/labels/matrix/worker-tokens", {"expires_in": 0}, {"pipeline"}),
    ("POST", "/v1/labels/matrix/audit-tokens", {"expires_in": 0}, {"pipeline"}),
    ("POST", "/v1/audit", {}, {"pipeline"}),
    ("GET", "/v1/audit", None, AUDITORS),
    ("GET", "/v1/audit/verify", None, AUDITORS),
    ("GET", "/v1/audit/anchor", None, AUDITORS),
    ("GET", "/v1/runs", None, AUDITORS),
    ("GET", "/v1/orchestrators", None, AUDITORS),
    # The request -> review workflow (tests/console covers its behaviour).
    ("POST", "/v1/requests", {}, {"requester"}),
    ("GET", "/v1/requests", None, READERS | {"requester"}),
    ("GET", "/v1/requests/req-000000000000", None, READERS | {"requester"}),
    ("POST", "/v1/requests/req-000000000000/decline", {}, {"author", "admin"}),
    ("POST", "/v1/requests/req-000000000000/link", {}, {"author"}),
    ("GET", "/v1/policies/no-such/review-settings", None, READERS),
    ("PUT", "/v1/policies/no-such/review-settings", {}, {"admin"}),
    ("POST", "/v1/policies/no-such/versions/1/reviewers", {}, {"author", "admin"}),
    ("POST", "/v1/policies/no-such/versions/1/request-changes", {}, {"reviewer"}),
    ("GET", "/v1/policies/no-such/versions/1/comments", None, READERS),
    ("POST", "/v1/policies/no-such/versions/1/comments", {}, {"author", "reviewer"}),
    ("GET", "/v1/policies/no-such/versions/1/review", None, READERS),
    # The governance catalog (tests/catalog covers its behaviour).
    ("GET", "/v1/catalog/tags", None, ALL),
    ("POST", "/v1/catalog/tags", {}, {"admin"}),
    ("GET", "/v1/catalog/datasets", None, ALL),
    ("PUT", "/v1/catalog/datasets/no-such", {}, {"admin", "author"}),
    ("GET", "/v1/catalog/datasets/no-such", None, ALL),
    ("GET", "/v1/catalog/datasets/no-such/column-tags", None, ALL),
    ("POST", "/v1/catalog/datasets/no-such/tags", {}, {"admin", "reviewer"}),
    ("POST", "/v1/catalog/datasets/no-such/untag", {}, {"admin", "reviewer"}),
    ("POST", "/v1/catalog/datasets/no-such/proposals", {}, {"admin", "author"}),
    ("POST", "/v1/catalog/datasets/no-such/coverage", {}, ALL),
    ("GET", "/v1/catalog/proposals", None, ALL),
    ("POST", "/v1/catalog/proposals/999999/accept", None, {"admin", "reviewer"}),
    ("POST", "/v1/catalog/proposals/999999/reject", {}, {"admin", "reviewer"}),
    ("PUT", "/v1/catalog/labels/no-such", {}, {"admin"}),
    ("GET", "/v1/catalog/labels/no-such", None, ALL),
]

CALLERS = [*ROLES, None]


@pytest.mark.parametrize(
    "method,path,body,admitted", MATRIX, ids=[f"{m} {p}" for m, p, _, _ in MATRIX]
)
@pytest.mark.parametrize("caller", CALLERS, ids=[c or "no-token" for c in CALLERS])
def test_role_matrix(server, tokens, method, path, body, admitted, caller):
    headers = {"Authorization": f"Bearer {tokens[caller]}"} if caller else {}
    before = row_counts(server.db)
    resp = requests.request(method, server.url + path, json=body, headers=headers, timeout=30)
    if resp.status_code in (401, 403):
        assert row_counts(server.db) == before, "a refused request changed the database"
    if caller is None:
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "unauthenticated"
    elif caller in admitted:
        assert resp.status_code not in (401, 403), resp.text
        assert resp.status_code < 500
    else:
        assert resp.status_code == 403
        assert resp.json()["error"]["code"] == "forbidden"


def test_matrix_covers_every_endpoint(server):
    spec = requests.get(server.url + "/openapi.json", timeout=30).json()
    served = {
        (method.upper(), path)
        for path, ops in spec["paths"].items()
        for method in ops
        if path.startswith("/v1/")
    }
    listed = set()
    for method, path, _, _ in MATRIX:
        template = path.split("?")[0]
        match = [(m, p) for m, p in served if m == method and _matches(p, template)]
        assert match, f"{method} {template} is not served"
        listed.update(match)
    assert served == listed


def _matches(template: str, path: str) -> bool:
    a, b = template.strip("/").split("/"), path.strip("/").split("/")
    return len(a) == len(b) and all(x == y or x.startswith("{") for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "header,code",
    [
        ("Bearer cape_0000000000000000.not-a-real-secret", "unauthenticated"),  # unknown id
        ("Bearer something-else", "unauthenticated"),  # not a Cape token at all
        ("Basic dXNlcjpwYXNz", "unauthenticated"),  # wrong scheme
    ],
)
def test_invalid_tokens_refused(server, header, code):
    resp = requests.get(server.url + "/v1/whoami", headers={"Authorization": header}, timeout=30)
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == code
    assert resp.headers["WWW-Authenticate"] == "Bearer"


def test_wrong_secret_for_a_real_token_id_refused(server, tokens):
    token_id = tokens["auditor"].split(".")[0]
    resp = requests.get(
        server.url + "/v1/whoami",
        headers={"Authorization": f"Bearer {token_id}.wrong-secret"},
        timeout=30,
    )
    assert resp.status_code == 401
