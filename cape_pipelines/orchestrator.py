"""Who is running this job: the orchestrator's identity, read on the driver for ``run.started``.

A run's records say which policy was applied and by which engine; an operator
also needs to know *which job* it was, to find it in the Spark UI, the YARN
ResourceManager or the Airflow grid, and the coordinator needs it to tell that
the job ended without finishing its run (docs/orchestrators.md). :func:`detect`
reads what the running process can see without starting anything: the active
SparkContext (only when ``pyspark`` is already imported), the YARN container
environment, the ``AIRFLOW_CTX_*`` variables Airflow sets for a task, and the
default Dask ``distributed`` client (only when ``distributed`` is imported).

Nothing secret goes into the identity: URLs lose their user info, query and
fragment; every value is text without control characters, cut to a bounded
length (a coordinator refuses records with control characters, and a run's
identity must never cost it its audit trail). Detection never raises: a probe
that fails is skipped. ``CAPE_ORCHESTRATOR=off`` turns it off.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# Longest value kept from any probe (app names are free text chosen by the job).
MAX_TEXT = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_YARN_APP = re.compile(r"application_\d+_\d+")
_YARN_CONTAINER = re.compile(r"container_(?:e\d+_)?(\d+)_(\d+)_\d+_\d+")


def clean_text(value: object) -> str | None:
    """``value`` as bounded text without control characters, or None when it is not text."""
    if not isinstance(value, str) or not value:
        return None
    return _CONTROL.sub("", value)[:MAX_TEXT] or None


def clean_url(value: object) -> str | None:
    """A URL without user info, query or fragment (a master URL may carry credentials)."""
    text = clean_text(value)
    if text is None or "://" not in text:
        return text
    # k8s://https://host:443 nests a URL: clean the inner one and keep the prefix.
    scheme, _, rest = text.partition("://")
    if "://" in rest:
        inner = clean_url(rest)
        return f"{scheme}://{inner}" if inner else None
    try:
        parts = urlsplit(text)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return None
    return urlunsplit((parts.scheme, host + port, parts.path, "", "")) or None


def _spark(env: Mapping[str, str]) -> dict[str, Any] | None:
    """The active SparkContext's application, else ``SPARK_APPLICATION_ID``/``SPARK_MASTER``."""
    found: dict[str, Any] = {}
    if "pyspark" in sys.modules:
        try:
            from pyspark import SparkContext

            sc = SparkContext._active_spark_context
            if sc is not None:
                found = {
                    "app_id": clean_text(sc.applicationId),
                    "app_name": clean_text(sc.appName),
                    "master": clean_url(sc.master),
                    "ui_url": clean_url(sc.uiWebUrl),
                }
        except Exception:  # a stopped or half-started context: no identity, not an error
            found = {}
    if not found.get("app_id"):
        env_id = clean_text(env.get("SPARK_APPLICATION_ID"))
        if env_id:
            found = {"app_id": env_id, "master": clean_url(env.get("SPARK_MASTER"))}
    found = {k: v for k, v in found.items() if v}
    return found or None


def _yarn(spark: Mapping[str, Any] | None, env: Mapping[str, str]) -> dict[str, Any] | None:
    """The YARN application id: Spark's own on a ``yarn`` master, else the container's."""
    if spark and str(spark.get("master", "")).startswith("yarn"):
        app = str(spark.get("app_id", ""))
        if _YARN_APP.fullmatch(app):
            return {"app_id": app}
    proxy = env.get("APPLICATION_WEB_PROXY_BASE", "")
    match = _YARN_APP.search(proxy)
    if match:
        return {"app_id": match.group(0)}
    container = _YARN_CONTAINER.fullmatch(env.get("CONTAINER_ID", ""))
    if container:
        cluster, seq = container.groups()
        return {"app_id": f"application_{cluster}_{seq}"}
    return None


_AIRFLOW_ENV = {
    "dag_id": "AIRFLOW_CTX_DAG_ID",
    "run_id": "AIRFLOW_CTX_DAG_RUN_ID",
    "task_id": "AIRFLOW_CTX_TASK_ID",
    "try_number": "AIRFLOW_CTX_TRY_NUMBER",
    "map_index": "AIRFLOW_CTX_MAP_INDEX",
    "logical_date": "AIRFLOW_CTX_LOGICAL_DATE",
}


def _airflow(env: Mapping[str, str]) -> dict[str, Any] | None:
    """The task instance Airflow runs (its ``AIRFLOW_CTX_*`` variables)."""
    found: dict[str, Any] = {}
    for key, var in _AIRFLOW_ENV.items():
        value = clean_text(env.get(var))
        if value is None:
            continue
        if key in ("try_number", "map_index"):
            try:
                found[key] = int(value)
            except ValueError:
                continue
        else:
            found[key] = value
    if "logical_date" not in found:
        older = clean_text(env.get("AIRFLOW_CTX_EXECUTION_DATE"))
        if older:
            found["logical_date"] = older
    # Without the DAG and the run nothing can be linked; partial context is noise.
    return found if "dag_id" in found and "run_id" in found else None


def _dask() -> dict[str, Any] | None:
    """The scheduler the default ``distributed`` client talks to."""
    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import default_client

        client = default_client()
        address = clean_url(client.scheduler.address)
    except Exception:  # no client, or one that closed: not an error for the run
        return None
    return {"scheduler": address} if address else None


def detect(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The orchestrator identity of this process, or None when nothing runs it.

    ``{"spark": {app_id, app_name, master, ui_url}, "yarn": {app_id},
    "airflow": {dag_id, run_id, task_id, try_number, ...}, "dask": {scheduler}}``,
    each part present only when detected (an Airflow task that submits Spark
    on YARN has three).

    >>> detect(env={"AIRFLOW_CTX_DAG_ID": "daily", "AIRFLOW_CTX_DAG_RUN_ID": "manual__1"})
    {'airflow': {'dag_id': 'daily', 'run_id': 'manual__1'}}
    """
    environ = os.environ if env is None else env
    if str(environ.get("CAPE_ORCHESTRATOR", "")).lower() in ("off", "0", "false", "no"):
        return None
    out: dict[str, Any] = {}
    spark = _spark(environ)
    if spark:
        out["spark"] = spark
    yarn = _yarn(spark, environ)
    if yarn:
        out["yarn"] = yarn
    airflow = _airflow(environ)
    if airflow:
        out["airflow"] = airflow
    dask = _dask()
    if dask:
        out["dask"] = dask
    return out or None


def started_fields() -> dict[str, Any]:
    """The fields :func:`detect` adds to a ``run.started`` record (none when nothing runs it)."""
    try:
        found = detect()
    except Exception:  # identity is a courtesy: it must never cost a run its records
        return {}
    return {"orchestrator": found} if found else {}


__all__ = ["clean_text", "clean_url", "detect", "started_fields"]
