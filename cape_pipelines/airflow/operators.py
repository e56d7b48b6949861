"""The Airflow operator and hook: apply a Cape policy by label to files in a DAG task.

>>> from cape_pipelines.airflow.operators import CapeApplyOperator  # doctest: +SKIP
>>> CapeApplyOperator(task_id="tokenize", policy_label="customers",
...                   input_path="/data/in/{{ ds }}.csv",
...                   output_path="/data/out/{{ ds }}.parquet")
... # doctest: +SKIP

Needs the ``airflow`` extra (Airflow 3's task SDK, or Airflow 2.10+). The
behaviour lives in :func:`~cape_pipelines.airflow.task.apply_task`; this
module only adapts it: the coordinator comes from an Airflow connection
(:class:`CapeHook`), a refused policy fails the task without retries
(``AirflowFailException``), an unreachable coordinator is an ordinary
failure that Airflow may retry, and the run's summary is the task's XCom.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from .task import Coordinator, TaskRefused, TaskRetryable, apply_task

try:  # Airflow 3: the task SDK
    from airflow.sdk import BaseHook, BaseOperator
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
except ImportError:  # Airflow 2.10+
    try:
        from airflow.exceptions import (  # type: ignore[no-redef]
            AirflowException,
            AirflowFailException,
        )
        from airflow.hooks.base import BaseHook  # type: ignore[no-redef]
        from airflow.models import BaseOperator  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError(
            "cape_pipelines.airflow.operators needs Apache Airflow: install the 'airflow' extra"
        ) from exc


class CapeHook(BaseHook):
    """The coordinator of an Airflow connection: ``host`` is its URL (with the scheme),
    ``password`` the pipeline token, ``extra`` may hold ``{"public_key": "..."}``. Without
    the connection, ``CAPE_COORDINATOR_URL`` and ``CAPE_TOKEN``."""

    conn_name_attr = "cape_conn_id"
    default_conn_name = "cape_default"
    conn_type = "cape"
    hook_name = "Cape coordinator"

    def __init__(self, cape_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.cape_conn_id = cape_conn_id

    def coordinator(self) -> Coordinator:
        """Where the task's policy comes from (the token is never logged)."""
        try:
            conn = self.get_connection(self.cape_conn_id)
        except Exception:  # no such connection: the environment, as the CLI reads it
            conn = None
        if conn is not None and conn.host:
            url = conn.host if "://" in conn.host else f"https://{conn.host}"
            if conn.port:
                url = f"{url}:{conn.port}"
            extra = conn.extra_dejson if isinstance(conn.extra_dejson, Mapping) else {}
            return Coordinator(url, conn.password or "", extra.get("public_key"))
        url, token = os.environ.get("CAPE_COORDINATOR_URL"), os.environ.get("CAPE_TOKEN")
        if not url or not token:
            raise AirflowFailException(
                f"no Cape coordinator: set connection {self.cape_conn_id!r}"
                " or CAPE_COORDINATOR_URL and CAPE_TOKEN"
            )
        return Coordinator(url, token, os.environ.get("CAPE_COORDINATOR_PUBLIC_KEY"))


class CapeApplyOperator(BaseOperator):
    """Apply the active policy of ``policy_label`` to ``input_path`` (a CSV/Parquet file or
    directory) and write ``output_path``: one audited run, linked to this task instance.

    ``engine``: ``pandas`` (default), ``dask`` or ``spark``; with ``spark_conf`` (e.g.
    ``{"spark.master": "spark://host:7077"}``) the task starts the Spark application itself,
    and the run names it too. ``options`` go to :func:`cape_pipelines.io.apply_files`.
    """

    # Not ``label`` or ``output``: BaseOperator has read-only properties of those names.
    template_fields: Sequence[str] = ("policy_label", "input_path", "output_path")

    def __init__(
        self,
        *,
        policy_label: str,
        input_path: str,
        output_path: str,
        engine: str = "pandas",
        overwrite: bool = False,
        spark_conf: Mapping[str, str] | None = None,
        cape_conn_id: str = CapeHook.default_conn_name,
        options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.policy_label = policy_label
        self.input_path = input_path
        self.output_path = output_path
        self.engine = engine
        self.overwrite = overwrite
        self.spark_conf = dict(spark_conf or {})
        self.cape_conn_id = cape_conn_id
        self.options = dict(options or {})

    def execute(self, context: Any) -> dict[str, Any]:
        coordinator = CapeHook(self.cape_conn_id).coordinator()
        try:
            result = apply_task(
                self.policy_label,
                self.input_path,
                self.output_path,
                coordinator=coordinator,
                context=context,
                engine=self.engine,
                overwrite=self.overwrite,
                spark_conf=self.spark_conf,
                **self.options,
            )
        except TaskRefused as exc:
            raise AirflowFailException(str(exc)) from exc
        except TaskRetryable as exc:
            raise AirflowException(str(exc)) from exc
        self.log.info(
            "cape run %s: %s v%s, %s rows out",
            result["run_id"],
            result["label"],
            result["version"],
            result["rows_out"],
        )
        return result


__all__ = ["CapeApplyOperator", "CapeHook"]
