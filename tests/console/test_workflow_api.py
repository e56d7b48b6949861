"""The request -> review workflow through the HTTP API: the happy path with every action on
the audit chain, the two-person rule, threads that survive a revision, what a reviewer sees,
and refusals that store nothing (as an attacker or a careless user would try them)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from _console_support import POLICY, Coord
from sqlalchemy import func, select

from cape_coordinator.services.workflow import (
    approvals,
    assignments,
    comments,
    requests_table,
    review_settings,
)

SCHEMA = {"id": "int64", "email": "string", "ssn": "string", "age": "int64"}
REQUEST = {
    "dataset": "customers",
    "schema": SCHEMA,
    "purpose": "churn model",
    "columns": [{"name": "age", "need": "feature"}, {"name": "id", "need": "join key"}],
}


def ok(resp: Any, status: int = 200) -> Any:
    assert resp.status_code == status, resp.text
    return resp.json()


def refused(resp: Any, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code, resp.text


def events(cc: Coord) -> list[str]:
    return [e["record"]["event"] for e in cc.coord.list_audit(limit=1000)]


def rows(cc: Coord) -> dict[str, int]:
    """Row counts of every workflow table and of the policies."""
    from cape_coordinator import db

    out = {}
    with cc.coord.engine.connect() as conn:
        for t in (requests_table, review_settings, assignments, approvals, comments, db.policies):
            out[t.name] = conn.execute(select(func.count()).select_from(t)).scalar_one()
        out["states"] = json.dumps(
            [tuple(r) for r in conn.execute(select(db.policies.c.version, db.policies.c.state))]
        )
    out["audit"] = cc.audit_count()
    return out


def draft(cc: Coord, document: dict[str, Any] | None = None, who: str = "author") -> int:
    return ok(cc.client(who).post("/v1/policies", json={"document": document or POLICY}), 201)[
        "version"
    ]


def in_review(cc: Coord, request_id: str | None = None) -> int:
    version = draft(cc)
    author = cc.client("author")
    if request_id:
        ok(
            author.post(
                f"/v1/requests/{request_id}/link", json={"label": "customers", "version": version}
            )
        )
    ok(author.post(f"/v1/policies/customers/versions/{version}/submit"))
    return version


def test_request_to_active_policy_with_every_action_on_the_chain(cc):
    rita, alice, bob = cc.client("requester"), cc.client("author"), cc.client("reviewer")
    req = ok(rita.post("/v1/requests", json=REQUEST), 201)
    assert req["state"] == "open" and req["requester"] == "rita"
    assert ok(alice.get("/v1/requests"))[0]["id"] == req["id"]
    version = draft(cc)
    linked = ok(
        alice.post(
            f"/v1/requests/{req['id']}/link", json={"label": "customers", "version": version}
        )
    )
    assert linked["state"] == "drafting"
    ok(
        alice.post(
            f"/v1/policies/customers/versions/{version}/reviewers", json={"reviewers": ["bob"]}
        )
    )
    ok(alice.post(f"/v1/policies/customers/versions/{version}/submit"))
    assert ok(rita.get(f"/v1/requests/{req['id']}"))["state"] == "in_review"
    c = ok(
        bob.post(
            f"/v1/policies/customers/versions/{version}/comments", json={"body": "ok", "rule": 1}
        ),
        201,
    )
    ok(
        alice.post(
            f"/v1/policies/customers/versions/{version}/comments",
            json={"body": "thanks", "reply_to": c["id"]},
        ),
        201,
    )
    assert ok(bob.post(f"/v1/policies/customers/versions/{version}/approve"))["state"] == "active"
    assert ok(rita.get(f"/v1/requests/{req['id']}"))["state"] == "fulfilled"
    seen = events(cc)
    for event in (
        "request.created",
        "policy.pushed",
        "request.linked",
        "review.assigned",
        "policy.submitted",
        "policy.commented",
        "policy.approval_recorded",
        "policy.approved",
    ):
        assert event in seen, event
    assert cc.coord.verify_audit().intact


def test_two_person_rule_needs_two_distinct_reviewers_who_are_not_the_author(cc):
    admin = cc.client("admin")
    version = in_review(cc)
    ok(admin.put("/v1/policies/customers/review-settings", json={"required_approvals": 2}))
    bob, dana = cc.client("reviewer"), cc.client("reviewer2")
    assert (
        ok(bob.post(f"/v1/policies/customers/versions/{version}/approve"))["state"] == "in_review"
    )
    # The author holding a reviewer token is still the author.
    _, token = cc.coord.create_token(cc.principals["admin"], name="alice", role="reviewer")
    cc.tokens["alice-reviewer"] = token
    before = rows(cc)
    refused(bob.post(f"/v1/policies/customers/versions/{version}/approve"), 409, "already_approved")
    refused(
        cc.client("alice-reviewer").post(f"/v1/policies/customers/versions/{version}/approve"),
        403,
        "self_approval",
    )
    refused(
        cc.client("author").post(f"/v1/policies/customers/versions/{version}/approve"),
        403,
        "forbidden",
    )
    assert rows(cc) == before
    info = ok(dana.post(f"/v1/policies/customers/versions/{version}/approve"))
    assert info["state"] == "active"
    review = ok(bob.get(f"/v1/policies/customers/versions/{version}/review"))
    assert review["approvals"] == ["bob", "dana"] and review["required_approvals"] == 2


def test_assigned_reviewers_only_and_refusals_store_nothing(cc):
    version = in_review(cc)
    alice = cc.client("author")
    before = rows(cc)
    for body, code in (
        ({"reviewers": ["alice"]}, "author_as_reviewer"),
        ({"reviewers": ["nobody"]}, "unknown_reviewer"),
        ({"reviewers": ["carol"]}, "unknown_reviewer"),  # an auditor, not a reviewer
    ):
        refused(
            alice.post(f"/v1/policies/customers/versions/{version}/reviewers", json=body), 422, code
        )
    assert rows(cc) == before
    ok(
        alice.post(
            f"/v1/policies/customers/versions/{version}/reviewers", json={"reviewers": ["bob"]}
        )
    )
    _, token = cc.coord.create_token(cc.principals["admin"], name="mallory", role="author")
    cc.tokens["mallory"] = token
    before = rows(cc)
    dana = cc.client("reviewer2")
    refused(dana.post(f"/v1/policies/customers/versions/{version}/approve"), 403, "not_assigned")
    refused(
        dana.post(
            f"/v1/policies/customers/versions/{version}/request-changes", json={"reason": "x"}
        ),
        403,
        "not_assigned",
    )
    # Another author may not assign reviewers to alice's version.
    refused(
        cc.client("mallory").post(
            f"/v1/policies/customers/versions/{version}/reviewers", json={"reviewers": ["dana"]}
        ),
        403,
        "not_author",
    )
    assert rows(cc) == before


def test_request_changes_returns_the_version_and_the_revision_keeps_thread_and_reviewers(cc):
    req = ok(cc.client("requester").post("/v1/requests", json=REQUEST), 201)
    version = in_review(cc, req["id"])
    alice, bob = cc.client("author"), cc.client("reviewer")
    ok(
        alice.post(
            f"/v1/policies/customers/versions/{version}/reviewers", json={"reviewers": ["bob"]}
        )
    )
    first = ok(
        bob.post(
            f"/v1/policies/customers/versions/{version}/comments",
            json={"body": "why keep age?", "rule": 0},
        ),
        201,
    )
    refused(
        bob.post(
            f"/v1/policies/customers/versions/{version}/request-changes", json={"reason": "  "}
        ),
        422,
        "reason_required",
    )
    info = ok(
        bob.post(
            f"/v1/policies/customers/versions/{version}/request-changes",
            json={"reason": "drop age"},
        )
    )
    assert info["state"] == "returned" and info["reason"] == "drop age"
    assert ok(cc.client("requester").get(f"/v1/requests/{req['id']}"))["state"] == "drafting"
    # A returned version cannot be approved or submitted again.
    refused(bob.post(f"/v1/policies/customers/versions/{version}/approve"), 409, "invalid_state")
    revised = copy.deepcopy(POLICY)
    revised["rules"].append({"match": {"name": "age"}, "actions": ["drop"]})
    v2 = draft(cc, revised)
    ok(alice.post(f"/v1/policies/customers/versions/{v2}/submit"))
    thread = ok(bob.get(f"/v1/policies/customers/versions/{v2}/comments"))
    assert [c["body"] for c in thread] == ["why keep age?", "Changes requested: drop age"]
    reply = ok(
        alice.post(
            f"/v1/policies/customers/versions/{v2}/comments",
            json={"body": "done", "reply_to": first["id"]},
        ),
        201,
    )
    assert reply["version"] == v2 and reply["reply_to"] == first["id"]
    review = ok(bob.get(f"/v1/policies/customers/versions/{v2}/review"))
    assert review["reviewers"] == ["bob"] and review["request"]["id"] == req["id"]
    refused(
        cc.client("reviewer2").post(f"/v1/policies/customers/versions/{v2}/approve"),
        403,
        "not_assigned",
    )
    assert ok(bob.post(f"/v1/policies/customers/versions/{v2}/approve"))["state"] == "active"


def test_review_shows_diff_against_active_plan_over_the_schema_and_who_asked(cc):
    req = ok(cc.client("requester").post("/v1/requests", json=REQUEST), 201)
    v1 = in_review(cc, req["id"])
    bob = cc.client("reviewer")
    review = ok(bob.get(f"/v1/policies/customers/versions/{v1}/review"))
    assert review["active_version"] is None and "+label: customers" in review["diff"]
    plan = {c["column"]: c["status"] for c in review["plan"]["columns"]}
    assert plan == {"id": "untouched", "email": "transformed", "ssn": "dropped", "age": "untouched"}
    assert (
        review["request"]["requester"] == "rita" and review["request"]["purpose"] == "churn model"
    )
    ok(bob.post(f"/v1/policies/customers/versions/{v1}/approve"))
    revised = copy.deepcopy(POLICY)
    revised["rules"].append({"match": {"name": "age"}, "actions": ["drop"]})
    v2 = draft(cc, revised)
    review = ok(bob.get(f"/v1/policies/customers/versions/{v2}/review"))
    assert review["active_version"] == v1
    added = [r["right"] for r in review["side_by_side"] if r["kind"] == "added"]
    assert any("age" in line for line in added)
    plan = {c["column"]: c["status"] for c in review["plan"]["columns"]}
    assert plan["age"] == "dropped"
    ok(cc.client("author").post(f"/v1/policies/customers/versions/{v2}/submit"))
    ok(bob.post(f"/v1/policies/customers/versions/{v2}/approve"))
    # The active version itself is compared with the version it replaced.
    review = ok(bob.get(f"/v1/policies/customers/versions/{v2}/review"))
    assert review["active_version"] == v2 and review["base_version"] == v1
    assert any(r["kind"] == "added" for r in review["side_by_side"])


def test_a_plan_that_cannot_apply_to_the_requested_schema_says_why(cc):
    req = ok(
        cc.client("requester").post(
            "/v1/requests",
            json={
                **REQUEST,
                "schema": {"id": "int64", "age": "int64"},
                "columns": [{"name": "age", "need": "x"}],
            },
        ),
        201,
    )
    version = in_review(cc, req["id"])
    review = ok(cc.client("reviewer").get(f"/v1/policies/customers/versions/{version}/review"))
    assert review["plan"]["columns"] == [] and "email" in review["plan"]["error"]


@pytest.mark.parametrize(
    "body,status,code",
    [
        ({**REQUEST, "schema": {"a": "varchar"}}, 422, "invalid_schema"),
        ({**REQUEST, "columns": [{"name": "nope", "need": "x"}]}, 422, "unknown_column"),
        ({**REQUEST, "columns": [{"name": "age", "need": "   "}]}, 422, "need_required"),
        ({**REQUEST, "purpose": "   "}, 422, "purpose_required"),
        ({**REQUEST, "dataset": "../etc"}, 422, "invalid_request"),
        ({**REQUEST, "columns": []}, 422, "invalid_request"),
        ({**REQUEST, "extra": 1}, 422, "invalid_request"),
    ],
)
def test_bad_requests_are_refused_and_store_nothing(cc, body, status, code):
    before = rows(cc)
    refused(cc.client("requester").post("/v1/requests", json=body), status, code)
    assert rows(cc) == before


def test_requesters_see_only_their_own_requests(cc):
    req = ok(cc.client("requester").post("/v1/requests", json=REQUEST), 201)
    _, token = cc.coord.create_token(cc.principals["admin"], name="eve", role="requester")
    cc.tokens["eve"] = token
    eve = cc.client("eve")
    assert ok(eve.get("/v1/requests")) == []
    refused(eve.get(f"/v1/requests/{req['id']}"), 404, "not_found")
    refused(eve.post(f"/v1/requests/{req['id']}/decline", json={"reason": "x"}), 403, "forbidden")
    # A requester reads no policy, run or audit entry.
    for path in (
        "/v1/policies",
        "/v1/runs",
        "/v1/audit",
        "/v1/policies/customers/versions/1/review",
    ):
        refused(eve.get(path), 403, "forbidden")


def test_decline_needs_a_reason_and_ends_the_request(cc):
    req = ok(cc.client("requester").post("/v1/requests", json=REQUEST), 201)
    alice = cc.client("author")
    before = rows(cc)
    refused(
        alice.post(f"/v1/requests/{req['id']}/decline", json={"reason": " "}),
        422,
        "reason_required",
    )
    assert rows(cc) == before
    info = ok(alice.post(f"/v1/requests/{req['id']}/decline", json={"reason": "not needed"}))
    assert info["state"] == "declined" and info["declined_by"] == "alice"
    before = rows(cc)
    refused(
        alice.post(f"/v1/requests/{req['id']}/decline", json={"reason": "again"}),
        409,
        "invalid_state",
    )
    version = draft(cc)
    before = rows(cc)
    refused(
        alice.post(
            f"/v1/requests/{req['id']}/link", json={"label": "customers", "version": version}
        ),
        409,
        "invalid_state",
    )
    assert rows(cc) == before
    assert ok(cc.client("requester").get("/v1/requests?state=declined"))[0]["id"] == req["id"]


def test_only_the_versions_author_links_it(cc):
    req = ok(cc.client("requester").post("/v1/requests", json=REQUEST), 201)
    version = draft(cc)
    _, token = cc.coord.create_token(cc.principals["admin"], name="mallory", role="author")
    cc.tokens["mallory"] = token
    before = rows(cc)
    refused(
        cc.client("mallory").post(
            f"/v1/requests/{req['id']}/link", json={"label": "customers", "version": version}
        ),
        403,
        "not_author",
    )
    assert rows(cc) == before


def test_comments_anchor_to_existing_rules_and_threads_only(cc):
    version = in_review(cc)
    other = copy.deepcopy(POLICY)
    other["label"] = "orders"
    ov = draft(cc, other)
    stray = ok(
        cc.client("author").post(f"/v1/policies/orders/versions/{ov}/comments", json={"body": "x"}),
        201,
    )
    bob = cc.client("reviewer")
    before = rows(cc)
    refused(
        bob.post(
            f"/v1/policies/customers/versions/{version}/comments", json={"body": "x", "rule": 2}
        ),
        422,
        "unknown_rule",
    )
    refused(
        bob.post(
            f"/v1/policies/customers/versions/{version}/comments",
            json={"body": "x", "reply_to": stray["id"]},
        ),
        422,
        "unknown_comment",
    )
    refused(
        bob.post(f"/v1/policies/customers/versions/{version}/comments", json={"body": "  "}),
        422,
        "comment_empty",
    )
    refused(
        cc.client("auditor").post(
            f"/v1/policies/customers/versions/{version}/comments", json={"body": "x"}
        ),
        403,
        "forbidden",
    )
    assert rows(cc) == before
    payload = "<script>alert(1)</script>"
    saved = ok(
        bob.post(f"/v1/policies/customers/versions/{version}/comments", json={"body": payload}), 201
    )
    assert saved["body"] == payload  # stored as sent; the console escapes it when shown


def test_review_settings_are_admin_only_and_checked(cc):
    admin = cc.client("admin")
    before = rows(cc)
    refused(
        admin.put(
            "/v1/policies/customers/review-settings",
            json={"required_approvals": 2, "reviewers": ["bob"]},
        ),
        422,
        "too_few_reviewers",
    )
    refused(
        admin.put("/v1/policies/customers/review-settings", json={"required_approvals": 0}),
        422,
        "invalid_request",
    )
    refused(
        cc.client("author").put(
            "/v1/policies/customers/review-settings", json={"required_approvals": 1}
        ),
        403,
        "forbidden",
    )
    assert rows(cc) == before
    info = ok(
        admin.put(
            "/v1/policies/customers/review-settings",
            json={"required_approvals": 2, "reviewers": ["bob", "dana"]},
        )
    )
    assert info == {"label": "customers", "required_approvals": 2, "reviewers": ["bob", "dana"]}
    assert ok(cc.client("reviewer").get("/v1/policies/customers/review-settings")) == info
    assert "review.settings_changed" in events(cc)
