"""A small HTTP server on loopback that answers like an orchestrator's REST API.

Routes map a path to a handler returning (status, JSON-able body or raw bytes);
the server records each request (path and query) so tests can check paging,
and can be told to stall (a timeout) or to answer garbage. The shapes the
tests serve are written from the public API documentation of YARN's
ResourceManager REST API and Airflow's stable REST API.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

Handler = Callable[[dict[str, list[str]], dict[str, str]], tuple[int, Any]]


class StandIn:
    """Routes, a request log and a stall switch, behind one ThreadingHTTPServer."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.requests: list[tuple[str, dict[str, list[str]], dict[str, str]]] = []
        self.stall = 0.0
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def route(self, path: str, body: Any, status: int = 200) -> None:
        """Answer ``path`` with ``body`` (JSON unless bytes) and ``status``, always."""
        self.routes[path] = lambda _q, _h: (status, body)


@contextmanager
def serve() -> Iterator[StandIn]:
    stand = StandIn()

    class Handle(BaseHTTPRequestHandler):
        def log_message(self, *_args: Any) -> None:
            return None

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            headers = {k.lower(): v for k, v in self.headers.items()}
            # Routes are decoded paths (a real server decodes %3A and %2B in run ids too).
            path = unquote(parts.path)
            stand.requests.append((path, query, headers))
            if stand.stall:
                time.sleep(stand.stall)
            handler = stand.routes.get(path)
            status, body = handler(query, headers) if handler else (404, {"error": "no route"})
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)
            except OSError:
                return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handle)
    server.daemon_threads = True
    stand.server = server
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stand
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# ---- recorded shapes ---------------------------------------------------------------------


def yarn_app(app_id: str, state: str, final: str = "UNDEFINED", **extra: Any) -> dict[str, Any]:
    """One application as ``GET /ws/v1/cluster/apps`` lists it (ResourceManager REST API)."""
    ended = state in ("FINISHED", "FAILED", "KILLED")
    app = {
        "id": app_id,
        "user": "etl",
        "name": "nightly tokenize",
        "queue": "default",
        "state": state,
        "finalStatus": final,
        "progress": 100.0 if ended else 42.0,
        "trackingUI": "History" if ended else "ApplicationMaster",
        "trackingUrl": f"http://rm:8088/proxy/{app_id}/",
        "diagnostics": "",
        "clusterId": 1700000000000,
        "applicationType": "SPARK",
        "applicationTags": "",
        "priority": 0,
        "startedTime": 1764471600000,
        "launchTime": 1764471601000,
        "finishedTime": 1764471900000 if ended else 0,
        "elapsedTime": 300000 if ended else 120000,
        "amContainerLogs": "http://nm:8042/node/containerlogs/x/etl",
        "amHostHttpAddress": "nm:8042",
        "allocatedMB": -1 if ended else 4096,
        "allocatedVCores": -1 if ended else 3,
        "runningContainers": -1 if ended else 3,
        "memorySeconds": 151234,
        "vcoreSeconds": 910,
        "queueUsagePercentage": 0.0,
        "clusterUsagePercentage": 0.0,
        "preemptedResourceMB": 0,
        "preemptedResourceVCores": 0,
        "numNonAMContainerPreempted": 0,
        "numAMContainerPreempted": 0,
        "logAggregationStatus": "DISABLED",
        "unmanagedApplication": False,
        "amNodeLabelExpression": "",
    }
    app.update(extra)
    return app


def airflow_dag_run(dag_id: str, run_id: str, state: str = "running") -> dict[str, Any]:
    """One DAG run as ``GET /api/v1/dags/~/dagRuns`` lists it (Airflow stable REST API)."""
    return {
        "dag_id": dag_id,
        "dag_run_id": run_id,
        "logical_date": "2026-11-30T00:00:00+00:00",
        "execution_date": "2026-11-30T00:00:00+00:00",
        "start_date": "2026-11-30T00:00:05.123456+00:00",
        "end_date": None if state in ("queued", "running") else "2026-11-30T00:09:00+00:00",
        "data_interval_start": "2026-11-29T00:00:00+00:00",
        "data_interval_end": "2026-11-30T00:00:00+00:00",
        "last_scheduling_decision": None,
        "run_type": "scheduled",
        "state": state,
        "external_trigger": False,
        "conf": {},
        "note": None,
    }


def airflow_task(
    dag_id: str, run_id: str, task_id: str, state: str | None, try_number: int = 1
) -> dict[str, Any]:
    """One task instance as ``.../dagRuns/{run}/taskInstances`` lists it."""
    done = state in ("success", "failed", "upstream_failed", "skipped", "removed")
    return {
        "task_id": task_id,
        "dag_id": dag_id,
        "dag_run_id": run_id,
        "execution_date": "2026-11-30T00:00:00+00:00",
        "start_date": "2026-11-30T00:00:06+00:00" if state else None,
        "end_date": "2026-11-30T00:01:06+00:00" if done else None,
        "duration": 60.0 if done else None,
        "state": state,
        "try_number": try_number,
        "map_index": -1,
        "max_tries": 2,
        "hostname": "worker-1",
        "unixname": "airflow",
        "pool": "default_pool",
        "pool_slots": 1,
        "queue": "default",
        "priority_weight": 1,
        "operator": "CapeApplyOperator",
        "queued_when": None,
        "pid": 4242,
        "executor_config": "{}",
        "sla_miss": None,
        "rendered_fields": {},
        "trigger": None,
        "triggerer_job": None,
        "note": None,
    }


def paged(key: str, items: list[dict[str, Any]]) -> Handler:
    """An Airflow collection answered page by page (``limit``/``offset``, ``total_entries``)."""

    def handle(query: dict[str, list[str]], _headers: dict[str, str]) -> tuple[int, Any]:
        limit = int(query.get("limit", ["100"])[0])
        offset = int(query.get("offset", ["0"])[0])
        return 200, {key: items[offset : offset + limit], "total_entries": len(items)}

    return handle
