"""The console's catalog page: every signed-in role sees datasets and pending proposals; only
reviewers and admins get the decision forms, which need the session's CSRF token; text from
proposals and datasets is escaped."""

from __future__ import annotations

from test_console_http import csrf_of, sign_in  # tests/console, on the path by conftest


def seed(cc) -> int:
    admin = cc.principals["admin"]
    cat = cc.coord.catalog
    cat.register(admin, "customers", "alice", {"email": "string", "<b>x</b>": "string"})
    cat.tag(admin, "customers", "<b>x</b>", "pii.name")
    (p,) = cat.propose(
        cc.principals["author"],
        "customers",
        [
            {
                "column": "email",
                "tag": "pii.email",
                "confidence": 0.97,
                "evidence": 97,
                "sampled": 100,
                "detector": "email",
            }
        ],
    )
    return int(p["id"])


def test_catalog_page_per_role_and_decisions_with_csrf(cc):
    pid = seed(cc)
    for who in ("requester", "author", "auditor"):
        page = sign_in(cc, who).get("/ui/catalog")
        assert page.status_code == 200
        assert "pii.email" in page.text and "97 of 100" in page.text
        assert f"/ui/catalog/proposals/{pid}/accept" not in page.text
        assert "&lt;b&gt;x&lt;/b&gt;" in page.text and "<b>x</b>" not in page.text
    # An author posting the form anyway is refused, and nothing is tagged.
    author = sign_in(cc, "author")
    token = csrf_of(author.get("/ui/catalog").text)
    resp = author.post(f"/ui/catalog/proposals/{pid}/accept", data={"csrf": token})
    assert resp.status_code == 403
    bob = sign_in(cc, "reviewer")
    page = bob.get("/ui/catalog").text
    assert f"/ui/catalog/proposals/{pid}/accept" in page
    before = cc.audit_count()
    for bad in (None, "wrong"):
        data = {"csrf": bad} if bad else {}
        resp = bob.post(f"/ui/catalog/proposals/{pid}/accept", data=data)
        assert resp.status_code == 403 and "CSRF" in resp.text
    assert cc.audit_count() == before
    assert cc.coord.catalog.column_tags("customers") == {"<b>x</b>": ["pii.name"]}
    resp = bob.post(f"/ui/catalog/proposals/{pid}/accept", data={"csrf": csrf_of(page)})
    assert resp.status_code == 200 and "Accepted: pii.email on customers.email." in resp.text
    assert cc.coord.catalog.column_tags("customers")["email"] == ["pii.email"]
    resp = bob.post(f"/ui/catalog/proposals/{pid}/reject", data={"csrf": csrf_of(page)})
    assert "Not decided" in resp.text and "is accepted" in resp.text


def test_version_page_shows_coverage_and_whether_it_blocks(cc):
    admin = cc.principals["admin"]
    cat = cc.coord.catalog
    cat.register(admin, "customers", "alice", {"email": "string", "ssn": "string"})
    cat.tag(admin, "customers", "ssn", "pii.ssn")
    cat.set_label_settings(admin, "customers", "customers", True)
    author = cc.client("author")
    doc = {"label": "customers", "rules": [{"match": {"name": "email"}, "actions": ["drop"]}]}
    version = author.post("/v1/policies", json={"document": doc}).json()["version"]
    page = sign_in(cc, "reviewer").get(f"/ui/policies/customers/{version}").text
    assert "Coverage of dataset customers" in page
    assert "Approval is blocked until these are covered" in page
    assert "<li>ssn (pii.ssn)</li>" in page
