"""The console in a real browser: one end-to-end test per role story, then security and
layout checks. One Chromium and one server for the whole module; the stories run in order
and build on each other (a request, its policy, its review, a run, the audit)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from _browser import LiveServer, chromium, chromium_path, sign_in
from _console_support import Coord, make_coord
from sqlalchemy import update

from cape_coordinator import db
from cape_coordinator.console.sessions import sessions_table

pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")
pytestmark = [
    pytest.mark.browser,
    # In CI (.ci/run installs chromium) a missing browser fails loudly instead of skipping.
    pytest.mark.skipif(
        chromium_path() is None and not os.environ.get("CI"),
        reason="no chromium (apt-get install chromium)",
    ),
]

XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Coord, LiveServer]]:
    c = make_coord(tmp_path_factory.mktemp("console-browser"))
    admin = c.principals["admin"]
    # A reviewer token with the author's name: the person who wrote a version must not
    # approve it, whichever token they hold.
    _, token = c.coord.create_token(admin, name="alice", role="reviewer")
    c.tokens["alice-reviewer"] = token
    srv = LiveServer(c.app)
    srv.start()
    try:
        yield c, srv
    finally:
        srv.stop()
        c.coord.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def story() -> dict[str, Any]:
    return {}


def person(browser: Any, live: tuple[Coord, LiveServer], who: str, **context: Any) -> Any:
    """A new browser context signed in as ``who``; returns its page."""
    c, srv = live
    page = browser.new_context(**context).new_page()
    sign_in(page, srv.url, c.tokens[who])
    return page


def flash(page: Any) -> str:
    return page.locator(".flash").inner_text()


# ---- the role stories, in order ------------------------------------------------------------


def test_requester_files_a_request(browser, live, story):
    page = person(browser, live, "requester")
    page.get_by_role("link", name="File a request").first.click()
    page.get_by_label("Dataset name").fill("customers")
    page.get_by_label("Schema: one").fill("id: int64\nemail: string\nssn: string\nage: int64")
    page.get_by_label("Purpose").fill("Churn model " + XSS)
    page.get_by_label("Columns you need").fill("id: join key\nage: model feature")
    page.get_by_role("button", name="File request").click()
    page.wait_for_url(re.compile(r".*/ui/requests/req-[0-9a-f]{12}$"))
    assert "Request" in flash(page) and "filed" in flash(page)
    assert page.locator(".state").first.inner_text() == "open"
    # The purpose is shown as text, and nothing in it ran.
    assert XSS in page.locator("dd.prose").first.inner_text()
    assert page.evaluate("window.__xss") is None
    story["request"] = page.url.rsplit("/", 1)[1]
    # A requester sees requests only: no policy, run, audit or admin pages.
    nav = page.get_by_role("navigation", name="Main").inner_text()
    assert "Requests" in nav and "Policies" not in nav and "Audit" not in nav
    page.goto(live[1].url + "/ui/audit")
    assert page.get_by_role("heading", name="Not for your role").is_visible()
    page.context.close()


def test_author_drafts_a_version_for_the_request_and_submits(browser, live, story):
    page = person(browser, live, "author")
    page.goto(live[1].url + f"/ui/requests/{story['request']}")
    page.get_by_role("link", name="Draft a policy for this request").click()
    editor = page.get_by_label("Policy (YAML)")
    # The editor checks as you type (server-side validate) and shows the plan.
    editor.fill("label: customers\nrules:\n  - match: {name: ssn}\n    actions: [explode]\n")
    expect_text(page, "#check", "problem")
    editor.fill(
        "label: customers\nrules:\n"
        "  - match: {name: email}\n"
        "    actions:\n      - transform: {type: tokenizer, key: {secret: customers-key}}\n"
    )
    expect_text(page, "#check", "The policy is valid")
    expect_text(page, "#check", "untouched")
    page.get_by_role("button", name="Save draft").click()
    page.wait_for_url(re.compile(r".*/ui/policies/customers/1$"))
    page.get_by_label("Assign reviewers").fill("bob")
    page.get_by_role("button", name="Assign").click()
    assert "Reviewers assigned" in flash(page)
    page.get_by_role("button", name="Send to review").click()
    assert "Sent to review" in flash(page)
    assert page.locator("h1 .state").inner_text() == "in review"
    # Who asked and why, and the plan over the requested schema, are on the page.
    assert "rita" in page.locator("#why + p").inner_text()
    plan = page.locator("section", has=page.locator("#plan-title")).inner_text()
    assert "ssn" in plan and "untouched" in plan
    page.context.close()


def test_assigned_reviewer_comments_and_requests_changes(browser, live, story):
    # dana is not assigned to v1: her approval is refused, in words.
    page = person(browser, live, "reviewer2")
    page.goto(live[1].url + "/ui/policies/customers/1")
    assert page.get_by_role("button", name="Approve").count() == 0
    assert "not assigned" in page.locator(".actions").inner_text()
    # Posting the form anyway (with a valid CSRF token) is refused by the service.
    token = page.locator('input[name="csrf"]').first.get_attribute("value")
    resp = page.request.post(live[1].url + "/ui/policies/customers/1/approve", form={"csrf": token})
    assert "not_assigned" in resp.text()
    page.context.close()

    page = person(browser, live, "reviewer")
    page.goto(live[1].url + "/ui/policies/customers/1")
    page.get_by_label("Comment", exact=True).fill("ssn must go. " + XSS)
    page.get_by_label("On rule").select_option("0")
    page.get_by_role("button", name="Add comment").click()
    assert "Comment added" in flash(page)
    comment = page.locator("ol.thread > li").first
    assert XSS in comment.inner_text() and "rule 0" in comment.inner_text()
    assert page.evaluate("window.__xss") is None
    page.get_by_label("What should change").fill("Drop ssn as well.")
    page.get_by_role("button", name="Request changes").click()
    assert page.locator("h1 .state").inner_text() == "changes requested"
    page.context.close()


def test_author_pushes_a_revision_that_keeps_the_thread(browser, live, story):
    page = person(browser, live, "author")
    page.goto(live[1].url + "/ui/policies/customers/1")
    page.get_by_role("link", name="Push a new version from this one").click()
    editor = page.get_by_label("Policy (YAML)")
    editor.fill(
        "label: customers\nrules:\n"
        "  - match: {name: email}\n"
        "    actions:\n      - transform: {type: tokenizer, key: {secret: customers-key}}\n"
        "  - match: {name: ssn}\n    actions: [drop]\n"
    )
    expect_text(page, "#check", "dropped")
    page.get_by_role("button", name="Save draft").click()
    page.wait_for_url(re.compile(r".*/ui/policies/customers/2$"))
    page.get_by_role("button", name="Send to review").click()
    thread = page.locator("ol.thread").inner_text()
    assert "ssn must go" in thread and "Changes requested: Drop ssn as well." in thread
    # The author has no approve button, and the side-by-side diff shows the new rule.
    assert page.get_by_role("button", name="Approve").count() == 0
    assert (
        "drop" in page.locator("tr.d-added").first.inner_text()
        or page.locator("tr.d-added").count()
    )
    page.context.close()


def test_two_reviewers_approve_under_the_two_person_rule(browser, live, story):
    page = person(browser, live, "admin")
    page.goto(live[1].url + "/ui/policies/customers")
    page.get_by_label("Approvals required").fill("2")
    page.get_by_label("Default reviewers").fill("bob, dana")
    page.get_by_role("button", name="Save settings").click()
    assert "Review settings saved" in flash(page)
    # The admin creates the key the policy names: names and versions only, no material.
    page.goto(live[1].url + "/ui/admin/keys")
    page.get_by_label("Key name").fill("customers-key")
    page.get_by_label("Labels whose pipelines may use it").fill("customers")
    page.get_by_role("button", name="Create key").click()
    assert "Key customers-key created" in flash(page)
    page.context.close()

    # The author, holding a reviewer token, still cannot approve their own version.
    page = person(browser, live, "alice-reviewer")
    page.goto(live[1].url + "/ui/policies/customers/2")
    assert page.get_by_role("button", name="Approve").count() == 0
    assert "You wrote this version" in page.locator(".actions").inner_text()
    token = page.locator('input[name="csrf"]').first.get_attribute("value")
    resp = page.request.post(live[1].url + "/ui/policies/customers/2/approve", form={"csrf": token})
    assert "self_approval" in resp.text()
    page.context.close()

    page = person(browser, live, "reviewer")
    page.goto(live[1].url + "/ui/policies/customers/2")
    page.get_by_role("button", name="Approve").click()
    assert "Approved" in flash(page)
    assert page.locator("h1 .state").inner_text() == "in review"
    assert "1 of 2" in page.locator("dl.facts").inner_text()
    page.context.close()

    page = person(browser, live, "reviewer2")
    page.goto(live[1].url + "/ui/policies/customers/2")
    page.get_by_role("button", name="Approve").click()
    assert page.locator("h1 .state").inner_text() == "active"
    page.context.close()

    page = person(browser, live, "requester")
    page.goto(live[1].url + f"/ui/requests/{story['request']}")
    assert page.locator("h1 .state").inner_text() == "fulfilled"
    page.context.close()


def test_pipeline_applies_the_policy_by_label(live, story):
    """A pipeline token reads the label's active policy and keys over HTTP, applies them, and
    sends the run's records back (the verifying client is tested in tests/coordinator)."""
    import base64

    import requests

    from cape_pipelines.api import apply_policy
    from cape_pipelines.audit import MemorySink

    c, srv = live
    headers = {"Authorization": f"Bearer {c.tokens['pipeline']}"}
    active = c.coord.policies.info("customers", 2, with_document=True)
    assert active["state"] == "active"
    served = requests.get(srv.url + "/v1/labels/customers/keys", headers=headers, timeout=30)
    served.raise_for_status()
    keys = {
        name: base64.urlsafe_b64decode(k["versions"][str(k["current"])] + "==")
        for name, k in served.json()["keys"].items()
    }
    df = pd.DataFrame(
        {"id": [1, 2, 3], "email": ["a@x", None, "c@x"], "ssn": ["1", "2", "3"], "age": [1, 2, 3]}
    )
    sink = MemorySink()
    out = apply_policy(active["document"], df, keys=keys, audit=sink)
    assert "ssn" not in out.columns and out["email"][0] != "a@x"
    resp = requests.post(
        srv.url + "/v1/audit", json={"records": sink.records}, headers=headers, timeout=30
    )
    assert resp.status_code == 200, resp.text
    runs = c.coord.runs.list(label="customers")
    assert runs and runs[0]["status"] == "succeeded"
    story["run"] = runs[0]["run_id"]


def test_auditor_finds_the_run_its_counts_and_a_verified_chain(browser, live, story):
    page = person(browser, live, "auditor")
    page.goto(live[1].url + "/ui/runs")
    page.get_by_label("Label").select_option("customers")
    page.get_by_label("Engine").select_option("pandas")
    page.get_by_role("button", name="Filter").click()
    page.get_by_role("link", name=re.compile(story["run"][:12])).click()
    counts = page.locator("section, main").filter(has_text="Per-column counts").first.inner_text()
    assert "email" in counts and "tokenizer" in counts
    row = page.locator("tr", has_text="email")
    assert (
        row.locator("td").nth(2).inner_text() == "2"
        and row.locator("td").nth(3).inner_text() == "1"
    )
    page.goto(live[1].url + "/ui/audit")
    assert "Chain verified" in page.locator(".ok").inner_text()
    page.get_by_label("Event").fill("policy.changes_requested")
    page.get_by_role("button", name="Filter").click()
    assert page.locator("tbody tr").count() == 1
    with page.expect_download() as download:
        page.get_by_role("link", name="Export as JSONL").click()
    text = Path(download.value.path()).read_text(encoding="utf-8")
    assert text.count("\n") == 1 and "policy.changes_requested" in text
    story["auditor_page"] = page


def test_admin_revokes_a_token_and_its_session_ends_at_once(browser, live, story):
    c, srv = live
    auditor = story.pop("auditor_page")
    admin = person(browser, live, "admin")
    admin.goto(srv.url + "/ui/admin/tokens")
    token_id = c.principals["auditor"].token_id
    admin.get_by_role("button", name=f"Revoke token {token_id}").click()
    assert "revoked" in flash(admin)
    auditor.goto(srv.url + "/ui/runs")
    assert auditor.url.startswith(srv.url + "/ui/signin")
    assert "revoked" in auditor.locator(".flash").inner_text()
    admin.context.close()
    auditor.context.close()


# ---- security ----------------------------------------------------------------------------------


def test_csrf_missing_or_foreign_token_is_refused_and_stores_nothing(browser, live):
    c, srv = live
    page = person(browser, live, "reviewer")
    before = c.audit_count()
    for data in ({"body": "forged"}, {"body": "forged", "csrf": "not-the-token"}):
        resp = page.request.post(srv.url + "/ui/policies/customers/2/comment", form=data)
        assert resp.status == 403
        assert "CSRF" in resp.text()
    # A form posted from another origin is refused even with the right token.
    token = page.locator('input[name="csrf"]').first.get_attribute("value")
    resp = page.request.post(
        srv.url + "/ui/policies/customers/2/comment",
        form={"body": "forged", "csrf": token},
        headers={"Origin": "http://evil.example"},
    )
    assert resp.status == 403
    assert c.audit_count() == before
    assert all("forged" not in x["body"] for x in c.coord_comments("customers", 2))
    page.context.close()


def test_cookie_flags_and_security_headers(browser, live):
    _, srv = live
    page = person(browser, live, "reviewer")
    cookie = next(x for x in page.context.cookies() if x["name"] == "cape_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    resp = page.goto(srv.url + "/ui/policies")
    headers = resp.headers
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "unsafe-inline" not in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    # document.cookie cannot read the session.
    assert "cape_session" not in page.evaluate("document.cookie")
    page.context.close()


def test_idle_and_absolute_expiry_end_the_session(browser, live):
    c, srv = live
    for column, words in (("last_seen", "without activity"), ("created_at", "time limit")):
        page = person(browser, live, "reviewer")
        old = db.format_time(db.parse_time(db.now()).replace(year=2020))
        with c.coord.engine.begin() as conn:
            conn.execute(update(sessions_table).values({column: old}))
        page.goto(srv.url + "/ui/policies")
        assert page.url.startswith(srv.url + "/ui/signin")
        assert words in page.locator(".flash").inner_text()
        page.context.close()


def test_sign_out_and_refused_tokens(browser, live):
    c, srv = live
    page = person(browser, live, "reviewer")
    page.get_by_role("button", name="Sign out").click()
    page.goto(srv.url + "/ui/policies")
    assert page.url.startswith(srv.url + "/ui/signin")
    for token, words in (("cape_0000.nope", "not valid"), (c.tokens["pipeline"], "Pipeline")):
        page.get_by_label("API token").fill(token)
        page.get_by_role("button", name="Sign in").click()
        assert words in page.locator(".error").inner_text()
    page.context.close()


def test_phone_width_has_no_sideways_scroll(browser, live):
    _, srv = live
    page = person(browser, live, "admin", viewport={"width": 390, "height": 844})
    for path in ("/ui/home", "/ui/policies/customers/2", "/ui/runs", "/ui/audit"):
        page.goto(srv.url + path)
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, path
    page.context.close()


def expect_text(page: Any, selector: str, text: str) -> None:
    from playwright.sync_api import expect

    expect(page.locator(selector)).to_contain_text(text, timeout=10_000)


def test_review_by_keyboard_alone(browser, live):
    c, srv = live
    doc = {
        "label": "customers",
        "rules": [{"match": {"name": "email"}, "actions": ["drop"]}],
    }
    version = c.coord.policies.push(c.principals["author"], doc)["version"]
    c.coord.policies.submit(c.principals["author"], "customers", version)
    page = person(browser, live, "reviewer")
    page.goto(srv.url + f"/ui/policies/customers/{version}")

    def tab_to(predicate: str) -> None:
        for _ in range(80):
            page.keyboard.press("Tab")
            if page.evaluate(predicate):
                return
        raise AssertionError(f"Tab never reached {predicate}")

    tab_to("document.activeElement.id === 'comment-body'")
    page.keyboard.type("Reviewed by keyboard.")
    tab_to("document.activeElement.textContent.trim() === 'Add comment'")
    page.keyboard.press("Enter")
    page.wait_for_load_state()
    assert "Comment added" in flash(page)
    assert "Reviewed by keyboard." in page.locator("ol.thread").inner_text()
    # Focus is visible: the focused control gets an outline.
    tab_to("document.activeElement.textContent.trim() === 'Approve'")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none")
    page.context.close()
