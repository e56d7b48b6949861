"""Audit ingest on PostgreSQL, in process: what the group writer asks the database.

The duplicate check must probe the unique (sender, record_id) index once per id, not
read every record its sender ever stored (the plan PostgreSQL chose for
``record_id IN (...)`` on a table without statistics, a cost that grew with the
sender's history inside the chain's lock). The rows go in as one statement per group
with their bodies byte for byte the canonical entry, and several appends in one
transaction chain on from each other.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _coord_support import fetched_records
from sqlalchemy import event

from cape_coordinator.config import Paths, Settings
from cape_coordinator.store import Coordinator, Principal
from cape_pipelines.policy.models import canonical_json

PIPELINE = Principal(token_id="t-pg", name="pg-pipeline", role="pipeline", labels=("pg",))
ADMIN = Principal(token_id="-", name="pg-admin", role="admin")


def _records(run_id: str, n: int) -> list[dict[str, object]]:
    return fetched_records(
        run_id, n, "pg", 'ünïcode, "quotes", back\\slash, {braces} and \u2028 kept'
    )


@pytest.fixture
def pg_coordinator(pg_cluster, tmp_path: Path) -> Iterator[Coordinator]:
    url = pg_cluster.new_database("ingest")
    paths = Paths.resolve(url, str(tmp_path / "k"), str(tmp_path / "c.json"))
    coord, _ = Coordinator.initialize(paths, Settings())
    try:
        yield coord
    finally:
        coord.close()


def _rows_examined(plan: dict[str, Any]) -> int:
    """Rows the plan read from ``audit``: returned plus filtered out, over all loops."""
    total = 0
    if plan.get("Relation Name") == "audit":
        per_loop = (
            plan.get("Actual Rows", 0)
            + plan.get("Rows Removed by Filter", 0)
            + plan.get("Rows Removed by Index Recheck", 0)
        )
        total += per_loop * plan.get("Actual Loops", 1)
    for child in plan.get("Plans", []):
        total += _rows_examined(child)
    return total


def test_duplicate_check_probes_each_id_not_the_senders_history(pg_coordinator):
    coord = pg_coordinator
    stored: list[dict[str, Any]] = []
    for i in range(30):
        batch = _records(f"history-{i % 3}", 100)
        assert coord.post_audit(PIPELINE, batch)["accepted"] == 100
        stored.extend(batch)
    old = [r["record_id"] for r in stored[::60]]
    new = [str(uuid.uuid4()) for _ in range(50)]
    ids = [(PIPELINE.token_id, rid) for rid in old + new]

    statements: list[tuple[str, Any]] = []

    def capture(_conn, _cursor, statement, parameters, _context, _many):
        statements.append((statement, parameters))

    with coord.engine.connect() as conn:
        event.listen(conn, "before_cursor_execute", capture)
        try:
            known = coord.ingest._known_ids(conn, ids)
        finally:
            event.remove(conn, "before_cursor_execute", capture)
        assert set(known) == {(PIPELINE.token_id, rid) for rid in old}
        by_id = {r["record_id"]: r for r in stored}
        for (_, rid), body in known.items():
            assert json.loads(body)["record"] == by_id[rid]
        assert statements
        examined = 0
        for statement, parameters in statements:
            explained = conn.exec_driver_sql(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters
            ).scalar_one()
            plan = explained[0]["Plan"] if isinstance(explained, list) else json.loads(explained)
            examined += _rows_examined(plan)
    # 3,000 records of this sender are stored; the check may read only the ones asked for.
    assert examined <= len(ids), f"the duplicate check read {examined} rows for {len(ids)} ids"


def test_rows_go_in_byte_for_byte_and_chain_on(pg_coordinator):
    coord = pg_coordinator
    batches = [_records("bytes", 40), _records("bytes", 1), _records("other", 25)]
    for batch in batches:
        assert coord.post_audit(PIPELINE, batch)["accepted"] == len(batch)
    # A resend is a duplicate, its rows are not stored twice.
    assert coord.post_audit(PIPELINE, batches[0][:5]) == {"accepted": 0, "duplicates": 5}
    entries = coord.list_audit(label="pg", limit=1000)
    assert [e["record"] for e in entries] == [r for b in batches for r in b]
    with coord.engine.connect() as conn:
        bodies = dict(conn.exec_driver_sql("SELECT seq, body FROM audit").all())
    for e in entries:
        entry = {k: e[k] for k in ("kind", "source", "received_at", "record", "sender")}
        assert bodies[e["seq"]].encode("utf-8") == canonical_json(entry)
    result = coord.verify_audit()
    assert result.intact, result.problems
    runs = {r["run_id"]: r for r in coord.runs.list(label="pg")}
    assert runs["bytes"]["records"] == 41 and runs["other"]["records"] == 25


def test_several_appends_in_one_transaction_chain_on(pg_coordinator):
    coord = pg_coordinator
    before = coord.audit_count()
    with coord.chain.write() as (conn, appended):
        coord.chain.record(conn, appended, ADMIN, "token.created", note="first")
        coord.chain.record(conn, appended, ADMIN, "token.created", note="second")
        coord.chain.record(conn, appended, ADMIN, "token.created", note="third")
    assert [r["seq"] for r in appended] == [before + 1, before + 2, before + 3]
    assert appended[1]["prev_hash"] == appended[0]["hash"]
    coord.post_audit(PIPELINE, _records("after", 3))
    result = coord.verify_audit()
    assert result.intact, result.problems
    assert result.count == before + 6
    # A failed transaction moves nothing: the next one chains on from the committed head.
    with pytest.raises(RuntimeError), coord.chain.write() as (conn, appended):
        coord.chain.record(conn, appended, ADMIN, "token.created", note="rolled back")
        raise RuntimeError("abort")
    coord.post_audit(PIPELINE, _records("after", 2))
    result = coord.verify_audit()
    assert result.intact, result.problems
    assert result.count == before + 8
