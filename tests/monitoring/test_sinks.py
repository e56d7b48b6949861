"""Issue 11 item 5: audit sinks deliver the chain to real receivers on loopback, at least
once, with ids to deduplicate by, and never in ingest's way. The coordinator runs in
process (its delivery dispatchers are threads), once on SQLite and once on PostgreSQL
for the tests about delivery itself (cursor, lease, restart, filter, dead-letter)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "coordinator"))

from _postgres import Cluster, pg_bin_dir, unavailable
from _sink_receivers import (
    OtlpReceiver,
    SyslogReceiver,
    WebhookReceiver,
    any_value,
    jsonl_lines,
    tls_context,
    wait_for,
)

from cape_coordinator.config import Paths, Settings
from cape_coordinator.coordinator import Coordinator
from cape_coordinator.services.base import Principal
from cape_coordinator.services.delivery import DeliveryService, audit_delivery
from cape_coordinator.sinks.config import parse_sinks
from cape_pipelines.audit import MemorySink, RunContext

SECRET = "s3cret-webhook-key-for-tests"
PIPE = Principal("-", "job", "pipeline", ("customers",))
ADMIN = Principal("-", "tester", "admin")
FAST = {"retry_base_seconds": 0.02, "retry_max_seconds": 0.2, "poll_seconds": 0.2}


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[Cluster]:
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        unavailable("initdb/pg_ctl not found (apt-get install postgresql)")
    cluster = Cluster(bin_dir)  # type: ignore[arg-type]
    try:
        cluster.start()
    except RuntimeError as exc:
        cluster.stop()
        unavailable(str(exc))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def make_coord(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """``make_coord(sinks)``: a fresh coordinator with those sinks (dispatchers not started);
    a second call opens another coordinator on the same database (a replica)."""
    if request.param == "sqlite":
        paths = Paths.resolve(str(tmp_path / "cape.db"))
    else:
        url = request.getfixturevalue("pg_cluster").new_database()
        paths = Paths.resolve(url, str(tmp_path / "cape.key"), str(tmp_path / "cape.json"))
    made: list[Coordinator] = []

    def make(sinks: list[dict[str, Any]]) -> Coordinator:
        settings = Settings.from_dict({"audit_sinks": sinks})
        if not made:
            coord, _ = Coordinator.initialize(paths, settings)
        else:
            coord = Coordinator.open(paths, settings)
        made.append(coord)
        return coord

    yield make
    for coord in made:
        coord.close()


@pytest.fixture
def sqlite_coord(tmp_path: Path) -> Iterator[Any]:
    made: list[Coordinator] = []

    def make(sinks: list[dict[str, Any]]) -> Coordinator:
        coord, _ = Coordinator.initialize(
            Paths.resolve(str(tmp_path / f"cape{len(made)}.db")),
            Settings.from_dict({"audit_sinks": sinks}),
        )
        made.append(coord)
        return coord

    yield make
    for coord in made:
        coord.close()


def run_records(n_extra: int = 0, failed: bool = False) -> list[dict[str, Any]]:
    run = RunContext(
        engine="pandas",
        sink=MemorySink(),
        policy={"label": "customers", "version": 1, "sha256": "ab"},
    )
    recs = [run.record("run.started")]
    recs += [run.record("policy.fetched", source="test") for _ in range(n_extra)]
    if failed:
        recs.append(run.record("run.failed", error={"type": "PlanError", "message": "x"}))
    else:
        recs.append(run.record("run.completed", rows_in=3, rows_out=3, rows_redacted=0))
    return recs


def chain(coord: Coordinator) -> list[dict[str, Any]]:
    """Every chain row, in order."""
    from sqlalchemy import select

    from cape_coordinator import db

    with coord.engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(db.audit).order_by(db.audit.c.seq)).mappings()]


def webhook(receiver: WebhookReceiver, **extra: Any) -> dict[str, Any]:
    return {
        "name": "hook",
        "kind": "webhook",
        "url": receiver.url,
        "secret": SECRET,
        "timeout_seconds": 5,
        **FAST,
        **extra,
    }


# ---- webhook --------------------------------------------------------------------------------


def test_webhook_nothing_lost_over_a_receiver_restart_and_ingest_never_waits(make_coord):
    receiver = WebhookReceiver(SECRET).start()
    try:
        coord = make_coord([webhook(receiver, batch_size=7)])
        coord.delivery.start()
        coord.post_audit(PIPE, run_records(10))
        wait_for(lambda: set(receiver.by_seq) == {r["seq"] for r in chain(coord)}, what="first")
        # Records delivered verbatim from the chain, with the ids to deduplicate by.
        rows = {r["seq"]: r for r in chain(coord)}
        for seq, doc in receiver.by_seq.items():
            assert doc["record_id"] == rows[seq]["record_id"]
            assert doc["hash"] == rows[seq]["hash"]
            assert json.loads(rows[seq]["body"])["record"] == doc["record"]
        assert max(len(b["records"]) for b in receiver.batches) <= 7

        # The receiver goes away; ingest goes on, and the backlog grows.
        receiver.stop()
        for _ in range(5):
            coord.post_audit(PIPE, run_records(3))
        coord.create_token(ADMIN, name="during-outage", role="auditor")
        wait_for(lambda: coord.delivery.status()[0]["failures"] > 0, what="a failed attempt")
        assert coord.delivery.backlog()["hook"] > 0
        # A receiver that takes the request and never answers holds the dispatcher, not
        # ingest: a post completes while the delivery is provably in flight.
        receiver.hold = threading.Event()
        receiver.start()
        assert receiver.held.wait(20), "the dispatcher did not retry"
        done = threading.Event()
        threading.Thread(
            target=lambda: (coord.post_audit(PIPE, run_records(1)), done.set()), daemon=True
        ).start()
        assert done.wait(20), "ingest waited for the webhook"
        assert receiver.held.is_set()
        receiver.hold.set()
        receiver.hold = None

        want = {r["seq"] for r in chain(coord)}
        wait_for(lambda: set(receiver.by_seq) == want, what="everything after the restart")
        wait_for(lambda: coord.delivery.backlog() == {"hook": 0}, what="the cursor")
        status = coord.delivery.status()[0]
        assert status["position"] == max(want)
        assert status["dead_lettered"] == 0
        assert receiver.received >= len(want)  # duplicates allowed, deduplicated by seq
        assert receiver.rejected == []
        assert {"token.created", "run.started", "policy.fetched"} <= {
            d["event"] for d in receiver.by_seq.values()
        }
    finally:
        receiver.hold = None
        receiver.stop()


def test_webhook_dead_letter_after_max_attempts_then_delivery_resumes(make_coord, tmp_path):
    receiver = WebhookReceiver(SECRET).start()
    receiver.status = 503
    dead = tmp_path / "dead" / "hook.jsonl"
    try:
        coord = make_coord([webhook(receiver, max_attempts=3, dead_letter=str(dead))])
        coord.post_audit(PIPE, run_records(2))
        first = {r["seq"] for r in chain(coord)}
        coord.delivery.start()
        wait_for(lambda: coord.delivery.backlog()["hook"] == 0, what="dead-lettering")
        lines = jsonl_lines(dead)
        assert {d["seq"] for line in lines for d in line["records"]} == first
        assert all(line["error"] == "webhook: HTTP 503" and line["attempts"] == 3 for line in lines)
        assert oct(dead.stat().st_mode & 0o777) == "0o600"
        assert SECRET not in dead.read_text()
        status = coord.delivery.status()[0]
        assert status["dead_lettered"] == len(first)
        assert status["last_error"] == "webhook: HTTP 503"
        assert receiver.by_seq == {}
        # The receiver recovers: later records are delivered, the dead-lettered ones stay
        # in the file (an operator replays them from there).
        receiver.status = 200
        coord.post_audit(PIPE, run_records(1))
        later = {r["seq"] for r in chain(coord)} - first
        wait_for(lambda: set(receiver.by_seq) == later, what="delivery after recovery")
    finally:
        receiver.stop()


def test_without_a_dead_letter_file_a_failing_batch_is_retried_not_dropped(sqlite_coord):
    receiver = WebhookReceiver(SECRET).start()
    receiver.status = 500
    try:
        coord = sqlite_coord([webhook(receiver, max_attempts=2)])
        coord.post_audit(PIPE, run_records(1))
        coord.delivery.start()
        wait_for(lambda: coord.delivery.counters()["hook"]["failed"] >= 4, what="retries")
        # The outage's first failure is in the row at once (later ones at most every 5 s).
        assert coord.delivery.status()[0]["failures"] >= 1
        assert coord.delivery.status()[0]["position"] == 0
        assert coord.delivery.backlog()["hook"] == len(chain(coord))
        receiver.status = 200
        wait_for(lambda: len(receiver.by_seq) == len(chain(coord)), what="late delivery")
        wait_for(lambda: coord.delivery.backlog()["hook"] == 0, what="the cursor")
        # Once delivered, every failed attempt has been added to the row.
        failed = coord.delivery.counters()["hook"]["failed"]
        assert coord.delivery.status()[0]["failures"] == failed
    finally:
        receiver.stop()


def test_a_receiver_with_another_secret_refuses_every_batch(sqlite_coord):
    receiver = WebhookReceiver("another-secret-entirely-1234").start()
    try:
        coord = sqlite_coord([webhook(receiver)])
        coord.delivery.start()
        wait_for(lambda: len(receiver.rejected) >= 1, what="a rejected batch")
        assert receiver.rejected[0] == "signature does not match the body"
        wait_for(lambda: coord.delivery.status()[0]["last_error"] == "webhook: HTTP 401")
        assert receiver.by_seq == {}
        assert coord.delivery.status()[0]["position"] == 0
    finally:
        receiver.stop()


# ---- filter, backlog, cursors, leases ----------------------------------------------------------


def test_filter_by_event_kind_and_backlog_counts_only_matching(make_coord):
    receiver = WebhookReceiver(SECRET).start()
    try:
        coord = make_coord([webhook(receiver, events=["run.*", "token.*"])])
        coord.post_audit(PIPE, run_records(4, failed=True))
        coord.create_token(ADMIN, name="x", role="auditor")
        rows = chain(coord)
        matching = {r["seq"] for r in rows if r["event"].split(".")[0] in ("run", "token")}
        assert len(matching) < len(rows)  # policy.fetched records are filtered out
        assert coord.delivery.backlog() == {"hook": len(matching)}
        coord.delivery.start()
        wait_for(lambda: coord.delivery.backlog() == {"hook": 0}, what="delivery")
        assert set(receiver.by_seq) == matching
        # The cursor passes the records the filter skips too.
        assert coord.delivery.status()[0]["position"] == rows[-1]["seq"]
    finally:
        receiver.stop()


def test_start_at_latest_skips_history(sqlite_coord):
    receiver = WebhookReceiver(SECRET).start()
    try:
        coord = sqlite_coord([webhook(receiver, start_at="latest")])
        coord.post_audit(PIPE, run_records(1))
        before = {r["seq"] for r in chain(coord)}
        coord.delivery.start()
        coord.post_audit(PIPE, run_records(1))
        after = {r["seq"] for r in chain(coord)} - before
        wait_for(lambda: set(receiver.by_seq) == after, what="new records only")
    finally:
        receiver.stop()


def test_two_replicas_one_delivers_per_sink_and_the_other_takes_over(make_coord):
    receiver = WebhookReceiver(SECRET).start()
    try:
        sinks = [webhook(receiver)]
        first = make_coord(sinks)
        second = make_coord(sinks)
        first.delivery.lease_seconds = second.delivery.lease_seconds = 3.0
        first.delivery.start()
        wait_for(lambda: first.delivery.counters()["hook"]["delivered"] > 0, what="first")
        second.delivery.start()
        for _ in range(3):
            second.post_audit(PIPE, run_records(2))
        wait_for(lambda: first.delivery.backlog() == {"hook": 0}, what="delivery")
        assert second.delivery.counters()["hook"]["delivered"] == 0
        with first.engine.connect() as conn:
            owner = conn.execute(audit_delivery.select()).mappings().one()["lease_owner"]
        assert owner == first.delivery.owner
        # The delivering replica stops (and gives up its lease): the other takes over.
        first.delivery.stop()
        second.post_audit(PIPE, run_records(2))
        want = {r["seq"] for r in chain(second)}
        wait_for(lambda: set(receiver.by_seq) == want, what="take-over")
        # (The receiver stores a batch before it answers; the cursor moves after.)
        wait_for(lambda: second.delivery.counters()["hook"]["delivered"] > 0, what="counted")
    finally:
        receiver.stop()


def test_a_stalled_lease_holder_is_replaced_after_its_lease_expires(sqlite_coord, tmp_path):
    receiver = WebhookReceiver(SECRET).start()
    try:
        coord = sqlite_coord([webhook(receiver)])
        coord.post_audit(PIPE, run_records(1))
        # A replica that took the lease and died without releasing it.
        with coord.engine.begin() as conn:
            conn.execute(
                audit_delivery.insert().values(
                    sink="hook",
                    position=0,
                    delivered=0,
                    dead_lettered=0,
                    failures=0,
                    lease_owner="dead-replica",
                    lease_until="2000-01-01T00:00:00.000000Z",
                    created_at="2000-01-01T00:00:00.000000Z",
                )
            )
        coord.delivery.start()
        wait_for(lambda: len(receiver.by_seq) == len(chain(coord)), what="take-over")
    finally:
        receiver.stop()


# ---- syslog ------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp", "unix-dgram", "unix-stream"])
def test_syslog_rfc5424_over_each_transport(sqlite_coord, transport):
    receiver = SyslogReceiver(transport).start()
    try:
        options: dict[str, Any]
        if transport in ("udp", "tcp"):
            options = {"transport": transport, "host": "127.0.0.1", "port": receiver.port}
        else:
            options = {
                "transport": "unix",
                "socket_path": receiver.path,
                "socket_type": transport.split("-")[1],
            }
        coord = sqlite_coord([{"name": "siem", "kind": "syslog", **options, **FAST}])
        coord.post_audit(PIPE, run_records(2, failed=True))
        coord.delivery.start()
        rows = chain(coord)
        wait_for(lambda: len(receiver.messages) >= len(rows), what="syslog messages")
        by_seq = {int(m["sd"]["cape@32473"]["seq"]): m for m in receiver.messages}
        assert set(by_seq) == {r["seq"] for r in rows}
        for row in rows:
            m = by_seq[row["seq"]]
            assert m["version"] == "1"
            facility, severity = divmod(int(m["pri"]), 8)
            assert facility == 13
            assert severity == (4 if row["event"] == "run.failed" else 6)
            assert m["timestamp"] == row["time"]
            assert m["app"] == "cape-coordinator"
            assert m["procid"] == str(os.getpid())
            assert m["msgid"] == row["event"]
            sd = m["sd"]["cape@32473"]
            assert sd["id"] == row["record_id"]
            assert sd["event"] == row["event"]
            assert sd["kind"] == row["kind"]
            assert sd.get("label") == row["label"]
            assert sd.get("run") == row["run_id"]
            doc = json.loads(m["msg"])
            assert doc["seq"] == row["seq"] and doc["hash"] == row["hash"]
        assert all(raw.count(b"\xef\xbb\xbf") == 1 for raw in receiver.raw)
    finally:
        receiver.stop()


def test_syslog_tcp_reconnects_after_the_receiver_restarts(sqlite_coord):
    receiver = SyslogReceiver("tcp").start()
    try:
        coord = sqlite_coord(
            [{"name": "siem", "kind": "syslog", "transport": "tcp", "port": receiver.port, **FAST}]
        )
        coord.delivery.start()
        wait_for(lambda: len(receiver.messages) >= len(chain(coord)), what="first messages")
        receiver.stop()
        time.sleep(0.3)
        receiver.start()
        coord.post_audit(PIPE, run_records(3))
        want = {r["seq"] for r in chain(coord)}
        wait_for(
            lambda: {int(m["sd"]["cape@32473"]["seq"]) for m in receiver.messages} == want,
            what="messages after the restart",
        )
    finally:
        receiver.stop()


def test_syslog_udp_cuts_oversized_text_but_keeps_the_ids(sqlite_coord):
    receiver = SyslogReceiver("udp").start()
    try:
        coord = sqlite_coord(
            [
                {
                    "name": "siem",
                    "kind": "syslog",
                    "port": receiver.port,
                    "max_datagram_bytes": 600,
                    "sd_id": "audit@99999",
                    **FAST,
                }
            ]
        )
        recs = run_records()
        recs[0]["note"] = "ü" * 2000 + '"]\\'
        coord.post_audit(PIPE, recs)
        coord.delivery.start()
        rows = chain(coord)
        wait_for(lambda: len(receiver.messages) >= len(rows), what="datagrams")
        assert all(len(raw) <= 600 for raw in receiver.raw)
        big = next(m for m in receiver.messages if m["sd"]["audit@99999"]["event"] == "run.started")
        assert big["sd"]["audit@99999"]["truncated"] == "true"
        started = next(r for r in rows if r["event"] == "run.started")
        assert big["sd"]["audit@99999"]["id"] == started["record_id"]
    finally:
        receiver.stop()


# ---- OTLP --------------------------------------------------------------------------------------


def test_otlp_logs_decoded_by_a_collector_stand_in(make_coord):
    receiver = OtlpReceiver().start()
    try:
        coord = make_coord(
            [
                {
                    "name": "otel",
                    "kind": "otlp",
                    "endpoint": receiver.url,
                    "resource": {"deployment.environment": "test"},
                    "headers": {"Authorization": "Bearer collector-token"},
                    **FAST,
                }
            ]
        )
        coord.post_audit(PIPE, run_records(1, failed=True))
        coord.delivery.start()
        rows = chain(coord)
        wait_for(lambda: len(receiver.log_records()) >= len(rows), what="OTLP log records")
        assert set(receiver.content_types) == {"application/x-protobuf"}
        seen = {}
        for resource, scope, rec in receiver.log_records():
            attrs = {kv.key: any_value(kv.value) for kv in resource.attributes}
            assert attrs["service.name"] == "cape-coordinator"
            assert attrs["deployment.environment"] == "test"
            assert scope.name == "cape_coordinator.audit"
            rattrs = {kv.key: any_value(kv.value) for kv in rec.attributes}
            seen[rattrs["cape.seq"]] = (rec, rattrs)
        assert set(seen) == {r["seq"] for r in rows}
        from cape_coordinator import db

        for row in rows:
            rec, rattrs = seen[row["seq"]]
            assert rattrs["cape.record_id"] == row["record_id"]
            assert rattrs["cape.event"] == row["event"]
            assert rattrs["cape.kind"] == row["kind"]
            assert rattrs.get("cape.label") == row["label"]
            assert rec.event_name == row["event"]
            want_sev = "WARN" if row["event"] == "run.failed" else "INFO"
            assert rec.severity_text == want_sev
            moment = db.parse_time(row["time"])
            assert (
                rec.time_unix_nano // 1000 == int(moment.timestamp()) * 10**6 + moment.microsecond
            )
            assert json.loads(any_value(rec.body))["hash"] == row["hash"]
    finally:
        receiver.stop()


def test_otlp_collector_outage_is_retried(sqlite_coord):
    receiver = OtlpReceiver().start()
    receiver.status = 503
    try:
        coord = sqlite_coord(
            [
                {
                    "name": "otel",
                    "kind": "otlp",
                    "endpoint": receiver.url,
                    "timeout_seconds": 1,
                    **FAST,
                }
            ]
        )
        coord.delivery.start()
        wait_for(lambda: coord.delivery.status()[0]["failures"] > 0, what="a failure", timeout=60)
        receiver.status = 200
        n = len(chain(coord))
        wait_for(lambda: len(receiver.log_records()) >= n, what="delivery", timeout=60)
    finally:
        receiver.stop()


# ---- JSONL -------------------------------------------------------------------------------------


def test_jsonl_rotates_by_size_keeps_n_files_and_never_splits_a_record(sqlite_coord, tmp_path):
    path = tmp_path / "out" / "audit.jsonl"
    coord = sqlite_coord(
        [
            {
                "name": "file",
                "kind": "jsonl",
                "path": str(path),
                "max_bytes": 4096,
                "keep": 2,
                "batch_size": 3,
                **FAST,
            }
        ]
    )
    for _ in range(6):
        coord.post_audit(PIPE, run_records(4))
    coord.delivery.start()
    wait_for(lambda: coord.delivery.backlog() == {"file": 0}, what="delivery")
    files = [path, path.with_name("audit.jsonl.1"), path.with_name("audit.jsonl.2")]
    assert all(f.exists() for f in files)
    assert not path.with_name("audit.jsonl.3").exists()
    seqs = []
    for f in reversed(files):
        assert f.stat().st_size <= 4096
        assert oct(f.stat().st_mode & 0o777) == "0o600"
        seqs += [doc["seq"] for doc in jsonl_lines(f)]
    # The kept files hold the newest records, contiguous and in order.
    last = chain(coord)[-1]["seq"]
    assert seqs == list(range(last - len(seqs) + 1, last + 1))


def test_jsonl_rotates_by_age_and_cuts_a_half_written_line(sqlite_coord, tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text('{"seq":0}\n{"seq":1,"half', encoding="utf-8")
    coord = sqlite_coord(
        [{"name": "file", "kind": "jsonl", "path": str(path), "rotate_seconds": 3600, **FAST}]
    )
    coord.delivery.start()
    wait_for(lambda: coord.delivery.backlog() == {"file": 0}, what="delivery")
    lines = jsonl_lines(path)
    assert lines[0] == {"seq": 0} and [d["seq"] for d in lines[1:]] == [
        r["seq"] for r in chain(coord)
    ]
    marker = path.with_name(".audit.jsonl.started")
    old = time.time() - 7200
    os.utime(marker, (old, old))
    coord.post_audit(PIPE, run_records())
    wait_for(lambda: path.with_name("audit.jsonl.1").exists(), what="rotation by age")
    wait_for(lambda: coord.delivery.backlog() == {"file": 0}, what="delivery")
    assert len(jsonl_lines(path.with_name("audit.jsonl.1"))) == len(lines)
    assert [d["seq"] for d in jsonl_lines(path)] == [r["seq"] for r in chain(coord)][-2:]


# ---- all four at once, and a dead one ------------------------------------------------------------


def test_a_dead_sink_does_not_hold_back_the_others(sqlite_coord, tmp_path):
    receiver = WebhookReceiver(SECRET).start()
    try:
        coord = sqlite_coord(
            [
                {"name": "dead", "kind": "syslog", "transport": "tcp", "port": 9, **FAST},
                webhook(receiver),
                {"name": "file", "kind": "jsonl", "path": str(tmp_path / "a.jsonl"), **FAST},
            ]
        )
        coord.delivery.start()
        for _ in range(3):
            coord.post_audit(PIPE, run_records(2))
        n = len(chain(coord))
        wait_for(lambda: len(receiver.by_seq) == n, what="webhook")
        wait_for(lambda: coord.delivery.backlog()["file"] == 0, what="file")
        assert coord.delivery.backlog()["dead"] == n
        assert "syslog tcp 127.0.0.1:9" in coord.delivery.status()[0]["last_error"]
    finally:
        receiver.stop()


def test_delivery_service_without_sinks_starts_nothing(sqlite_coord):
    coord = sqlite_coord([])
    coord.delivery.start()
    assert coord.delivery.backlog() == {}
    assert isinstance(coord.delivery, DeliveryService)
    assert not any(t.name.startswith("cape-audit-sink") for t in threading.enumerate())


def test_parse_sinks_rejects_a_bad_entry_naming_it():
    from cape_coordinator.crypto import CoordinatorSetupError

    with pytest.raises(CoordinatorSetupError, match=r"1\.syslog\.port"):
        parse_sinks(
            '[{"name":"a","kind":"jsonl","path":"x"},{"name":"b","kind":"syslog","port":70000}]',
            "test",
            yaml_ok=False,
        )


def test_commits_do_not_cut_a_backoff_short(sqlite_coord, monkeypatch):
    from cape_coordinator.services import delivery

    # The longest wait the jitter allows, so the test does not depend on the draw.
    monkeypatch.setattr(delivery.random, "uniform", lambda _low, high: high)
    coord = sqlite_coord(
        [
            {
                "name": "down",
                "kind": "webhook",
                "url": "http://127.0.0.1:9/x",
                "secret": SECRET,
                "retry_base_seconds": 30,
            }
        ]
    )
    coord.delivery.start()
    wait_for(lambda: coord.delivery.counters()["down"]["failed"] == 1, what="first failure")
    for _ in range(20):
        coord.post_audit(PIPE, run_records())
    time.sleep(0.5)
    # Under load, a commit per retry would hammer a receiver that is down.
    assert coord.delivery.counters()["down"]["failed"] == 1


def test_an_unwritable_dead_letter_file_keeps_the_batch(sqlite_coord, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x", encoding="utf-8")
    dead = blocker / "dead.jsonl"
    coord = sqlite_coord(
        [
            {
                "name": "down",
                "kind": "webhook",
                "url": "http://127.0.0.1:9/x",
                "secret": SECRET,
                "max_attempts": 1,
                "dead_letter": str(dead),
                **FAST,
            }
        ]
    )
    coord.delivery.start()
    wait_for(lambda: coord.delivery.counters()["down"]["failed"] >= 3, what="attempts")
    assert coord.delivery.status()[0]["position"] == 0
    assert coord.delivery.counters()["down"]["dead_lettered"] == 0
    blocker.unlink()
    wait_for(lambda: coord.delivery.backlog()["down"] == 0, what="dead-lettering")
    assert [d["seq"] for line in jsonl_lines(dead) for d in line["records"]] == [
        r["seq"] for r in chain(coord)
    ]


def test_a_failing_commit_listener_never_fails_the_committed_write(sqlite_coord):
    coord = sqlite_coord([])

    def broken() -> None:
        raise RuntimeError("listener bug")

    coord.chain.listeners.append(broken)
    assert coord.post_audit(PIPE, run_records()) == {"accepted": 2, "duplicates": 0}
    coord.create_token(ADMIN, name="still-works", role="auditor")
    assert [r["event"] for r in chain(coord)][-3:] == [
        "run.started",
        "run.completed",
        "token.created",
    ]


def test_https_webhook_trusts_only_the_configured_ca(sqlite_coord, tmp_path):
    context, ca_file = tls_context(tmp_path)
    receiver = WebhookReceiver(SECRET, tls=context).start()
    try:
        # Without the private CA the receiver's certificate is refused (as a
        # man in the middle's would be): nothing is sent, the batch waits.
        untrusting = sqlite_coord([webhook(receiver, name="plain")])
        untrusting.delivery.start()
        wait_for(lambda: untrusting.delivery.counters()["plain"]["failed"] >= 1, what="refusal")
        wait_for(lambda: untrusting.delivery.status()[0]["last_error"] == "webhook: SSLError")
        assert receiver.by_seq == {}
        trusting = sqlite_coord([webhook(receiver, ca_file=str(ca_file))])
        trusting.delivery.start()
        wait_for(lambda: len(receiver.by_seq) == len(chain(trusting)), what="TLS delivery")
    finally:
        receiver.stop()


def test_a_retry_resends_the_failed_batch_without_reading_it_again(sqlite_coord):
    receiver = WebhookReceiver(SECRET).start()
    receiver.status = 503
    try:
        coord = sqlite_coord([webhook(receiver)])
        reads = []
        pending = coord.delivery._pending
        coord.delivery._pending = lambda config: reads.append(1) or pending(config)
        coord.delivery.start()
        wait_for(lambda: coord.delivery.counters()["hook"]["failed"] >= 5, what="retries")
        assert len(reads) == 1
        receiver.status = 200
        wait_for(lambda: len(receiver.by_seq) == len(chain(coord)), what="delivery")
    finally:
        receiver.stop()


def test_steady_ingest_goes_out_in_few_full_batches(sqlite_coord):
    receiver = WebhookReceiver(SECRET).start()
    try:
        coord = sqlite_coord([webhook(receiver, batch_size=1000, linger_seconds=1.0)])
        coord.delivery.start()
        wait_for(lambda: len(receiver.batches) == 1, what="the first batch")
        for _ in range(20):
            coord.post_audit(PIPE, run_records())
        wait_for(lambda: len(receiver.by_seq) == len(chain(coord)), what="delivery")
        # One batch per commit would be 20 batches and 20 cursor commits beside ingest's.
        assert len(receiver.batches) <= 5
    finally:
        receiver.stop()
