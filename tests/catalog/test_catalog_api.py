"""The governance catalog through the HTTP API: datasets and tags with who/when on the audit
chain, the taxonomy, proposals decided by a person, refusals that store nothing, and the
coverage report that is shown in review and blocks an approval when the label asks."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import func, select

from cape_coordinator.services.catalog import CATALOG_TABLES

SCHEMA = {"id": "int64", "email": "string", "ssn": "string", "age": "int64", "ip": "string"}


def ok(resp: Any, status: int = 200) -> Any:
    assert resp.status_code == status, resp.text
    return resp.json()


def refused(resp: Any, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code, resp.text


def events(cc: Any) -> list[dict[str, Any]]:
    return [e["record"] for e in cc.coord.list_audit(limit=1000)]


def state(cc: Any) -> str:
    """Every catalog table's rows and the chain's length: equal before and after a refusal."""
    out: dict[str, Any] = {"audit": cc.audit_count()}
    with cc.coord.engine.connect() as conn:
        for t in CATALOG_TABLES:
            out[t.name] = [list(map(str, r)) for r in conn.execute(select(t))]
            out[t.name + "#"] = conn.execute(select(func.count()).select_from(t)).scalar_one()
    return json.dumps(out, sort_keys=True)


def register(cc: Any, name: str = "customers", schema: dict[str, str] | None = None) -> Any:
    return ok(
        cc.client("author").put(
            f"/v1/catalog/datasets/{name}", json={"owner": "alice", "schema": schema or SCHEMA}
        )
    )


def tags_of(info: dict[str, Any]) -> dict[str, list[str]]:
    return {c["name"]: [t["tag"] for t in c["tags"]] for c in info["columns"] if c["tags"]}


def test_dataset_tags_carry_who_and_when_and_are_chain_records(cc):
    info = register(cc)
    assert [c["name"] for c in info["columns"]] == list(SCHEMA)
    assert info["owner"] == "alice"
    bob = cc.client("reviewer")
    info = ok(
        bob.post(
            "/v1/catalog/datasets/customers/tags", json={"column": "email", "tag": "pii.email"}
        )
    )
    info = ok(
        bob.post(
            "/v1/catalog/datasets/customers/tags",
            json={"column": "age", "tag": "quasi_identifier.age"},
        )
    )
    assert tags_of(info) == {"email": ["pii.email"], "age": ["quasi_identifier.age"]}
    email = next(c for c in info["columns"] if c["name"] == "email")
    assert email["tags"][0]["tagged_by"] == "bob" and email["tags"][0]["source"] == "manual"
    assert email["tags"][0]["tagged_at"].endswith("Z")
    tagged = [e for e in events(cc) if e["event"] == "catalog.tagged"]
    assert {(e["principal"], e["column"], e["tag"]) for e in tagged} == {
        ("bob", "email", "pii.email"),
        ("bob", "age", "quasi_identifier.age"),
    }
    assert any(e["event"] == "catalog.dataset_registered" for e in events(cc))
    # What a plan's column_tags takes, readable by a pipeline token.
    assert ok(cc.client("pipeline").get("/v1/catalog/datasets/customers/column-tags")) == {
        "email": ["pii.email"],
        "age": ["quasi_identifier.age"],
    }
    ok(
        bob.post(
            "/v1/catalog/datasets/customers/untag",
            json={"column": "age", "tag": "quasi_identifier.age"},
        )
    )
    assert tags_of(cc.coord.catalog.get("customers")) == {"email": ["pii.email"]}
    assert events(cc)[-1]["event"] == "catalog.untagged"
    assert cc.coord.verify_audit().intact


def test_taxonomy_is_extensible_by_the_admin_only(cc):
    register(cc)
    bob = cc.client("reviewer")
    before = state(cc)
    refused(
        bob.post(
            "/v1/catalog/datasets/customers/tags", json={"column": "ssn", "tag": "pii.health.code"}
        ),
        422,
        "unknown_tag",
    )
    refused(
        cc.client("author").post(
            "/v1/catalog/tags", json={"tag": "pii.health.*", "description": "x"}
        ),
        403,
        "forbidden",
    )
    assert state(cc) == before
    ok(
        cc.client("admin").post(
            "/v1/catalog/tags", json={"tag": "pii.health.*", "description": "health"}
        ),
        201,
    )
    refused(
        cc.client("admin").post(
            "/v1/catalog/tags", json={"tag": "pii.email", "description": "again"}
        ),
        409,
        "tag_exists",
    )
    refused(
        cc.client("admin").post("/v1/catalog/tags", json={"tag": "PII Email", "description": "x"}),
        422,
        "invalid_tag",
    )
    ok(
        bob.post(
            "/v1/catalog/datasets/customers/tags", json={"column": "ssn", "tag": "pii.health.code"}
        )
    )
    listed = {t["tag"]: t for t in ok(bob.get("/v1/catalog/tags"))}
    assert listed["pii.email"]["builtin"] and not listed["pii.health.*"]["builtin"]
    assert listed["pii.health.*"]["created_by"] == "admin"


def test_refusals_store_nothing(cc):
    register(cc)
    before = state(cc)
    author, bob, pipe = cc.client("author"), cc.client("reviewer"), cc.client("pipeline")
    body = {"column": "email", "tag": "pii.email"}
    # Roles that may not tag: the author who wrote the scan, a pipeline, a requester.
    for who in (author, pipe, cc.client("requester"), cc.client("auditor")):
        refused(who.post("/v1/catalog/datasets/customers/tags", json=body), 403, "forbidden")
    refused(
        bob.put("/v1/catalog/datasets/customers", json={"owner": "bob", "schema": {"x": "int64"}}),
        403,
        "forbidden",
    )
    refused(
        cc.client(None).post("/v1/catalog/datasets/customers/tags", json=body),
        401,
        "unauthenticated",
    )
    # Wrong targets and bad input.
    refused(bob.post("/v1/catalog/datasets/nope/tags", json=body), 404, "not_found")
    refused(
        bob.post(
            "/v1/catalog/datasets/customers/tags", json={"column": "nope", "tag": "pii.email"}
        ),
        404,
        "not_found",
    )
    refused(bob.post("/v1/catalog/datasets/customers/untag", json=body), 404, "not_found")
    for schema in ({}, {"a": "Not A Type"}, {"a\x01": "int64"}):
        resp = author.put("/v1/catalog/datasets/x", json={"owner": "alice", "schema": schema})
        assert resp.status_code == 422, resp.text
    refused(
        author.put("/v1/catalog/datasets/x", json={"owner": "a b", "schema": {"a": "int64"}}),
        422,
        "invalid_owner",
    )
    # A proposal batch with one bad item stores none of it.
    good = {
        "column": "email",
        "tag": "pii.email",
        "confidence": 1,
        "evidence": 5,
        "sampled": 5,
        "detector": "email",
    }
    refused(
        author.post(
            "/v1/catalog/datasets/customers/proposals",
            json={"proposals": [good, {**good, "column": "nope"}]},
        ),
        422,
        "unknown_column",
    )
    refused(
        author.post(
            "/v1/catalog/datasets/customers/proposals",
            json={"proposals": [{**good, "tag": "pii.nope"}]},
        ),
        422,
        "unknown_tag",
    )
    assert state(cc) == before
    # A double tag is a conflict, not a second row.
    ok(bob.post("/v1/catalog/datasets/customers/tags", json=body))
    after = state(cc)
    refused(bob.post("/v1/catalog/datasets/customers/tags", json=body), 409, "already_tagged")
    assert state(cc) == after


def test_proposals_change_no_tag_until_a_person_accepts(cc):
    register(cc)
    author, bob = cc.client("author"), cc.client("reviewer")
    items = [
        {
            "column": "email",
            "tag": "pii.email",
            "confidence": 0.98,
            "evidence": 98,
            "sampled": 100,
            "detector": "email",
        },
        {
            "column": "ip",
            "tag": "pii.ip",
            "confidence": 0.9,
            "evidence": 90,
            "sampled": 100,
            "detector": "ipv4",
        },
    ]
    made = ok(
        author.post("/v1/catalog/datasets/customers/proposals", json={"proposals": items}), 201
    )
    assert [p["state"] for p in made] == ["pending", "pending"]
    assert tags_of(cc.coord.catalog.get("customers")) == {}
    pending = ok(
        bob.get("/v1/catalog/proposals", params={"dataset": "customers", "state": "pending"})
    )
    assert [(p["column"], p["evidence"]) for p in pending] == [("email", 98), ("ip", 90)]
    # The author who scanned may not decide.
    refused(author.post(f"/v1/catalog/proposals/{made[0]['id']}/accept"), 403, "forbidden")
    accepted = ok(bob.post(f"/v1/catalog/proposals/{made[0]['id']}/accept"))
    assert accepted["state"] == "accepted" and accepted["decided_by"] == "bob"
    rejected = ok(
        bob.post(f"/v1/catalog/proposals/{made[1]['id']}/reject", json={"reason": "test IPs"})
    )
    assert rejected["state"] == "rejected" and rejected["reason"] == "test IPs"
    info = cc.coord.catalog.get("customers")
    assert tags_of(info) == {"email": ["pii.email"]}
    email = next(c for c in info["columns"] if c["name"] == "email")
    assert email["tags"][0]["source"] == "scan" and email["tags"][0]["tagged_by"] == "bob"
    before = state(cc)
    refused(bob.post(f"/v1/catalog/proposals/{made[1]['id']}/accept"), 409, "already_decided")
    refused(bob.post("/v1/catalog/proposals/999/accept"), 404, "not_found")
    assert state(cc) == before
    kinds = [e["event"] for e in events(cc)]
    assert "catalog.proposals_made" in kinds
    assert kinds.index("catalog.tagged") < kinds.index("catalog.proposal_accepted")
    assert "catalog.proposal_rejected" in kinds


def test_a_new_schema_drops_the_tags_of_removed_columns_on_the_record(cc):
    register(cc)
    ok(
        cc.client("admin").post(
            "/v1/catalog/datasets/customers/tags", json={"column": "ssn", "tag": "pii.ssn"}
        )
    )
    info = register(cc, schema={"id": "int64", "email": "string"})
    assert tags_of(info) == {}
    gone = [e for e in events(cc) if e["event"] == "catalog.untagged"]
    assert gone and gone[-1]["column"] == "ssn" and gone[-1]["why"] == "column left the schema"


TAGGED_POLICY = {
    "label": "customers",
    "rules": [
        {"match": {"tag": "pii.email"}, "actions": ["drop"]},
        {"match": {"name": "nickname"}, "actions": ["drop"]},
    ],
}


def _submit(cc: Any, document: dict[str, Any]) -> int:
    author = cc.client("author")
    version = ok(author.post("/v1/policies", json={"document": document}), 201)["version"]
    ok(author.post(f"/v1/policies/customers/versions/{version}/submit"))
    return int(version)


def test_coverage_report_names_uncovered_columns_and_idle_rules(cc):
    register(cc)
    admin = cc.client("admin")
    for col, tag in (("email", "pii.email"), ("ssn", "pii.ssn")):
        ok(admin.post("/v1/catalog/datasets/customers/tags", json={"column": col, "tag": tag}))
    report = ok(
        cc.client("author").post(
            "/v1/catalog/datasets/customers/coverage", json={"document": TAGGED_POLICY}
        )
    )
    assert report["complete"] is False
    assert report["uncovered"] == [{"column": "ssn", "tags": ["pii.ssn"]}]
    assert report["covered"] == {"email": [1]}
    assert report["unmatched_rules"] == [2]
    refused(
        cc.client("author").post(
            "/v1/catalog/datasets/customers/coverage", json={"document": {"label": "x"}}
        ),
        422,
        "invalid_policy",
    )


def test_coverage_blocks_an_approval_when_the_label_requires_it(cc):
    register(cc)
    admin, bob = cc.client("admin"), cc.client("reviewer")
    for col, tag in (("email", "pii.email"), ("ssn", "pii.ssn")):
        ok(admin.post("/v1/catalog/datasets/customers/tags", json={"column": col, "tag": tag}))
    refused(
        bob.put(
            "/v1/catalog/labels/customers", json={"dataset": "customers", "require_coverage": True}
        ),
        403,
        "forbidden",
    )
    refused(
        admin.put(
            "/v1/catalog/labels/customers", json={"dataset": "nope", "require_coverage": True}
        ),
        404,
        "not_found",
    )
    ok(
        admin.put(
            "/v1/catalog/labels/customers", json={"dataset": "customers", "require_coverage": True}
        )
    )
    v1 = _submit(cc, TAGGED_POLICY)
    review = ok(bob.get(f"/v1/policies/customers/versions/{v1}/review"))
    assert review["coverage"]["required"] is True
    assert review["coverage"]["uncovered"] == [{"column": "ssn", "tags": ["pii.ssn"]}]
    before = state(cc)
    with cc.coord.engine.connect() as conn:
        from cape_coordinator.services.workflow import approvals

        approvals_before = conn.execute(select(func.count()).select_from(approvals)).scalar_one()
    resp = bob.post(f"/v1/policies/customers/versions/{v1}/approve")
    refused(resp, 409, "coverage_incomplete")
    assert "ssn (pii.ssn)" in resp.json()["error"]["message"]
    assert state(cc) == before
    with cc.coord.engine.connect() as conn:
        assert (
            conn.execute(select(func.count()).select_from(approvals)).scalar_one()
            == approvals_before
        )
    assert ok(bob.get(f"/v1/policies/customers/versions/{v1}"))["state"] == "in_review"
    # The author covers ssn by its tag; that version is approved and activated.
    covered = {
        **TAGGED_POLICY,
        "rules": [*TAGGED_POLICY["rules"], {"match": {"tag": "pii.ssn"}, "actions": ["drop"]}],
    }
    v2 = _submit(cc, covered)
    assert (
        ok(bob.get(f"/v1/policies/customers/versions/{v2}/review"))["coverage"]["complete"] is True
    )
    ok(bob.post(f"/v1/policies/customers/versions/{v2}/approve"))
    assert ok(bob.get(f"/v1/policies/customers/versions/{v2}"))["state"] == "active"


def test_coverage_informs_but_does_not_block_without_the_setting(cc):
    register(cc)
    admin, bob = cc.client("admin"), cc.client("reviewer")
    ok(admin.post("/v1/catalog/datasets/customers/tags", json={"column": "ssn", "tag": "pii.ssn"}))
    ok(
        admin.put(
            "/v1/catalog/labels/customers", json={"dataset": "customers", "require_coverage": False}
        )
    )
    v1 = _submit(cc, TAGGED_POLICY)
    review = ok(bob.get(f"/v1/policies/customers/versions/{v1}/review"))
    assert review["coverage"]["required"] is False and review["coverage"]["complete"] is False
    ok(bob.post(f"/v1/policies/customers/versions/{v1}/approve"))
