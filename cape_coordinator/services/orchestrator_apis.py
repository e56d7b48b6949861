"""Reading the orchestrators: what Spark, YARN and Airflow say about their applications.

The coordinator polls the orchestrators an operator configured (``orchestrators``
in the settings; one :class:`Endpoint` each): a Spark standalone master
(``/json/``), a Spark driver or history server (``/api/v1/applications``), a
YARN ResourceManager (``/ws/v1/cluster/apps``), Airflow's stable REST API (DAG
runs, then task instances). This module does the reading: :class:`Http` GETs
JSON from one endpoint and each ``poll_*`` function turns an orchestrator's
answer into :class:`App` records in the coordinator's terms. It touches no
table; storing what was read, linking runs to it and failing runs whose
application ended is the service's work (:mod:`.orchestrators`), kept apart so
the parsing of untrusted orchestrator answers can be read and tested on its own.

Every read is bounded (timeouts per request and per response, response size,
applications and detail calls per poll), so a misbehaving endpoint cannot
exhaust the coordinator. An unreachable endpoint, a 401, garbage or a timeout
is a :class:`PollError` naming the path and what went wrong (never the
endpoint's secret, which is read from the environment at every poll); the
service records it as that endpoint's last error and never lets it stop the
others.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import requests
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .. import db
from .base import NAME_RE

KINDS = ("spark-standalone", "spark-driver", "yarn", "airflow")
ENDED_STATES = {
    "FINISHED",
    "FAILED",
    "KILLED",
    # Airflow task instance states that never run again.
    "SUCCESS",
    "UPSTREAM_FAILED",
    "SKIPPED",
    "REMOVED",
}
# Bounds on what one poll reads: a misbehaving endpoint cannot exhaust the coordinator.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
MAX_APPS = 5000
MAX_DETAIL_CALLS = 50


class Auth(BaseModel):
    """How the poller authenticates: the secret is read from an environment variable named
    here, so the config file never holds it."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["none", "basic", "bearer"] = "none"
    username: str | None = Field(default=None, max_length=256)
    password_env: str | None = Field(default=None, max_length=128)
    token_env: str | None = Field(default=None, max_length=128)

    @model_validator(mode="after")
    def _complete(self) -> Auth:
        if self.type == "basic" and not (self.username and self.password_env):
            raise ValueError("basic auth needs username and password_env")
        if self.type == "bearer" and not self.token_env:
            raise ValueError("bearer auth needs token_env")
        return self


class Endpoint(BaseModel):
    """One orchestrator the coordinator polls (an item of the ``orchestrators`` setting)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=128)
    kind: Literal["spark-standalone", "spark-driver", "yarn", "airflow"]
    url: str = Field(max_length=1024)
    poll_seconds: float = Field(default=30.0, ge=0.1, le=86400)
    timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    # After an application is first seen ended, how long its run may still report.
    grace_seconds: float = Field(default=30.0, ge=0, le=86400)
    # Runs of these labels only may be linked to this endpoint's applications ([]: any).
    labels: list[str] = Field(default_factory=list)
    auth: Auth = Field(default_factory=Auth)
    verify_tls: bool = True
    ca_file: str | None = None
    # YARN and Airflow: how far back applications (DAG runs) are listed.
    lookback_hours: float = Field(default=24.0, gt=0, le=24 * 366)
    page_size: int = Field(default=100, ge=1, le=1000)
    max_pages: int = Field(default=20, ge=1, le=1000)
    # Airflow: /api/v1 (Airflow 2's stable API) or /api/v2 (Airflow 3).
    api_path: str = Field(default="/api/v1", pattern=r"/[A-Za-z0-9/_-]*")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.fullmatch(value):
            raise ValueError("name: letters, digits, '.', '_' and '-'")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be http(s)://host[:port][/path]")
        if parts.username or parts.password:
            raise ValueError("put credentials in auth (from the environment), not in the url")
        return value.rstrip("/")


@dataclass
class App:
    """One application as an orchestrator reports it, in the coordinator's terms."""

    app_id: str
    state: str
    ended: bool
    name: str | None = None
    cluster: str | None = None
    final_status: str | None = None
    user: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    duration_ms: int | None = None
    executors: int | None = None
    cores: int | None = None
    try_number: int | None = None


class PollError(Exception):
    """An endpoint could not be read: the message names the endpoint and what went wrong."""


class Http:
    """GETs JSON from one endpoint: bounded time and size, auth from the environment."""

    def __init__(self, endpoint: Endpoint, session: requests.Session | None = None):
        self.endpoint = endpoint
        self.session = session or requests.Session()
        auth = endpoint.auth
        # Read at every poll, so a rotated secret is picked up without a restart.
        if auth.type == "basic":
            self.session.auth = (auth.username or "", self._secret(auth.password_env))
        elif auth.type == "bearer":
            self.session.headers["Authorization"] = f"Bearer {self._secret(auth.token_env)}"
        self.session.headers["Accept"] = "application/json"

    @staticmethod
    def _secret(var: str | None) -> str:
        value = os.environ.get(var or "", "")
        if not value:
            raise PollError(f"auth: environment variable {var} is not set")
        return value

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """The JSON at ``path``; a :class:`PollError` for anything else (never the secret)."""
        ep = self.endpoint
        url = ep.url + path
        verify: bool | str = ep.ca_file if ep.ca_file else ep.verify_tls
        deadline = time.monotonic() + 3 * ep.timeout_seconds
        try:
            with self.session.get(
                url,
                params=dict(params or {}),
                timeout=(ep.timeout_seconds, ep.timeout_seconds),
                verify=verify,
                stream=True,
                allow_redirects=False,
            ) as resp:
                if resp.status_code in (401, 403):
                    raise PollError(f"{path}: HTTP {resp.status_code} (check the endpoint's auth)")
                if resp.status_code != 200:
                    raise PollError(f"{path}: HTTP {resp.status_code}")
                body = bytearray()
                for chunk in resp.iter_content(65536):
                    body.extend(chunk)
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise PollError(f"{path}: response over {MAX_RESPONSE_BYTES} bytes")
                    if time.monotonic() > deadline:
                        raise PollError(f"{path}: response took over {3 * ep.timeout_seconds}s")
        except requests.Timeout:
            raise PollError(f"{path}: timed out after {ep.timeout_seconds}s") from None
        except requests.RequestException as exc:
            raise PollError(f"{path}: {type(exc).__name__}") from None
        try:
            return json.loads(bytes(body))
        except ValueError:
            raise PollError(f"{path}: response is not JSON") from None


def _text(value: Any, limit: int = 256) -> str | None:
    return value[:limit] if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _ms_time(value: Any) -> str | None:
    """A stored time from epoch milliseconds (0 or absent: not yet)."""
    ms = _int(value)
    if not ms or ms <= 0:
        return None
    try:
        return db.format_time(datetime.fromtimestamp(ms / 1000, UTC))
    except (OverflowError, OSError, ValueError):
        return None


def _iso_time(value: Any) -> str | None:
    """A stored time from ISO 8601 text (Spark's driver API writes ``...GMT``)."""
    if not isinstance(value, str) or not value:
        return None
    text_value = value.removesuffix("GMT").strip()
    try:
        return db.format_time(db.parse_time(text_value))
    except ValueError:
        return None


def _items(data: Any, where: str) -> list[Mapping[str, Any]]:
    if not isinstance(data, list):
        raise PollError(f"{where}: expected a list")
    return [item for item in data if isinstance(item, Mapping)]


def poll_spark_standalone(http: Http) -> list[App]:
    """A standalone master's ``/json/``: its active and completed applications."""
    data = http.get("/json/")
    if not isinstance(data, Mapping) or not isinstance(data.get("url"), str):
        raise PollError("/json/: not a Spark standalone master's status")
    cluster = _text(data["url"])
    out = []
    for key in ("activeapps", "completedapps"):
        for item in _items(data.get(key, []), f"/json/ {key}"):
            app_id, state = _text(item.get("id")), _text(item.get("state"), 32)
            if app_id is None or state is None:
                continue
            state = state.upper()
            ended = state in ENDED_STATES
            out.append(
                App(
                    app_id=app_id,
                    state=state,
                    ended=ended,
                    name=_text(item.get("name")),
                    cluster=cluster,
                    user=_text(item.get("user"), 128),
                    started_at=_ms_time(item.get("starttime")),
                    duration_ms=_int(item.get("duration")),
                    cores=_int(item.get("cores")),
                )
            )
    return out


def poll_spark_driver(http: Http) -> list[App]:
    """A driver's (or history server's) ``/api/v1/applications``, with the executors and
    master of the running ones."""
    out = []
    details = 0
    for item in _items(http.get("/api/v1/applications"), "/api/v1/applications"):
        app_id = _text(item.get("id"))
        attempts = item.get("attempts")
        if app_id is None or not isinstance(attempts, list) or not attempts:
            continue
        last = attempts[-1] if isinstance(attempts[-1], Mapping) else {}
        completed = last.get("completed") is True
        app = App(
            app_id=app_id,
            state="FINISHED" if completed else "RUNNING",
            ended=completed,
            name=_text(item.get("name")),
            user=_text(last.get("sparkUser"), 128),
            started_at=_iso_time(last.get("startTime")),
            ended_at=_iso_time(last.get("endTime")) if completed else None,
            duration_ms=_int(last.get("duration")) if completed else None,
        )
        if not completed and details < MAX_DETAIL_CALLS:
            details += 2
            base = f"/api/v1/applications/{quote(app_id, safe='')}"
            executors = _items(http.get(f"{base}/executors"), f"{base}/executors")
            app.executors = sum(
                1 for e in executors if e.get("id") != "driver" and e.get("isActive", True)
            )
            env = http.get(f"{base}/environment")
            props = env.get("sparkProperties") if isinstance(env, Mapping) else None
            for pair in props if isinstance(props, list) else []:
                if isinstance(pair, list) and len(pair) == 2 and pair[0] == "spark.master":
                    app.cluster = _text(pair[1])
        out.append(app)
    return out


def poll_yarn(http: Http) -> list[App]:
    """A ResourceManager's ``/ws/v1/cluster/apps`` started within the lookback."""
    since = datetime.now(UTC) - timedelta(hours=http.endpoint.lookback_hours)
    data = http.get("/ws/v1/cluster/apps", {"startedTimeBegin": int(since.timestamp() * 1000)})
    if not isinstance(data, Mapping) or "apps" not in data:
        raise PollError('/ws/v1/cluster/apps: expected {"apps": ...}')
    holder = data["apps"]
    # YARN answers {"apps": null} when there are none.
    listed = holder.get("app", []) if isinstance(holder, Mapping) else []
    out = []
    for item in _items(listed or [], "/ws/v1/cluster/apps"):
        app_id, state = _text(item.get("id")), _text(item.get("state"), 32)
        if app_id is None or state is None:
            continue
        state = state.upper()
        out.append(
            App(
                app_id=app_id,
                state=state,
                ended=state in ENDED_STATES,
                name=_text(item.get("name")),
                final_status=_text(item.get("finalStatus"), 32),
                user=_text(item.get("user"), 128),
                started_at=_ms_time(item.get("startedTime")),
                ended_at=_ms_time(item.get("finishedTime")),
                duration_ms=_int(item.get("elapsedTime")),
                executors=_int(item.get("runningContainers")),
            )
        )
    return out


def _paged(http: Http, path: str, key: str, params: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Every item of an Airflow collection (``limit``/``offset`` pages, ``total_entries``)."""
    ep = http.endpoint
    out: list[Mapping[str, Any]] = []
    for page in range(ep.max_pages):
        data = http.get(path, {**params, "limit": ep.page_size, "offset": page * ep.page_size})
        if not isinstance(data, Mapping) or not isinstance(data.get(key), list):
            raise PollError(f"{path}: expected {{{key!r}: [...], 'total_entries': N}}")
        batch = _items(data[key], path)
        out.extend(batch)
        total = _int(data.get("total_entries"))
        if not data[key] or (total is not None and len(out) >= total):
            break
    return out


def airflow_app_id(dag_id: str, run_id: str, task_id: str, map_index: int | None = None) -> str:
    """The id a task instance has here: ``dag/run/task`` (``[i]`` for a mapped one)."""
    base = f"{dag_id}/{run_id}/{task_id}"
    return f"{base}[{map_index}]" if map_index is not None and map_index >= 0 else base


def poll_airflow(http: Http, wanted: Iterable[tuple[str, str]]) -> list[App]:
    """Airflow's DAG runs started within the lookback, and the task instances of those
    that running Cape runs claim (``wanted``: (dag_id, run_id) pairs)."""
    api = http.endpoint.api_path.rstrip("/")
    since = datetime.now(UTC) - timedelta(hours=http.endpoint.lookback_hours)
    runs = _paged(
        http,
        f"{api}/dags/~/dagRuns",
        "dag_runs",
        {"start_date_gte": since.isoformat(), "order_by": "-start_date"},
    )
    known = {
        (r["dag_id"], r["dag_run_id"])
        for r in runs
        if isinstance(r.get("dag_id"), str) and isinstance(r.get("dag_run_id"), str)
    }
    out = []
    for dag_id, run_id in sorted(set(wanted) & known)[:MAX_DETAIL_CALLS]:
        path = f"{api}/dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}/taskInstances"
        for ti in _paged(http, path, "task_instances", {}):
            task_id, state = _text(ti.get("task_id")), ti.get("state")
            if task_id is None:
                continue
            # A task instance not yet scheduled has state null.
            upper = (state if isinstance(state, str) and state else "none").upper()[:32]
            duration = ti.get("duration")
            out.append(
                App(
                    app_id=airflow_app_id(dag_id, run_id, task_id, _int(ti.get("map_index"))),
                    state=upper,
                    ended=upper in ENDED_STATES,
                    name=_text(f"{dag_id}.{task_id}"),
                    final_status=upper if upper in ENDED_STATES else None,
                    started_at=_iso_time(ti.get("start_date")),
                    ended_at=_iso_time(ti.get("end_date")),
                    duration_ms=int(duration * 1000)
                    if isinstance(duration, int | float) and not isinstance(duration, bool)
                    else None,
                    try_number=_int(ti.get("try_number")),
                )
            )
    return out
