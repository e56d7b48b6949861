"""The runs API, the endpoints API, the CLI table and the console show the linked job.

Through the real FastAPI app (in process, ``TestClient``), with the poller
started by the app's lifespan against a YARN stand-in on loopback.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from _orch_standin import serve, yarn_app
from fastapi.testclient import TestClient

from cape_coordinator.app import create_app
from cape_coordinator.config import Paths, Settings
from cape_coordinator.coordinator import Coordinator
from cape_pipelines.audit import MemorySink, RunContext

YARN_ID = "application_1700000000000_0007"


def _sign_in(app: Any, token: str) -> TestClient:
    t = TestClient(app, base_url="http://127.0.0.1")
    nonce = re.search(r'name="csrf" value="([^"]+)"', t.get("/ui/signin").text)
    assert nonce
    resp = t.post(
        "/ui/signin", data={"csrf": nonce.group(1), "token": token}, follow_redirects=False
    )
    assert resp.status_code == 303
    return t


def test_runs_api_console_and_endpoints_view(tmp_path: Path) -> None:
    with serve() as rm:
        rm.route("/ws/v1/cluster/apps", {"apps": {"app": [yarn_app(YARN_ID, "RUNNING")]}})
        settings = Settings(
            orchestrators=[
                {"name": "rm", "kind": "yarn", "url": rm.url, "poll_seconds": 0.2},
                {
                    "name": "down",
                    "kind": "airflow",
                    "url": "http://127.0.0.1:9",
                    "poll_seconds": 60,
                },
            ]
        )
        coord, admin = Coordinator.initialize(Paths.resolve(str(tmp_path / "c.db")), settings)
        try:
            system = coord.tokens.authenticate(admin)
            _, pipe = coord.create_token(system, name="etl", role="pipeline", labels=["customers"])
            ctx = RunContext(engine="spark", sink=MemorySink())
            ctx.set_policy("customers", 1, "ab")
            rec = ctx.record("run.started", orchestrator={"yarn": {"app_id": YARN_ID}})
            app = create_app(coord)
            api = {"Authorization": f"Bearer {admin}"}
            # The lifespan starts the poller with the app and stops it with the app.
            with TestClient(app, headers={"Authorization": f"Bearer {pipe}"}) as client:
                assert client.post("/v1/audit", json={"records": [rec]}).status_code == 200
                deadline = time.monotonic() + 30
                runs: list[dict[str, Any]] = []
                while time.monotonic() < deadline:
                    runs = client.get("/v1/runs", headers=api).json()
                    if runs and runs[0]["running_on"]:
                        break
                    time.sleep(0.2)
                assert runs[0]["running_on"] == (
                    f"running on YARN app {YARN_ID} (RUNNING, 2m 00s, 3 executors)"
                )
                assert runs[0]["orchestrator"][0]["endpoint"] == "rm"
                endpoints = {
                    e["name"]: e for e in client.get("/v1/orchestrators", headers=api).json()
                }
                assert endpoints["rm"]["last_error"] is None and endpoints["rm"]["linked"] == 1
                assert "ConnectionError" in endpoints["down"]["last_error"]
                assert "auth" not in endpoints["rm"]
                # A pipeline token may not read the endpoints.
                assert client.get("/v1/orchestrators").status_code == 403
                page = _sign_in(app, admin)
                html = page.get("/ui/runs").text
                assert f"running on YARN app {YARN_ID}" in html
                detail = page.get(f"/ui/runs/{ctx.run_id}").text
                assert f"running on YARN app {YARN_ID}" in detail and "· rm" in detail
            assert coord.orchestrators._thread is None
        finally:
            coord.close()
