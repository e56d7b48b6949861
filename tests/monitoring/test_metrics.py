"""``GET /metrics``: scraped after real ingests through the API and parsed with
prometheus_client's own parser; tried as an attacker would (no token, wrong token,
an API token, another scheme); the chain-head check seen failing on a truncated
chain; two coordinators on one database report the same database figures; the
collector hook and the separate bind address.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete, update

from cape_coordinator import db
from cape_coordinator.app import create_app
from cape_coordinator.config import Paths, Settings
from cape_coordinator.coordinator import Coordinator
from cape_coordinator.metrics import (
    METRICS_TOKEN_ENV,
    register_collector,
    serve_metrics,
    unregister_collector,
)
from cape_coordinator.services.base import Principal

ADMIN = Principal("-", "root", "admin")
METRICS_TOKEN = "m-" + "7" * 40
TOKEN_SHA = hashlib.sha256(METRICS_TOKEN.encode()).hexdigest()


class Env:
    def __init__(self, tmp_path: Path, url: str | None = None, **settings: Any):
        self.paths = (
            Paths.resolve(str(tmp_path / "c.db"))
            if url is None
            else Paths.resolve(url, str(tmp_path / "c.key"), str(tmp_path / "c.json"))
        )
        self.coord, self.admin = Coordinator.initialize(self.paths, Settings(**settings))
        self.http = TestClient(create_app(self.coord))
        self.pipeline = self.coord.tokens.create(
            ADMIN, name="job", role="pipeline", labels=["orders", "customers"]
        )[1]

    def post(self, *records: dict[str, Any]) -> Any:
        return self.http.post(
            "/v1/audit",
            json={"records": list(records)},
            headers={"Authorization": f"Bearer {self.pipeline}"},
        )

    def scrape(self, token: str = METRICS_TOKEN) -> dict[str, dict[tuple[Any, ...], float]]:
        resp = self.http.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("text/plain")
        return parse(resp.text)

    def close(self) -> None:
        self.http.close()
        self.coord.close()


def parse(text: str) -> dict[str, dict[tuple[Any, ...], float]]:
    """sample name -> {sorted label items: value}, via prometheus_client's parser."""
    out: dict[str, dict[tuple[Any, ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def rec(run_id: str, event: str, label: str = "orders", **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "record_id": str(uuid.uuid4()),
        "run_id": run_id,
        "event": event,
        "time": "2026-01-01T00:00:00.000000Z",
        "engine": "pandas",
        "policy": {"label": label, "version": 1, "sha256": "ab"},
    }
    out.update(kw)
    return out


def key(**labels: str) -> tuple[Any, ...]:
    return tuple(sorted(labels.items()))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path, metrics_token_sha256=TOKEN_SHA)
    try:
        yield e
    finally:
        e.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    """``env`` on SQLite and on PostgreSQL (the database figures are queries)."""
    url = None
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_cluster").new_database("metrics")
    e = Env(tmp_path, url, metrics_token_sha256=TOKEN_SHA)
    try:
        yield e
    finally:
        e.close()


def _ingest_story(env: Env) -> int:
    """Four runs of label orders (succeeded, failed, running, lost) and one of customers on
    spark; returns the number of records posted."""
    batches = [
        [
            rec("r-ok", "run.started"),
            rec("r-ok", "run.completed", rows_in=10, rows_out=10, rows_redacted=3),
        ],
        [rec("r-bad", "run.started"), rec("r-bad", "run.failed", error={"type": "ValueError"})],
        [rec("r-run", "run.started")],
        [rec("r-lost", "run.started")],
        [
            rec("r-spark", "run.started", label="customers", engine="spark"),
            rec(
                "r-spark",
                "run.completed",
                label="customers",
                engine="spark",
                rows_in=7,
                rows_out=7,
                rows_redacted=0,
            ),
        ],
    ]
    for batch in batches:
        resp = env.post(*batch)
        assert resp.status_code == 200, resp.text
    # r-lost fell silent long ago.
    with env.coord.engine.begin() as conn:
        conn.execute(
            update(db.runs)
            .where(db.runs.c.run_id == "r-lost")
            .values(last_seen="2020-01-01T00:00:00.000000Z")
        )
    return sum(len(b) for b in batches)


def test_scrape_after_real_ingests(any_env: Env) -> None:
    env = any_env
    posted = _ingest_story(env)
    # A refused batch (label the token does not hold) is counted, not ingested.
    assert env.post(rec("r-x", "run.started", label="payroll")).status_code == 403
    m = env.scrape()
    runs = m["cape_runs"]
    for status, n in (("succeeded", 1), ("failed", 1), ("running", 1), ("lost", 1)):
        assert runs[key(engine="pandas", label="orders", status=status)] == n
    assert runs[key(engine="spark", label="customers", status="succeeded")] == 1
    assert runs[key(engine="spark", label="customers", status="lost")] == 0
    assert m["cape_rows_processed_total"][key(engine="pandas", label="orders")] == 10
    assert m["cape_rows_redacted_total"][key(engine="pandas", label="orders")] == 3
    assert m["cape_rows_processed_total"][key(engine="spark", label="customers")] == 7
    assert m["cape_rows_written_total"][key(engine="spark", label="customers")] == 7
    assert m["cape_audit_chain_length"][()] == env.coord.audit_count()
    assert m["cape_audit_chain_head_ok"][()] == 1
    assert m["cape_audit_records_ingested_total"][()] == posted
    assert m["cape_audit_ingest_seconds_count"][()] == 5
    assert m["cape_audit_ingest_seconds_sum"][()] > 0
    assert m["cape_audit_batches_refused_total"][key(code="label_not_allowed")] == 1
    # The full verification is reported once one has run in this process.
    assert "cape_audit_chain_verify_ok" not in m
    resp = env.http.get("/v1/audit/verify", headers={"Authorization": f"Bearer {env.admin}"})
    assert resp.status_code == 200 and resp.json()["intact"]
    assert env.scrape()["cape_audit_chain_verify_ok"][()] == 1


def test_a_late_record_takes_a_run_out_of_lost(env: Env) -> None:
    _ingest_story(env)
    assert env.scrape()["cape_runs"][key(engine="pandas", label="orders", status="lost")] == 1
    assert env.post(rec("r-lost", "run.completed", rows_in=1)).status_code == 200
    runs = env.scrape()["cape_runs"]
    assert runs[key(engine="pandas", label="orders", status="lost")] == 0
    assert runs[key(engine="pandas", label="orders", status="succeeded")] == 2


def test_the_chain_head_check_sees_a_truncated_chain(any_env: Env) -> None:
    env = any_env
    _ingest_story(env)
    last = env.coord.audit_count()
    with env.coord.engine.begin() as conn:
        conn.execute(delete(db.audit).where(db.audit.c.seq == last))
    m = env.scrape()
    assert m["cape_audit_chain_head_ok"][()] == 0
    resp = env.http.get("/v1/audit/verify", headers={"Authorization": f"Bearer {env.admin}"})
    assert resp.json()["intact"] is False
    assert env.scrape()["cape_audit_chain_verify_ok"][()] == 0


def test_the_chain_head_check_sees_a_forged_anchor(env: Env) -> None:
    _ingest_story(env)
    with env.coord.engine.begin() as conn:
        conn.execute(
            update(db.settings)
            .where(db.settings.c.name == "audit_anchor")
            .values(value='{"count": 1, "hash": "' + "0" * 64 + '", "signature": "AAAA"}')
        )
    assert env.scrape()["cape_audit_chain_head_ok"][()] == 0


def test_an_unprotected_scrape_is_refused_as_an_attacker_tries(env: Env) -> None:
    _ingest_story(env)
    attempts: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {env.admin}"},  # an API token is not the metrics token
        {"Authorization": f"Bearer {env.pipeline}"},
        {"Authorization": f"Basic {METRICS_TOKEN}"},
        {"Authorization": METRICS_TOKEN},
        {"Authorization": f"Bearer {METRICS_TOKEN[:-1]}"},
        {"Authorization": f"Bearer {METRICS_TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN_SHA}"},  # the stored hash is not the token
        {"X-Metrics-Token": METRICS_TOKEN},
    ]
    for headers in attempts:
        resp = env.http.get("/metrics", headers=headers)
        assert resp.status_code == 401, headers
        assert "cape_" not in resp.text
        assert resp.headers["www-authenticate"] == "Bearer"
    # Other methods do not reach it either.
    resp = env.http.post("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert resp.status_code == 405
    # The scheme is case-insensitive, as HTTP says.
    resp = env.http.get("/metrics", headers={"Authorization": f"bearer {METRICS_TOKEN}"})
    assert resp.status_code == 200


def test_metrics_are_off_unless_protected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(METRICS_TOKEN_ENV, raising=False)
    e = Env(tmp_path)
    try:
        assert e.http.get("/metrics").status_code == 404
        resp = e.http.get("/metrics", headers={"Authorization": f"Bearer {e.admin}"})
        assert resp.status_code == 404
        # The token may come from the environment instead of the config file.
        monkeypatch.setenv(METRICS_TOKEN_ENV, METRICS_TOKEN)
        assert e.http.get("/metrics").status_code == 401
        assert e.scrape()["cape_audit_chain_head_ok"][()] == 1
    finally:
        e.close()


def test_with_a_bind_address_the_api_port_does_not_serve_metrics(tmp_path: Path) -> None:
    e = Env(tmp_path, metrics_token_sha256=TOKEN_SHA, metrics_bind="127.0.0.1:9")
    try:
        resp = e.http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert resp.status_code == 404
    finally:
        e.close()


def test_bad_metric_settings_are_refused() -> None:
    from cape_coordinator.crypto import CoordinatorSetupError

    with pytest.raises(CoordinatorSetupError, match="metrics_token_sha256"):
        Settings.from_dict({"metrics_token_sha256": "not-a-hash"})
    with pytest.raises(CoordinatorSetupError, match="metrics_bind"):
        Settings.from_dict({"metrics_bind": "0.0.0.0"})


def test_two_coordinators_on_one_database_report_the_same_figures(any_env: Env) -> None:
    env = any_env
    _ingest_story(env)
    other = Coordinator.open(env.paths, Settings(metrics_token_sha256=TOKEN_SHA))
    try:
        with TestClient(create_app(other)) as http:
            resp = http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
            theirs = parse(resp.text)
        ours = env.scrape()
        for name in (
            "cape_runs",
            "cape_rows_processed_total",
            "cape_rows_redacted_total",
            "cape_audit_chain_length",
            "cape_audit_chain_head_ok",
        ):
            assert theirs[name] == ours[name], name
        # Per-process figures are the process's own: the other one ingested nothing.
        assert theirs["cape_audit_records_ingested_total"][()] == 0
    finally:
        other.close()


def test_registered_collectors_appear_and_a_failing_one_does_not_break_the_scrape(
    env: Env,
) -> None:
    def pending(coord: Coordinator) -> Iterator[Metric]:
        g = GaugeMetricFamily("cape_test_pending", "test", labels=["sink"])
        g.add_metric(["webhook"], 4)
        yield g

    def broken(coord: Coordinator) -> list[Metric]:
        raise RuntimeError("secret detail")

    register_collector(pending)
    register_collector(pending)  # once only
    register_collector(broken)
    try:
        text = env.http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
        assert text.count("# TYPE cape_test_pending gauge") == 1
        m = parse(text)
        assert m["cape_test_pending"][key(sink="webhook")] == 4
        errors = m["cape_metrics_collector_errors_total"]
        assert [v for k, v in errors.items() if "broken" in dict(k)["collector"]] == [1]
        assert m["cape_audit_chain_head_ok"][()] == 1
    finally:
        unregister_collector(pending)
        unregister_collector(broken)
    assert "cape_test_pending" not in env.scrape()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_separate_listener_serves_metrics_alone(env: Env) -> None:
    _ingest_story(env)
    port = _free_port()
    server, thread = serve_metrics(
        env.http.app.state.metrics,  # type: ignore[attr-defined]
        f"127.0.0.1:{port}",
        hashlib.sha256(METRICS_TOKEN.encode()).digest(),
    )
    try:

        def get(path: str, token: str | None) -> tuple[int, str]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read().decode()
            conn.close()
            return resp.status, body

        assert get("/metrics", None)[0] == 401
        assert get("/metrics", env.admin)[0] == 401
        assert get("/v1/whoami", env.admin)[0] == 404
        status, body = get("/metrics", METRICS_TOKEN)
        assert status == 200
        assert parse(body)["cape_runs"][key(engine="pandas", label="orders", status="lost")] == 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.mark.coordinator
def test_serve_with_a_metrics_bind_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cape coordinator serve --metrics-bind``: /metrics on its own port (with the token
    from the environment), not on the API's; the listener ends with the server."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "coordinator"))
    from _coord_support import Server

    metrics_port = _free_port()
    monkeypatch.setenv(METRICS_TOKEN_ENV, METRICS_TOKEN)
    srv = Server(tmp_path / "c", "--metrics-bind", f"127.0.0.1:{metrics_port}")
    srv.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=10)
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        resp = conn.getresponse()
        body = resp.read().decode()
        conn.close()
        assert resp.status == 200
        assert parse(body)["cape_audit_chain_head_ok"][()] == 1
        conn = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=10)
        conn.request("GET", "/metrics")
        assert conn.getresponse().status == 401
        conn.close()
        api = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        api.request("GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert api.getresponse().status == 404
        api.close()
    finally:
        srv.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", metrics_port), timeout=2).close()


@pytest.mark.coordinator
def test_serve_refuses_a_metrics_address_it_cannot_bind(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "coordinator"))
    from _coord_support import run_cli

    db = str(tmp_path / "c.db")
    run_cli("coordinator", "init", "--db", db)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_cli(
            "coordinator",
            "serve",
            "--db",
            db,
            "--port",
            str(_free_port()),
            "--metrics-bind",
            f"127.0.0.1:{port}",
            check=False,
        )
    assert done.returncode != 0
    assert f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
