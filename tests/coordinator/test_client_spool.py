"""Issue 9.6 and issue 7 item 6b, client side: one poisoned record never blocks the spool,
a 401 keeps everything spooled, and the spool owns a small picklable transport.

Delivery is watched through a loopback stand-in that stores each batch whole or not at
all and refuses as the contract says, and through a real coordinator.
"""

from __future__ import annotations

import ast
import pickle
import time
from pathlib import Path

import pytest
from _standin import StandIn

from cape_pipelines.audit import RunContext
from coordinator_client import Client, SpoolSink, Transport

PACKAGE = Path(__file__).resolve().parents[2] / "coordinator_client"


def _nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"n": value}
    return value


def _records(run: RunContext, n: int) -> list[dict]:
    return [run.record("policy.fetched", source=f"test {i}") for i in range(n)]


def _poison(run: RunContext) -> dict:
    return {**run.record("policy.fetched", source="poison"), "extra": _nested(300)}


def _refuse_poison(status: int):
    def refuse(records):
        for index, record in enumerate(records):
            if "extra" in record:
                return status, {
                    "error": {
                        "code": "record_invalid",
                        "message": "nested too deeply",
                        "index": index,
                        "record_id": record["record_id"],
                    }
                }
        return None

    return refuse


@pytest.fixture
def standin():
    s = StandIn()
    with s.running():
        yield s


def _sink(url: str, spool: Path, **options) -> SpoolSink:
    return SpoolSink(
        Transport(url, "tok", timeout=5),
        spool,
        min_backoff=0.01,
        max_backoff=0.05,
        poll_interval=0.05,
        **options,
    )


@pytest.mark.parametrize("status", [422, 500])
def test_poisoned_record_isolated_good_ones_delivered_once(standin, tmp_path, status):
    standin.refuse = _refuse_poison(status)
    run = RunContext(engine="pandas")
    before, after = _records(run, 40), _records(run, 25)
    bad = _poison(run)
    sink = _sink(standin.url, tmp_path, batch_size=500)
    for record in before[:20]:
        sink.emit(record)
    sink.emit(bad)
    for record in before[20:]:
        sink.emit(record)
    # Later records, emitted while the bad one is still being tried, are delivered too.
    deadline = time.monotonic() + 30
    while sink.pending_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    for record in after:
        sink.emit(record)
        deadline = time.monotonic() + 30
        while sink.pending_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert sink.flush(60)
    sink.close()
    stored = [r["record_id"] for r in standin.stored]
    assert sorted(stored) == sorted(r["record_id"] for r in before + after)
    assert len(stored) == len(set(stored))
    (rejected,) = [p for p in (tmp_path / "rejected").glob("*.json") if "reason" not in p.name]
    assert rejected.read_text().count('{"n":') == 300
    reason = (tmp_path / "rejected" / rejected.name.replace(".json", ".reason.json")).read_text()
    assert f'"status": {status}' in reason and "record_invalid" in reason
    assert '"tries": 5' in reason
    assert sink.pending_count() == 0


def test_401_stops_delivery_and_keeps_everything_spooled(standin, tmp_path):
    standin.status_override = 401
    sink = _sink(standin.url, tmp_path)
    run = RunContext(engine="pandas", sink=sink)
    for _ in range(5):
        run.started()
    assert not sink.flush(10)
    assert sink.stopped is not None and "401" in sink.stopped
    sink.close(timeout=0.1)
    assert sink.pending_count() == 5
    assert not list((tmp_path / "rejected").iterdir())
    # With a valid token again, a new sink on the spool delivers them all, once.
    standin.status_override = None
    again = _sink(standin.url, tmp_path)
    assert again.flush(30)
    again.close()
    assert len(standin.stored) == 5


@pytest.mark.parametrize("status", [500, 503])
def test_coordinator_failing_everything_rejects_nothing(standin, tmp_path, status):
    """A 5xx for every request is an outage, not five bad records: they wait, then arrive."""
    standin.status_override = status
    sink = _sink(standin.url, tmp_path, max_tries=2)
    run = RunContext(engine="pandas", sink=sink)
    for _ in range(5):
        run.started()
    assert not sink.flush(2)
    assert len(standin.batches) > 5  # it kept trying
    assert not list((tmp_path / "rejected").iterdir())
    assert sink.pending_count() == 5
    standin.status_override = None
    assert sink.flush(30)
    sink.close()
    assert len(standin.stored) == 5


def test_lone_5xx_counts_only_with_evidence_the_coordinator_works(standin, tmp_path):
    standin.refuse = _refuse_poison(500)
    run = RunContext(engine="pandas")
    sink = _sink(standin.url, tmp_path, max_tries=3)
    sink.emit(_poison(run))
    assert not sink.flush(1.0)
    # Alone, the record is never shown to be the problem: it stays pending.
    assert sink.pending_count() == 1 and not list((tmp_path / "rejected").iterdir())
    for record in _records(run, 3):
        sink.emit(record)
        deadline = time.monotonic() + 10
        while sink.pending_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert sink.flush(30)
    sink.close()
    assert len(standin.stored) == 3
    assert len(list((tmp_path / "rejected").glob("*.reason.json"))) == 1


def test_pickled_sink_carries_only_the_transport(standin, tmp_path):
    """What Beam ships to a worker: URL, token, timeout and the spool path; no client,
    no pinned key, no policy cache, no key material."""
    secret = bytes(range(32))
    standin.keys["customers"] = {"k1": {"versions": {"1": secret.hex()}}}
    client = Client(standin.url, "tok-xyz", public_key=standin.public_key, spool_dir=tmp_path)
    client.get_key_versions("customers")
    sink = client.audit_sink()
    data = pickle.dumps(sink)
    assert b"Client" not in data and b"Ed25519" not in data and secret not in data
    assert secret.hex().encode() not in data
    copy = pickle.loads(data)
    assert type(copy.transport) is Transport
    assert (copy.transport.url, copy.transport.token) == (standin.url, "tok-xyz")
    assert "tok-xyz" not in repr(copy.transport)
    RunContext(engine="beam", sink=copy).started()  # delivered in the emitting call
    assert len(standin.stored) == 1
    copy.close()
    client.close()


def test_spool_never_imports_the_client():
    """The client/spool import cycle is gone: the spool and its transport name no client."""
    for name in ("spool.py", "transport.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        imported = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module is not None
        }
        assert "client" not in imported and "coordinator_client.client" not in imported, name


def test_poisoned_record_through_a_real_coordinator(fresh_server, tmp_path):
    srv = fresh_server
    admin = srv.client(srv.admin_token)
    token = admin.create_token("job", "pipeline", labels=["customers"])["token"]
    policy = {"label": "customers", "version": 1, "sha256": "x"}
    run = RunContext(engine="pandas", policy=policy)
    before, after = _records(run, 30), _records(run, 10)
    bad = _poison(run)
    sink = srv.client(token, spool_dir=tmp_path).audit_sink(
        min_backoff=0.01, max_backoff=0.1, poll_interval=0.05
    )
    for record in [*before[:15], bad, *before[15:]]:
        sink.emit(record)
    deadline = time.monotonic() + 60
    while sink.pending_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    for record in after:
        # One at a time, each delivered before the next (each also shows the coordinator
        # works, so a 5xx for the bad record counts against it).
        sink.emit(record)
        deadline = time.monotonic() + 30
        while sink.pending_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert sink.flush(120)
    sink.close()
    auditor = srv.client(admin.create_token("aud", "auditor")["token"])
    ids = [e["record"]["record_id"] for e in auditor.list_audit(run_id=run.run_id, limit=1000)]
    assert sorted(ids) == sorted(r["record_id"] for r in before + after)
    assert len(ids) == len(set(ids))
    (reason,) = (tmp_path / "rejected").glob("*.reason.json")
    assert '"tries": 5' in reason.read_text()
    assert auditor.verify_audit()["intact"]


def test_offline_run_sink_marks_records_and_pickles(standin, tmp_path):
    """A run on a cached policy: its sink (shipped to Beam workers too) marks each record."""
    from _standin import keyed_doc

    from cape_pipelines.source import resolve_policy

    standin.activate(keyed_doc("customers", 1), seq=1)
    Client(standin.url, "tok", public_key=standin.public_key, spool_dir=tmp_path).get_policy(
        "customers"
    )
    offline = Client(
        "http://127.0.0.1:9", "tok", public_key=standin.public_key, spool_dir=tmp_path, timeout=2
    )
    with pytest.warns(UserWarning, match="unreachable"):
        src = resolve_policy("customers", client=offline)
    assert src.source.endswith("(offline: the client's cached copy)")
    copy = pickle.loads(pickle.dumps(src.audit))
    RunContext(engine="beam", sink=copy).started()
    (spooled,) = (tmp_path / "pending").glob("*.json")
    assert '"offline":true' in spooled.read_text()
    assert src.audit.pending_count() == 1  # the wrapped SpoolSink's own methods
    src.audit.sink.close(timeout=0.1)
    offline.close()


def test_records_behind_several_failing_ones_still_arrive(standin, tmp_path):
    """Three poisoned records first in the spool (each a 500 alone, nothing accepted yet)
    must not keep the good ones behind them waiting."""
    standin.refuse = _refuse_poison(500)
    run = RunContext(engine="pandas")
    good = _records(run, 20)
    sink = SpoolSink(
        Transport(standin.url, "tok", timeout=5),
        tmp_path,
        min_backoff=0.01,
        max_backoff=0.05,
        poll_interval=0.05,
    )
    sink.close(timeout=0)  # stop its thread: the records are spooled in order first
    for record in [_poison(run), _poison(run), _poison(run), *good]:
        sink.emit(record)
    again = _sink(standin.url, tmp_path)
    deadline = time.monotonic() + 30
    while len(standin.stored) < 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    again.close(timeout=0)
    assert sorted(r["record_id"] for r in standin.stored) == sorted(r["record_id"] for r in good)
    assert again.pending_count() == 3
