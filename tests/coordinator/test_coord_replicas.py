"""Issue 9 item 8: two coordinator replicas on one PostgreSQL database behind one client
list (round-robin), with concurrent approvals and audit ingest from many posters.

Checked: exactly one active version per label (the newest approved), one unbroken
chain across both replicas, every acknowledged record stored exactly once.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from _coord_support import Server, policy_doc

LABEL = "replicated"


@pytest.fixture
def replicas(pg_cluster, tmp_path: Path) -> Iterator[list[Server]]:
    first = Server(tmp_path / "coord", db_url=pg_cluster.new_database("replicas"))
    second = first.replica()
    first.start()
    try:
        second.start()
        yield [first, second]
    finally:
        second.stop()
        first.stop()


def _records(run_id: str, n: int) -> list[dict[str, object]]:
    return [
        {
            "record_id": str(uuid.uuid4()),
            "run_id": run_id,
            "event": "policy.fetched",
            "time": "2026-01-01T00:00:00Z",
            "policy": {"label": LABEL, "version": 1, "sha256": "ab"},
        }
        for _ in range(n)
    ]


def test_two_replicas_one_chain_one_active_version(replicas):
    urls = itertools.cycle([s.url for s in replicas])
    lock = threading.Lock()

    def next_url() -> str:
        with lock:
            return next(urls)

    admin = replicas[0].client(replicas[0].admin_token)
    tok = {
        role: admin.create_token(f"{role}-r", role, labels=[LABEL] if role == "pipeline" else [])[
            "token"
        ]
        for role in ("author", "reviewer", "pipeline", "auditor")
    }
    reviewer2 = admin.create_token("reviewer-r2", "reviewer")["token"]

    def call(token: str, method: str, path: str, **kw: object) -> requests.Response:
        return requests.request(
            method,
            next_url() + path,
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
            **kw,  # type: ignore[arg-type]
        )

    versions = []
    for i in range(6):
        v = call(
            tok["author"], "POST", "/v1/policies", json={"document": policy_doc(LABEL, f"c{i}")}
        )
        versions.append(v.json()["version"])
        call(tok["author"], "POST", f"/v1/policies/{LABEL}/versions/{versions[-1]}/submit")

    acked: list[str] = []
    failures: list[str] = []
    approvals: list[tuple[int, int]] = []

    def poster(n: int) -> None:
        run = f"run-{n}"
        for _ in range(10):
            batch = _records(run, 20)
            resp = call(tok["pipeline"], "POST", "/v1/audit", json={"records": batch})
            if resp.status_code == 200 and resp.json()["accepted"] == len(batch):
                with lock:
                    acked.extend(str(r["record_id"]) for r in batch)
            else:
                failures.append(f"{resp.status_code} {resp.text[:200]}")

    def approver(token: str, order: list[int]) -> None:
        for v in order:
            resp = call(token, "POST", f"/v1/policies/{LABEL}/versions/{v}/approve")
            with lock:
                approvals.append((v, resp.status_code))

    threads = [threading.Thread(target=poster, args=(n,)) for n in range(6)]
    threads.append(threading.Thread(target=approver, args=(tok["reviewer"], versions)))
    threads.append(threading.Thread(target=approver, args=(reviewer2, versions[::-1])))
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not failures, failures[:3]
    assert {status for _, status in approvals} <= {200, 409}
    approved = [v for v, status in approvals if status == 200]
    # Each version approved at most once, and never one older than an approved one: in
    # the order the chain holds the approvals (two threads' responses can arrive in
    # the other order than their commits, so the response order proves nothing).
    assert len(approved) == len(set(approved))
    chain_order = [
        e["record"]["version"]
        for e in replicas[0]
        .client(tok["auditor"])
        .list_audit(label=LABEL, event="policy.approved", limit=1000)
    ]
    assert sorted(chain_order) == sorted(approved)
    assert chain_order == sorted(chain_order)
    history = requests.get(
        f"{replicas[1].url}/v1/policies/{LABEL}/versions",
        headers={"Authorization": f"Bearer {tok['auditor']}"},
        timeout=60,
    ).json()
    active = [p["version"] for p in history if p["state"] == "active"]
    assert active == [max(approved)]
    for server in replicas:
        served = requests.get(
            f"{server.url}/v1/policies/{LABEL}/active",
            headers={"Authorization": f"Bearer {tok['pipeline']}"},
            timeout=60,
        )
        assert int(served.headers["X-Cape-Policy-Version"]) == active[0]
    # One unbroken chain, and every acknowledged record in it exactly once.
    auditor = replicas[0].client(tok["auditor"], timeout=(3, 300))
    result = auditor.verify_audit()
    assert result["intact"], result["problems"]
    stored: list[str] = []
    after = 0
    while True:
        page = auditor.list_audit(label=LABEL, event="policy.fetched", after_seq=after, limit=1000)
        if not page:
            break
        stored.extend(e["record"]["record_id"] for e in page)
        after = page[-1]["seq"]
    assert len(acked) == 6 * 10 * 20
    assert sorted(stored) == sorted(acked)
