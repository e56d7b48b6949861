"""What a Cape task in Airflow does, without Airflow: apply a policy by label to files.

:class:`~cape_pipelines.airflow.operators.CapeApplyOperator` is a thin shell
around :func:`apply_task`, kept apart so the task's behaviour (which errors
fail the task for good, which may be retried, how the run is tied to the DAG
run, what is handed to XCom) is tested without an Airflow installation.

The run is tied to its task instance through the orchestrator identity
(:mod:`cape_pipelines.orchestrator`): Airflow sets ``AIRFLOW_CTX_*`` in a
task's environment, and :func:`apply_task` also sets them from the task's
context for the duration of the run when they are missing (``dag.test()``
and some executors leave them unset), so ``run.started`` always names the
DAG, its run, the task and the try. With ``engine="spark"`` and a
``spark_conf`` the task starts a SparkSession first; the run then names the
Spark application too, and a coordinator polling both links the run to each.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import CapeError, PolicyError


class TaskRefused(CapeError):
    """The policy was refused (bad signature, no active version, label not allowed, invalid):
    retrying cannot help until someone acts, so the task fails without retries."""


class TaskRetryable(CapeError):
    """The coordinator could not be reached: the task may be retried."""


@dataclass(frozen=True)
class Coordinator:
    """Where the policy and keys come from, and the records go: URL and pipeline token
    (the token is never logged or returned)."""

    url: str
    token: str
    # The coordinator's Ed25519 public key (text or raw bytes) the policy must verify with.
    public_key: str | bytes | None = None
    # Where undelivered records wait (the client's default: a per-user cache directory).
    spool_dir: str | None = None

    def __repr__(self) -> str:
        return f"Coordinator(url={self.url!r})"


def context_identity(context: Mapping[str, Any]) -> dict[str, str]:
    """``AIRFLOW_CTX_*`` values from an Airflow task context (dag, dag_run, ti)."""
    out: dict[str, str] = {}
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    dag = context.get("dag")
    dag_id = getattr(dag, "dag_id", None) or getattr(ti, "dag_id", None)
    run_id = getattr(dag_run, "run_id", None) or context.get("run_id")
    values = {
        "AIRFLOW_CTX_DAG_ID": dag_id,
        "AIRFLOW_CTX_DAG_RUN_ID": run_id,
        "AIRFLOW_CTX_TASK_ID": getattr(ti, "task_id", None),
        "AIRFLOW_CTX_TRY_NUMBER": getattr(ti, "try_number", None),
        "AIRFLOW_CTX_MAP_INDEX": getattr(ti, "map_index", None),
    }
    for var, value in values.items():
        if value is not None and str(value) != "":
            out[var] = str(value)
    return out


@contextmanager
def task_environment(context: Mapping[str, Any]) -> Iterator[None]:
    """Set the ``AIRFLOW_CTX_*`` variables the context implies and the process lacks, for
    the duration of the block (restored after: a worker process runs many tasks)."""
    added = {k: v for k, v in context_identity(context).items() if not os.environ.get(k)}
    os.environ.update(added)
    try:
        yield
    finally:
        for var in added:
            os.environ.pop(var, None)


def _spark_session(conf: Mapping[str, str]) -> Any:
    from pyspark.sql import SparkSession

    builder = SparkSession.builder
    for key, value in conf.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def apply_task(
    label: str,
    input: str,
    output: str,
    *,
    coordinator: Coordinator | None = None,
    client: Any = None,
    context: Mapping[str, Any] | None = None,
    engine: str = "pandas",
    overwrite: bool = False,
    spark_conf: Mapping[str, str] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Apply the active policy of ``label`` to ``input``, writing ``output``: one audited run.

    ``client`` (a ``coordinator_client.Client``) or ``coordinator`` says where the
    policy comes from; the run's records go to the coordinator's spool and are
    delivered before this returns (10 s at most; what is left is delivered by the next
    run). ``options`` go to :func:`cape_pipelines.io.apply_files` (``format``,
    ``csv_options``, ``batch_size``...). Returns the run's summary for XCom: ``run_id``,
    ``label``, ``version``, ``output``, ``rows_in``, ``rows_out``, ``rows_redacted``.

    Raises :class:`TaskRefused` for a policy that is refused or invalid (fail for
    good), :class:`TaskRetryable` for an unreachable coordinator; other errors as they are.
    """
    from coordinator_client import AuthError, NotFound, PolicyRefused, Unavailable

    from ..io import apply_files
    from ..source import resolve_policy

    own = client is None
    if own:
        if coordinator is None:
            raise CapeError("give the task a coordinator (URL and pipeline token) or a client")
        from coordinator_client import Client

        client = Client(
            coordinator.url,
            coordinator.token,
            public_key=coordinator.public_key,
            spool_dir=coordinator.spool_dir,
        )
    sink = None
    try:
        with task_environment(context or {}):
            if engine == "spark" and spark_conf:
                # Started here so the run names the Spark application it runs in.
                _spark_session(spark_conf)
            try:
                src = resolve_policy(label, client=client)
            except (PolicyRefused, NotFound, AuthError, PolicyError) as exc:
                raise TaskRefused(f"policy {label!r} refused: {exc}") from exc
            except Unavailable as exc:
                raise TaskRetryable(f"coordinator unavailable: {exc}") from exc
            sink = src.audit
            result = apply_files(
                src.policy,
                input,
                output,
                audit=src.audit,
                resolver=src.resolver,
                policy_source=src.source,
                engine=engine,
                overwrite=overwrite,
                progress=False,
                **options,
            )
    finally:
        flush = getattr(sink, "flush", None)
        if callable(flush):
            flush(10.0)
        if own:
            client.close()
    c = result.counters
    return {
        "run_id": result.run_id,
        "label": result.plan.label,
        "version": result.plan.version,
        "output": str(result.output),
        "rows_in": c.rows_in,
        "rows_out": c.rows_out,
        "rows_redacted": c.rows_redacted,
    }


__all__ = [
    "Coordinator",
    "TaskRefused",
    "TaskRetryable",
    "apply_task",
    "context_identity",
    "task_environment",
]
