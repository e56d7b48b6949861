"""The console over plain HTTP (no browser): pages per role, CSRF and origin checks, session
handling, escaping, security headers, and that everything it serves is local package data."""

from __future__ import annotations

import re
from importlib import resources

import pytest
from _console_support import POLICY, Coord
from fastapi.testclient import TestClient

BASE = "http://127.0.0.1"
PAGES = {
    "/ui/home": {"requester", "author", "reviewer", "auditor", "admin"},
    "/ui/requests": {"requester", "author", "reviewer", "auditor", "admin"},
    "/ui/requests/new": {"requester"},
    "/ui/policies": {"author", "reviewer", "auditor", "admin"},
    "/ui/policies/new": {"author"},
    "/ui/policies/customers": {"author", "reviewer", "auditor", "admin"},
    "/ui/policies/customers/1": {"author", "reviewer", "auditor", "admin"},
    "/ui/runs": {"auditor", "admin"},
    "/ui/audit": {"auditor", "admin"},
    "/ui/audit/export.jsonl": {"auditor", "admin"},
    "/ui/admin/tokens": {"admin"},
    "/ui/admin/keys": {"auditor", "admin"},
}
WHO = ["requester", "author", "reviewer", "auditor", "admin"]
NAV = {
    "Requests": "/ui/requests",
    "Policies": "/ui/policies",
    "Runs": "/ui/runs",
    "Audit": "/ui/audit",
    "Tokens": "/ui/admin/tokens",
    "Keys": "/ui/admin/keys",
}


def browser(cc: Coord) -> TestClient:
    return TestClient(cc.app, base_url=BASE)


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, html[:500]
    return m.group(1)


def sign_in(cc: Coord, who: str) -> TestClient:
    t = browser(cc)
    nonce = csrf_of(t.get("/ui/signin").text)
    resp = t.post(
        "/ui/signin", data={"csrf": nonce, "token": cc.tokens[who]}, follow_redirects=False
    )
    assert resp.status_code == 303, resp.text[:500]
    return t


@pytest.fixture
def seeded(cc: Coord) -> Coord:
    cc.coord.policies.push(cc.principals["author"], POLICY)
    return cc


@pytest.mark.parametrize("who", WHO)
def test_pages_follow_the_role_matrix(seeded, who):
    t = sign_in(seeded, who)
    for path, roles in PAGES.items():
        resp = t.get(path)
        if who in roles:
            assert resp.status_code == 200, (path, resp.text[:300])
        else:
            assert resp.status_code == 403, path
            assert "Not for your role" in resp.text
    # The navigation offers exactly the pages the role may open.
    home = t.get("/ui/home").text
    for name, path in NAV.items():
        assert (f'href="{path}"' in home) == (who in PAGES[path]), (who, name)


def test_a_pipeline_token_cannot_sign_in_and_a_bad_token_is_named(cc):
    t = browser(cc)
    for token, words in (
        (cc.tokens["pipeline"], "Pipeline tokens cannot sign in"),
        ("cape_0000.nope", "not valid"),
        ("", "Paste your API token"),
    ):
        nonce = csrf_of(t.get("/ui/signin").text)
        resp = t.post("/ui/signin", data={"csrf": nonce, "token": token})
        assert resp.status_code == 401 and words in resp.text
        assert "cape_session" not in resp.cookies


def test_a_worker_token_cannot_sign_in(cc):
    # Worker tokens travel in job graphs; one must not open a console session.
    _, worker = cc.coord.tokens.mint_worker(cc.principals["pipeline"], "customers", 60)
    t = browser(cc)
    nonce = csrf_of(t.get("/ui/signin").text)
    resp = t.post("/ui/signin", data={"csrf": nonce, "token": worker})
    assert resp.status_code == 401 and "Worker tokens cannot sign in" in resp.text
    assert "cape_session" not in resp.cookies


def test_an_audit_writer_token_cannot_sign_in(cc):
    # Audit-writer tokens travel in Beam job graphs; one must not open a console session.
    _, writer = cc.coord.tokens.mint_audit_writer(cc.principals["pipeline"], "customers", 60)
    t = browser(cc)
    nonce = csrf_of(t.get("/ui/signin").text)
    resp = t.post("/ui/signin", data={"csrf": nonce, "token": writer})
    assert resp.status_code == 401 and "Audit-writer tokens cannot sign in" in resp.text
    assert "cape_session" not in resp.cookies


def test_sign_in_needs_its_form_nonce(cc):
    t = browser(cc)
    t.get("/ui/signin")
    resp = t.post("/ui/signin", data={"csrf": "guess", "token": cc.tokens["admin"]})
    assert resp.status_code == 403 and "cape_session" not in t.cookies


def test_every_post_needs_the_session_csrf_token_and_stores_nothing_without(seeded):
    t = sign_in(seeded, "author")
    before = seeded.audit_count()
    posts = [
        ("/ui/policies", {"yaml": "label: x\nrules: []\n"}),
        ("/ui/policies/customers/1/submit", {}),
        ("/ui/policies/customers/1/comment", {"body": "x"}),
        ("/ui/policies/customers/1/assign", {"reviewers": "bob"}),
        ("/ui/signout", {}),
    ]
    for path, data in posts:
        for token in (None, "wrong"):
            body = dict(data, **({"csrf": token} if token else {}))
            resp = t.post(path, data=body)
            assert resp.status_code == 403, path
            assert "CSRF" in resp.text
    assert seeded.audit_count() == before
    assert t.get("/ui/home").status_code == 200  # the forged sign-out did not end the session


def test_another_sessions_csrf_token_is_refused(seeded):
    mallory = sign_in(seeded, "reviewer")
    theirs = csrf_of(mallory.get("/ui/policies/customers/1").text)
    t = sign_in(seeded, "author")
    resp = t.post("/ui/policies/customers/1/submit", data={"csrf": theirs})
    assert resp.status_code == 403


def test_cross_origin_posts_are_refused(seeded):
    t = sign_in(seeded, "author")
    token = csrf_of(t.get("/ui/policies/customers/1").text)
    for origin in ("http://evil.example", "null"):
        resp = t.post(
            "/ui/policies/customers/1/submit", data={"csrf": token}, headers={"Origin": origin}
        )
        assert resp.status_code == 403
    assert seeded.coord.policies.info("customers", 1)["state"] == "draft"


def test_session_cookie_flags_and_secure_over_tls(cc):
    t = browser(cc)
    nonce = csrf_of(t.get("/ui/signin").text)
    resp = t.post(
        "/ui/signin", data={"csrf": nonce, "token": cc.tokens["admin"]}, follow_redirects=False
    )
    cookie = resp.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie
    tls = TestClient(cc.app, base_url="https://127.0.0.1")
    nonce = csrf_of(tls.get("/ui/signin").text)
    resp = tls.post(
        "/ui/signin", data={"csrf": nonce, "token": cc.tokens["admin"]}, follow_redirects=False
    )
    assert "Secure" in resp.headers["set-cookie"]


def test_sign_out_makes_the_session_id_worthless(cc):
    t = sign_in(cc, "admin")
    sid = t.cookies["cape_session"]
    token = csrf_of(t.get("/ui/home").text)
    assert t.post("/ui/signout", data={"csrf": token}, follow_redirects=False).status_code == 303
    replay = browser(cc)
    replay.cookies.set("cape_session", sid, domain="127.0.0.1", path="/ui")
    resp = replay.get("/ui/home", follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"].startswith("/ui/signin")


def test_a_revoked_token_ends_its_session_on_the_next_request(cc):
    t = sign_in(cc, "auditor")
    assert t.get("/ui/audit").status_code == 200
    cc.coord.tokens.revoke(cc.principals["admin"], cc.principals["auditor"].token_id)
    resp = t.get("/ui/audit", follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == "/ui/signin?ended=revoked"
    assert "revoked" in t.get("/ui/signin?ended=revoked").text


def test_security_headers_on_every_console_response(seeded):
    t = sign_in(seeded, "admin")
    for path in ("/ui/signin", "/ui/home", "/ui/policies/customers/1", "/ui/static/console.css"):
        h = t.get(path).headers
        csp = h["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert h["x-frame-options"] == "DENY" and h["x-content-type-options"] == "nosniff"


XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def test_user_text_is_escaped_everywhere_it_is_shown(seeded):
    rq = sign_in(seeded, "requester")
    token = csrf_of(rq.get("/ui/requests/new").text)
    resp = rq.post(
        "/ui/requests",
        data={
            "csrf": token,
            "dataset": "customers",
            "schema": "email: string\nage: int64",
            "purpose": XSS,
            "needs": f"age: {XSS}",
        },
    )
    assert resp.status_code == 200
    assert XSS not in resp.text and "&lt;script&gt;" in resp.text
    request_id = re.search(r"req-[0-9a-f]{12}", resp.text).group(0)
    wf = seeded.coord.workflow
    wf.link_request(seeded.principals["author"], request_id, "customers", 1)
    seeded.coord.policies.submit(seeded.principals["author"], "customers", 1)
    wf.comment(seeded.principals["reviewer"], "customers", 1, XSS)
    wf.request_changes(seeded.principals["reviewer"], "customers", 1, XSS)
    author = sign_in(seeded, "author")
    for path in (f"/ui/requests/{request_id}", "/ui/policies/customers/1", "/ui/requests"):
        page = author.get(path).text
        assert XSS not in page and "<script>alert" not in page, path
        assert "onerror=alert" not in page.replace("&lt;img src=x onerror=alert(1)&gt;", "")
    audit = sign_in(seeded, "admin").get("/ui/audit").text
    assert XSS not in audit


def test_editor_validation_names_problems_and_plans_over_the_request(seeded):
    t = sign_in(seeded, "author")
    token = csrf_of(t.get("/ui/policies/new").text)
    bad = t.post("/ui/policies/validate", data={"csrf": token, "yaml": "label: [\n"}).json()
    assert not bad["valid"] and "line" in bad["problems"][0]["loc"]
    bad = t.post(
        "/ui/policies/validate",
        data={
            "csrf": token,
            "yaml": "label: x\nrules:\n  - match: {name: a}\n    actions: [nope]\n",
        },
    ).json()
    assert not bad["valid"] and bad["problems"][0]["loc"].startswith("rules[0]")
    assert t.post("/ui/policies/validate", data={"yaml": "label: x"}).status_code == 403


def test_push_errors_are_shown_in_words_and_keep_the_text(seeded):
    t = sign_in(seeded, "author")
    token = csrf_of(t.get("/ui/policies/new").text)
    text = "label: x\nrules:\n  - match: {name: a}\n    actions: [nope]\n"
    resp = t.post("/ui/policies", data={"csrf": token, "yaml": text})
    assert resp.status_code == 422
    assert "invalid_policy" in resp.text and "rules[0]" in resp.text
    assert "actions: [nope]" in resp.text


def test_token_secret_shown_once_and_keys_show_no_material(cc):
    t = sign_in(cc, "admin")
    token = csrf_of(t.get("/ui/admin/tokens").text)
    resp = t.post("/ui/admin/tokens", data={"csrf": token, "name": "erin", "role": "reviewer"})
    secret = re.search(r'value="(cape_[^"]+)"', resp.text).group(1)
    assert cc.coord.tokens.authenticate(secret).name == "erin"
    assert secret not in t.get("/ui/admin/tokens").text
    resp = t.post(
        "/ui/admin/keys",
        data={"csrf": token, "name": "k1", "labels": "customers"},
        follow_redirects=True,
    )
    assert "k1" in resp.text
    material = cc.coord.secrets.for_label(cc.principals["pipeline"], "customers")["k1"]
    for value in material["versions"].values():
        assert value not in resp.text


def test_console_assets_are_local_package_data():
    root = resources.files("cape_coordinator.console")
    names = {p.name for p in (root / "templates").iterdir()} | {
        p.name for p in (root / "static").iterdir()
    }
    assert {"base.html", "console.css", "console.js"} <= names
    for folder in ("templates", "static"):
        for p in (root / folder).iterdir():
            text = p.read_text(encoding="utf-8")
            assert not re.search(r"(src|href)=\"(https?:)?//", text), p.name
            assert "<script>" not in text and " style=" not in text, p.name
            assert not re.search(r" on[a-z]+=", text), p.name


def test_static_files_only_from_the_static_folder(cc):
    t = browser(cc)
    for path in ("/ui/static/../views.py", "/ui/static/%2e%2e/views.py", "/ui/static/nope.js"):
        assert t.get(path).status_code == 404


def test_lost_and_failed_runs_are_visible_at_once(cc):
    from cape_coordinator.console.demo import _runs

    _runs(cc.coord, cc.principals["pipeline"])
    t = sign_in(cc, "auditor")
    runs = t.get("/ui/runs").text
    assert "lost run(s)" in runs and 'class="bar-fail"' in runs
    home = t.get("/ui/home").text
    assert "state-lost" in home and "state-failed" in home
    lost = next(r for r in cc.coord.runs.list() if r["status"] == "lost")
    page = t.get(f"/ui/runs/{lost['run_id']}").text
    assert "stopped reporting" in page
    done = next(r for r in cc.coord.runs.list() if r["status"] == "succeeded")
    page = t.get(f"/ui/runs/{done['run_id']}").text
    assert "tokenizer" in page and "column-redact" in page
    only_spark = t.get("/ui/runs?engine=spark").text
    assert "dask-" not in only_spark.split("<tbody>")[1]


def test_the_demo_story_seeds_every_state_on_a_verified_chain(cc):
    from cape_coordinator.console.demo import seed

    tokens = seed(cc.coord)
    assert {"rita", "alice", "bob", "dana", "carol", "demo-admin"} <= set(tokens)
    rita = cc.coord.tokens.authenticate(tokens["rita"])
    states = {r["dataset"]: r["state"] for r in cc.coord.workflow.list_requests(rita)}
    assert states == {
        "customers": "fulfilled",
        "orders": "in_review",
        "support_tickets": "declined",
    }
    assert cc.coord.policies.info("orders", 1)["state"] == "returned"
    assert len(cc.coord.workflow.comments("orders", 2)) == 3
    statuses = {r["status"] for r in cc.coord.runs.list()}
    assert statuses == {"succeeded", "failed", "lost"}
    assert {r["engine"] for r in cc.coord.runs.list()} == {"pandas", "dask", "spark", "beam"}
    assert cc.coord.verify_audit().intact


def test_expired_sessions_are_dropped_when_a_new_one_starts(cc):
    from sqlalchemy import func, select, update

    from cape_coordinator.console.sessions import sessions_table

    sign_in(cc, "admin")
    with cc.coord.engine.begin() as conn:
        conn.execute(update(sessions_table).values(last_seen="2020-01-01T00:00:00.000000Z"))
    sign_in(cc, "reviewer")
    with cc.coord.engine.connect() as conn:
        left = conn.execute(select(func.count()).select_from(sessions_table)).scalar_one()
    assert left == 1


def test_audit_export_is_every_matching_entry_as_json_lines(seeded):
    import json

    t = sign_in(seeded, "auditor")
    resp = t.get("/ui/audit/export.jsonl")
    assert resp.headers["content-type"].startswith("application/x-ndjson")
    assert "attachment" in resp.headers["content-disposition"]
    entries = [json.loads(line) for line in resp.text.splitlines()]
    assert [e["seq"] for e in entries] == list(range(1, seeded.audit_count() + 1))
    only = t.get("/ui/audit/export.jsonl?event=policy.pushed").text.splitlines()
    assert len(only) == 1 and json.loads(only[0])["record"]["label"] == "customers"
    assert t.get("/ui/audit/export.jsonl?since=yesterday").status_code == 422


def test_a_returned_version_leaves_the_authors_list_once_revised(seeded):
    author, reviewer = seeded.principals["author"], seeded.principals["reviewer"]
    seeded.coord.policies.submit(author, "customers", 1)
    seeded.coord.workflow.request_changes(reviewer, "customers", 1, "tokenize more")
    t = sign_in(seeded, "author")
    assert 'href="/ui/policies/customers/1"' in t.get("/ui/home").text
    seeded.coord.policies.push(author, POLICY)
    home = t.get("/ui/home").text
    assert 'href="/ui/policies/customers/1"' not in home
    assert 'href="/ui/policies/customers/2"' in home


def test_a_request_takes_its_schema_from_an_uploaded_sample(cc):
    t = sign_in(cc, "requester")
    token = csrf_of(t.get("/ui/requests/new").text)
    form = {
        "csrf": token,
        "dataset": "customers",
        "schema": "",
        "purpose": "churn",
        "needs": "age: feature",
    }
    sample = ("customers.csv", b"id,email,age\n1,a@x,40\n", "text/csv")
    resp = t.post("/ui/requests", data=form, files={"sample": sample})
    assert resp.status_code == 200, resp.text[:300]
    rita = cc.principals["requester"]
    (req,) = cc.coord.workflow.list_requests(rita)
    assert req["schema"] == {"id": "int64", "email": "string", "age": "int64"}
    bad = ("evil.sh", b"#!/bin/sh\n", "text/plain")
    resp = t.post("/ui/requests", data=form, files={"sample": bad})
    assert resp.status_code == 422 and "invalid_sample" in resp.text
    assert len(cc.coord.workflow.list_requests(rita)) == 1


def test_a_tampered_chain_shows_as_not_verified(seeded):
    from sqlalchemy import update

    from cape_coordinator import db

    t = sign_in(seeded, "auditor")
    assert "Chain verified" in t.get("/ui/audit").text
    with seeded.coord.engine.begin() as conn:
        conn.execute(update(db.audit).where(db.audit.c.seq == 2).values(body='{"edited": true}'))
    page = t.get("/ui/audit").text
    assert "does not verify" in page and "seq 2" in page


def test_refusals_are_pages_in_words_not_json(seeded):
    t = sign_in(seeded, "reviewer")
    for path in ("/ui/policies/nope", "/ui/policies/customers/9", "/ui/requests/req-000000000000"):
        resp = t.get(path)
        assert resp.status_code == 404 and resp.headers["content-type"].startswith("text/html")
        assert "not_found" in resp.text
