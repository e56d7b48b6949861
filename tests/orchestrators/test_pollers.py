"""The coordinator's orchestrator pollers against recorded-shape stand-ins on loopback.

YARN's ResourceManager and Airflow's stable REST API are served by small local
servers (``_orch_standin.py``) answering with the documented shapes, paging and
errors; the Spark standalone master's ``/json/`` shape is checked against a
real master in ``test_spark_standalone_link.py``. Each test posts run records
as a pipeline token would, polls once, and checks the runs view and the chain.
The attacker tests try to link, and so fail, someone else's run.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from _orch_standin import airflow_dag_run, airflow_task, paged, serve, yarn_app

from cape_coordinator.config import CoordinatorSetupError, Settings
from cape_coordinator.coordinator import Coordinator
from cape_coordinator.errors import ApiError
from cape_coordinator.services.base import Principal
from cape_pipelines.audit import MemorySink, RunContext

YARN_ID = "application_1700000000000_0001"
TEAM_A = Principal("tok-a", "etl-a", "pipeline", ("customers",))
TEAM_B = Principal("tok-b", "etl-b", "pipeline", ("marketing",))


def run_started(label: str, orchestrator: dict[str, Any] | None) -> RunContext:
    ctx = RunContext(engine="spark", sink=MemorySink())
    ctx.set_policy(label, 1, "ab")
    fields = {"orchestrator": orchestrator} if orchestrator else {}
    ctx.emit("run.started", **fields)
    return ctx


def post_started(
    coord: Coordinator, who: Principal, label: str, orchestrator: dict[str, Any] | None
) -> RunContext:
    ctx = run_started(label, orchestrator)
    coord.post_audit(who, [ctx.sink.records[0]])  # type: ignore[attr-defined]
    return ctx


def run_of(coord: Coordinator, run_id: str) -> dict[str, Any]:
    rows = coord.orchestrators.attach(coord.runs.list(limit=1000))
    return next(r for r in rows if r["run_id"] == run_id)


def yarn_endpoint(url: str, **extra: Any) -> dict[str, Any]:
    return {"name": "rm", "kind": "yarn", "url": url, "grace_seconds": 0, **extra}


# ---- YARN ----------------------------------------------------------------------------------


def test_yarn_running_app_is_linked_and_shown(make_coord: Any) -> None:
    with serve() as rm:
        rm.route("/ws/v1/cluster/apps", {"apps": {"app": [yarn_app(YARN_ID, "RUNNING")]}})
        coord = make_coord(yarn_endpoint(rm.url))
        ctx = post_started(coord, TEAM_A, "customers", {"yarn": {"app_id": YARN_ID}})
        status = coord.orchestrators.poll()["rm"]
        assert status.last_error is None and status.apps == 1 and status.linked == 1
        run = run_of(coord, ctx.run_id)
        assert run["status"] == "running"
        assert run["running_on"] == f"running on YARN app {YARN_ID} (RUNNING, 2m 00s, 3 executors)"
        assert run["orchestrator"][0]["name"] == "nightly tokenize"
        # The ResourceManager was asked for recent applications only.
        assert "startedTimeBegin" in rm.requests[0][1]


def test_yarn_app_killed_before_run_completed_fails_the_run(make_coord: Any) -> None:
    with serve() as rm:
        rm.route("/ws/v1/cluster/apps", {"apps": {"app": [yarn_app(YARN_ID, "RUNNING")]}})
        coord = make_coord(yarn_endpoint(rm.url))
        ctx = post_started(coord, TEAM_A, "customers", {"yarn": {"app_id": YARN_ID}})
        coord.orchestrators.poll()
        rm.route("/ws/v1/cluster/apps", {"apps": {"app": [yarn_app(YARN_ID, "KILLED", "KILLED")]}})
        assert coord.orchestrators.poll()["rm"].failed_runs == 1
        run = run_of(coord, ctx.run_id)
        assert run["status"] == "failed"
        assert run["error_type"] == "orchestrator_app_ended"
        assert run["running_on"].startswith(f"ran on YARN app {YARN_ID} (KILLED")
        records = coord.list_audit(run_id=ctx.run_id)
        failed = [e for e in records if e["record"]["event"] == "run.failed"]
        assert len(failed) == 1 and failed[0]["kind"] == "coordinator"
        assert failed[0]["record"]["reason"] == "orchestrator_app_ended"
        assert failed[0]["record"]["orchestrator"]["app_id"] == YARN_ID
        assert failed[0]["record"]["label"] == "customers"
        assert coord.verify_audit().intact
        # Polling again changes nothing: one record, once.
        coord.orchestrators.poll()
        again = coord.list_audit(run_id=ctx.run_id)
        assert len([e for e in again if e["record"]["event"] == "run.failed"]) == 1


def test_completed_run_is_not_failed_when_its_app_ends(make_coord: Any) -> None:
    with serve() as rm:
        rm.route("/ws/v1/cluster/apps", {"apps": {"app": [yarn_app(YARN_ID, "FINISHED")]}})
        coord = make_coord(yarn_endpoint(rm.url))
        ctx = run_started("customers", {"yarn": {"app_id": YARN_ID}})
        done = ctx.record("run.completed", rows_in=1, rows_out=1, rows_redacted=0)
        coord.post_audit(TEAM_A, [ctx.sink.records[0], done])  # type: ignore[attr-defined]
        assert coord.orchestrators.poll()["rm"].failed_runs == 0
        assert run_of(coord, ctx.run_id)["status"] == "succeeded"


def test_grace_period_lets_a_late_spool_finish(make_coord: Any) -> None:
    with serve() as rm:
        rm.route("/ws/v1/cluster/apps", {"apps": {"app": [yarn_app(YARN_ID, "FINISHED")]}})
        coord = make_coord(yarn_endpoint(rm.url, grace_seconds=3600))
        ctx = post_started(coord, TEAM_A, "customers", {"yarn": {"app_id": YARN_ID}})
        assert coord.orchestrators.poll()["rm"].failed_runs == 0
        assert run_of(coord, ctx.run_id)["status"] == "running"


def test_late_run_completed_wins_over_the_coordinator_failure(make_coord: Any) -> None:
    with serve() as rm:
        rm.route("/ws/v1/cluster/apps", {"apps": {"app": [yarn_app(YARN_ID, "FINISHED")]}})
        coord = make_coord(yarn_endpoint(rm.url))
        ctx = post_started(coord, TEAM_A, "customers", {"yarn": {"app_id": YARN_ID}})
        coord.orchestrators.poll()
        assert run_of(coord, ctx.run_id)["status"] == "failed"
        late = ctx.record("run.completed", rows_in=5, rows_out=5, rows_redacted=0)
        coord.post_audit(TEAM_A, [late])
        run = run_of(coord, ctx.run_id)
        assert run["status"] == "succeeded" and run["error_type"] is None and run["rows_in"] == 5


def test_late_run_failed_names_the_pipelines_own_error(make_coord: Any) -> None:
    with serve() as rm:
        rm.route("/ws/v1/cluster/apps", {"apps": {"app": [yarn_app(YARN_ID, "FAILED", "FAILED")]}})
        coord = make_coord(yarn_endpoint(rm.url))
        ctx = post_started(coord, TEAM_A, "customers", {"yarn": {"app_id": YARN_ID}})
        coord.orchestrators.poll()
        late = ctx.record("run.failed", error={"type": "DataError", "message": "bad row"})
        coord.post_audit(TEAM_A, [late])
        run = run_of(coord, ctx.run_id)
        assert run["status"] == "failed" and run["error_type"] == "DataError"


def test_yarn_with_no_applications(make_coord: Any) -> None:
    with serve() as rm:
        rm.route("/ws/v1/cluster/apps", {"apps": None})
        coord = make_coord(yarn_endpoint(rm.url))
        status = coord.orchestrators.poll()["rm"]
        assert status.last_error is None and status.apps == 0


# ---- errors must not crash the poller ------------------------------------------------------

ERRORS = [
    # (what the endpoint does, a fragment of the recorded error)
    ("401", lambda s: s.route("/ws/v1/cluster/apps", {"error": "no"}, status=401), "HTTP 401"),
    ("500", lambda s: s.route("/ws/v1/cluster/apps", b"oops", status=500), "HTTP 500"),
    ("garbage", lambda s: s.route("/ws/v1/cluster/apps", b"\x00\xff<html>"), "not JSON"),
    ("wrong shape", lambda s: s.route("/ws/v1/cluster/apps", [1, 2, 3]), "expected"),
    (
        "bad items",
        lambda s: s.route("/ws/v1/cluster/apps", {"apps": {"app": [1, None, {"id": 5}]}}),
        None,
    ),
    ("no route", lambda s: None, "HTTP 404"),
]


@pytest.mark.parametrize("what, arrange, error", ERRORS, ids=[e[0] for e in ERRORS])
def test_endpoint_errors_are_recorded_not_raised(
    make_coord: Any, what: str, arrange: Any, error: str | None
) -> None:
    with serve() as bad, serve() as good:
        arrange(bad)
        good.route("/ws/v1/cluster/apps", {"apps": {"app": [yarn_app(YARN_ID, "RUNNING")]}})
        coord = make_coord(yarn_endpoint(bad.url, name="bad"), yarn_endpoint(good.url, name="good"))
        ctx = post_started(coord, TEAM_A, "customers", {"yarn": {"app_id": YARN_ID}})
        status = coord.orchestrators.poll()
        if error is None:
            assert status["bad"].last_error is None and status["bad"].apps == 0
        else:
            assert error in (status["bad"].last_error or "")
        # The other endpoint was polled in the same round, and the run is untouched.
        assert status["good"].last_error is None and status["good"].linked == 1
        assert run_of(coord, ctx.run_id)["status"] == "running"


def test_a_stalled_endpoint_times_out(make_coord: Any) -> None:
    with serve() as rm:
        rm.route("/ws/v1/cluster/apps", {"apps": None})
        rm.stall = 2.0
        coord = make_coord(yarn_endpoint(rm.url, timeout_seconds=0.3))
        status = coord.orchestrators.poll()["rm"]
        assert "timed out" in (status.last_error or "")


def test_credentials_come_from_the_environment_and_never_show(
    make_coord: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RM_PASSWORD", "hunter2-secret")
    with serve() as rm:
        rm.route("/ws/v1/cluster/apps", {"apps": None}, status=401)
        coord = make_coord(
            yarn_endpoint(
                rm.url,
                auth={"type": "basic", "username": "cape", "password_env": "RM_PASSWORD"},
            )
        )
        status = coord.orchestrators.poll()["rm"]
        assert rm.requests[0][2]["authorization"].startswith("Basic ")
        view = json.dumps(coord.orchestrators.endpoints_view())
        assert "hunter2" not in view and "hunter2" not in (status.last_error or "")
        assert "401" in view


@pytest.mark.parametrize(
    "endpoint, problem",
    [
        ({"name": "x", "kind": "yarn", "url": "http://u:p@rm:8088"}, "credentials"),
        ({"name": "x", "kind": "yarn", "url": "file:///etc/passwd"}, "http"),
        ({"name": "x", "kind": "mesos", "url": "http://m:5050"}, "kind"),
        ({"name": "x", "kind": "yarn", "url": "http://rm", "pasword_env": "P"}, "unknown"),
        (
            {"name": "x", "kind": "yarn", "url": "http://rm", "auth": {"type": "basic"}},
            "username and password_env",
        ),
    ],
)
def test_bad_endpoint_settings_are_refused(endpoint: dict[str, Any], problem: str) -> None:
    with pytest.raises(CoordinatorSetupError, match=problem):
        Settings.from_dict({"orchestrators": [endpoint]})


def test_a_missing_secret_is_an_error_naming_the_variable(
    make_coord: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    with serve() as rm:
        rm.route("/ws/v1/cluster/apps", {"apps": None})
        coord = make_coord(
            yarn_endpoint(rm.url, auth={"type": "bearer", "token_env": "NO_SUCH_TOKEN"})
        )
        status = coord.orchestrators.poll()["rm"]
        assert "NO_SUCH_TOKEN is not set" in (status.last_error or "")
        # Nothing was sent without the credentials.
        assert rm.requests == []


def test_endpoint_names_are_unique() -> None:
    ep = {"name": "rm", "kind": "yarn", "url": "http://rm:8088"}
    with pytest.raises(CoordinatorSetupError, match="unique"):
        Settings.from_dict({"orchestrators": [ep, ep]})


# ---- Airflow -------------------------------------------------------------------------------

DAG, DAG_RUN = "nightly_export", "scheduled__2026-11-30T00:00:00+00:00"


def airflow_identity(task: str = "tokenize", try_number: int = 1) -> dict[str, Any]:
    return {
        "airflow": {"dag_id": DAG, "run_id": DAG_RUN, "task_id": task, "try_number": try_number}
    }


def test_airflow_pages_dag_runs_and_task_instances(
    make_coord: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW_TOKEN", "tok-123")
    runs = [airflow_dag_run(f"other_{i}", f"manual__{i}", "success") for i in range(240)]
    runs.append(airflow_dag_run(DAG, DAG_RUN))
    tasks = [airflow_task(DAG, DAG_RUN, f"t{i}", "success") for i in range(130)]
    tasks.append(airflow_task(DAG, DAG_RUN, "tokenize", "running"))
    with serve() as af:
        af.routes["/api/v1/dags/~/dagRuns"] = paged("dag_runs", runs)
        # The run id holds ':' and '+': sent percent-encoded, decoded by the server.
        af.routes[f"/api/v1/dags/{DAG}/dagRuns/{DAG_RUN}/taskInstances"] = paged(
            "task_instances", tasks
        )
        coord = make_coord(
            {
                "name": "airflow",
                "kind": "airflow",
                "url": af.url,
                "grace_seconds": 0,
                "page_size": 100,
                "auth": {"type": "bearer", "token_env": "AIRFLOW_TOKEN"},
            }
        )
        ctx = post_started(coord, TEAM_A, "customers", airflow_identity())
        status = coord.orchestrators.poll()["airflow"]
        assert status.last_error is None, status.last_error
        offsets = [q.get("offset") for p, q, _ in af.requests if p.endswith("/dagRuns")]
        assert offsets == [["0"], ["100"], ["200"]]
        ti_offsets = [q.get("offset") for p, q, _ in af.requests if p.endswith("taskInstances")]
        assert ti_offsets == [["0"], ["100"]]
        assert all(h["authorization"] == "Bearer tok-123" for _, _, h in af.requests)
        assert status.apps == 131
        run = run_of(coord, ctx.run_id)
        assert run["running_on"].startswith(
            f"running on Airflow task {DAG}/{DAG_RUN}/tokenize (RUNNING"
        )
        # The task fails: the run it started without finishing fails with it.
        tasks[-1] = airflow_task(DAG, DAG_RUN, "tokenize", "failed")
        coord.orchestrators.poll()
        assert run_of(coord, ctx.run_id)["status"] == "failed"


def test_airflow_up_for_retry_is_not_an_end(make_coord: Any) -> None:
    with serve() as af:
        af.routes["/api/v1/dags/~/dagRuns"] = paged("dag_runs", [airflow_dag_run(DAG, DAG_RUN)])
        af.routes[f"/api/v1/dags/{DAG}/dagRuns/{DAG_RUN}/taskInstances"] = paged(
            "task_instances", [airflow_task(DAG, DAG_RUN, "tokenize", "up_for_retry")]
        )
        coord = make_coord({"name": "af", "kind": "airflow", "url": af.url, "grace_seconds": 0})
        ctx = post_started(coord, TEAM_A, "customers", airflow_identity())
        coord.orchestrators.poll()
        run = run_of(coord, ctx.run_id)
        assert run["status"] == "running" and run["orchestrator"][0]["state"] == "UP_FOR_RETRY"


def test_airflow_paging_is_bounded(make_coord: Any) -> None:
    # A server that claims endless entries is read for max_pages pages, no more.
    def endless(query: dict[str, list[str]], _h: dict[str, str]) -> tuple[int, Any]:
        return 200, {"dag_runs": [airflow_dag_run("d", "r")], "total_entries": 10**9}

    with serve() as af:
        af.routes["/api/v1/dags/~/dagRuns"] = endless
        coord = make_coord(
            {"name": "af", "kind": "airflow", "url": af.url, "page_size": 1, "max_pages": 7}
        )
        assert coord.orchestrators.poll()["af"].last_error is None
        assert len(af.requests) == 7


# ---- attacker's view: what links a run to an application -----------------------------------

MASTER_A = "spark://10.0.0.1:7077"
MASTER_B = "spark://10.0.0.2:7077"
SPARK_ID = "app-20261130031100-0000"


def standalone_json(master: str, apps: list[dict[str, Any]]) -> dict[str, Any]:
    active = [a for a in apps if a["state"] in ("RUNNING", "WAITING")]
    return {
        "url": master,
        "workers": [],
        "aliveworkers": 0,
        "cores": 2,
        "coresused": 1,
        "memory": 2048,
        "memoryused": 1024,
        "resources": [],
        "resourcesused": [],
        "activeapps": active,
        "completedapps": [a for a in apps if a not in active],
        "activedrivers": [],
        "completeddrivers": [],
        "status": "ALIVE",
    }


def spark_app(app_id: str, state: str) -> dict[str, Any]:
    return {
        "id": app_id,
        "starttime": 1764471660000,
        "name": "tokenize",
        "cores": 1,
        "user": "etl",
        "memoryperexecutor": 512,
        "memoryperslave": 512,
        "resourcesperexecutor": [],
        "resourcesperslave": [],
        "submitdate": "Mon Nov 30 03:11:00 UTC 2026",
        "state": state,
        "duration": 65000,
    }


def test_same_app_id_on_another_cluster_does_not_end_the_run(make_coord: Any) -> None:
    # Standalone app ids are timestamps: cluster B can hand out the id cluster A gave
    # the victim's job. B's app ending must not fail A's run.
    with serve() as a, serve() as b:
        a.route("/json/", standalone_json(MASTER_A, [spark_app(SPARK_ID, "RUNNING")]))
        b.route("/json/", standalone_json(MASTER_B, [spark_app(SPARK_ID, "KILLED")]))
        coord = make_coord(
            {"name": "a", "kind": "spark-standalone", "url": a.url, "grace_seconds": 0},
            {"name": "b", "kind": "spark-standalone", "url": b.url, "grace_seconds": 0},
        )
        victim = post_started(
            coord, TEAM_A, "customers", {"spark": {"app_id": SPARK_ID, "master": MASTER_A}}
        )
        status = coord.orchestrators.poll()
        assert status["a"].linked == 1 and status["b"].linked == 0
        run = run_of(coord, victim.run_id)
        assert run["status"] == "running"
        assert [o["endpoint"] for o in run["orchestrator"]] == ["a"]
        assert run["running_on"] == f"running on Spark app {SPARK_ID} (RUNNING, 1m 05s, 1 core)"


def test_a_crafted_claim_links_only_the_claimants_own_run(make_coord: Any) -> None:
    # Team B claims team A's application (id and master copied from a shared UI). B's run
    # may say what it likes about itself; A's run stays A's, and the endpoint that serves
    # only label `customers` links nothing of B's.
    with serve() as a:
        a.route("/json/", standalone_json(MASTER_A, [spark_app(SPARK_ID, "RUNNING")]))
        coord = make_coord(
            {
                "name": "a",
                "kind": "spark-standalone",
                "url": a.url,
                "grace_seconds": 0,
                "labels": ["customers"],
            }
        )
        ident = {"spark": {"app_id": SPARK_ID, "master": MASTER_A}}
        victim = post_started(coord, TEAM_A, "customers", ident)
        attacker = post_started(coord, TEAM_B, "marketing", ident)
        # B also tries a pattern, hoping for a LIKE match.
        wild = post_started(
            coord, TEAM_B, "marketing", {"spark": {"app_id": "app-%", "master": MASTER_A}}
        )
        coord.orchestrators.poll()
        assert run_of(coord, attacker.run_id)["orchestrator"] == []
        assert run_of(coord, wild.run_id)["orchestrator"] == []
        assert len(run_of(coord, victim.run_id)["orchestrator"]) == 1
        # B cannot re-point A's run either: its records for A's run id are refused.
        forged = run_started("marketing", {"spark": {"app_id": "app-other", "master": MASTER_A}})
        forged_rec = dict(forged.sink.records[0], run_id=victim.run_id)  # type: ignore[attr-defined]
        with pytest.raises(ApiError, match="run"):
            coord.post_audit(TEAM_B, [forged_rec])
        a.route("/json/", standalone_json(MASTER_A, [spark_app(SPARK_ID, "FINISHED")]))
        coord.orchestrators.poll()
        assert run_of(coord, victim.run_id)["status"] == "failed"
        assert run_of(coord, attacker.run_id)["status"] == "running"


def test_only_the_first_claim_of_a_run_counts(make_coord: Any) -> None:
    # A second run.started for the same run (its own sender) cannot move the run to
    # another application after it was linked.
    with serve() as rm:
        other = "application_1700000000000_0099"
        rm.route(
            "/ws/v1/cluster/apps",
            {"apps": {"app": [yarn_app(YARN_ID, "RUNNING"), yarn_app(other, "KILLED")]}},
        )
        coord = make_coord(yarn_endpoint(rm.url))
        ctx = post_started(coord, TEAM_A, "customers", {"yarn": {"app_id": YARN_ID}})
        again = ctx.record("run.started", orchestrator={"yarn": {"app_id": other}})
        coord.post_audit(TEAM_A, [again])
        coord.orchestrators.poll()
        run = run_of(coord, ctx.run_id)
        assert run["status"] == "running"
        assert [o["app_id"] for o in run["orchestrator"]] == [YARN_ID]


def test_malformed_identity_never_costs_the_record(make_coord: Any) -> None:
    coord = make_coord()
    for ident in ({"spark": "x"}, {"yarn": {"app_id": 5}}, {"airflow": {"dag_id": "d"}}, [1]):
        ctx = run_started("customers", None)
        rec = dict(ctx.sink.records[0], orchestrator=ident)  # type: ignore[attr-defined]
        assert coord.post_audit(TEAM_A, [rec])["accepted"] == 1


def test_polls_and_ingest_interleave_without_errors(make_coord: Any) -> None:
    # The poller's writes wait their turn behind ingest's (and the reverse): neither
    # side fails because the other committed in between.
    import threading

    with serve() as rm:
        ids = [f"application_1700000000000_{i:04d}" for i in range(200)]
        rm.route("/ws/v1/cluster/apps", {"apps": {"app": [yarn_app(i, "RUNNING") for i in ids]}})
        coord = make_coord(yarn_endpoint(rm.url))
        errors: list[BaseException] = []

        def post() -> None:
            try:
                for app_id in ids:
                    post_started(coord, TEAM_A, "customers", {"yarn": {"app_id": app_id}})
            except BaseException as exc:
                errors.append(exc)

        poster = threading.Thread(target=post)
        poster.start()
        polls = []
        while poster.is_alive():
            polls.append(coord.orchestrators.poll()["rm"].last_error)
        poster.join()
        final = coord.orchestrators.poll()["rm"]
        assert errors == [] and all(e is None for e in polls) and final.last_error is None
        assert final.linked == 200


def test_a_claim_cannot_steer_the_pollers_requests(make_coord: Any) -> None:
    # Task instances are fetched only for DAG runs the Airflow server itself listed, so a
    # crafted claim cannot make the coordinator request a path of the attacker's choosing.
    with serve() as af:
        af.routes["/api/v1/dags/~/dagRuns"] = paged("dag_runs", [airflow_dag_run(DAG, DAG_RUN)])
        coord = make_coord({"name": "af", "kind": "airflow", "url": af.url})
        crafted = {"airflow": {"dag_id": "..", "run_id": "../variables/secret", "task_id": "x"}}
        post_started(coord, TEAM_B, "marketing", crafted)
        assert coord.orchestrators.poll()["af"].last_error is None
        assert [p for p, _, _ in af.requests] == ["/api/v1/dags/~/dagRuns"]
