"""A real Airflow DAG with one CapeApplyOperator task, run by ``dag.test()`` (no scheduler).

This folder is the test's ``dags_folder`` (Airflow 3 runs only DAGs it parsed
from a bundle). The task's parameters come from the environment, read when
Airflow parses the file: ``CAPE_TEST_LABEL``, ``CAPE_TEST_INPUT``,
``CAPE_TEST_OUTPUT``; the coordinator from ``CAPE_COORDINATOR_URL``,
``CAPE_TOKEN`` and ``CAPE_COORDINATOR_PUBLIC_KEY`` (the hook's fallback when
no ``cape_default`` connection exists). ``python cape_dag.py RESULT_JSON``
runs the DAG and writes its state, run id and the task's XCom there.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime

from airflow.sdk import DAG

from cape_pipelines.airflow.operators import CapeApplyOperator

with DAG(dag_id="cape_nightly", schedule=None, start_date=datetime(2026, 11, 1, tzinfo=UTC)) as dag:
    CapeApplyOperator(
        task_id="tokenize",
        policy_label=os.environ.get("CAPE_TEST_LABEL", "customers"),
        input_path=os.environ.get("CAPE_TEST_INPUT", "in.csv"),
        output_path=os.environ.get("CAPE_TEST_OUTPUT", "out.parquet"),
        retries=0,
    )


def main(result: str) -> None:
    run = dag.test()
    ti = next(t for t in run.get_task_instances() if t.task_id == "tokenize")
    out = {
        "state": str(run.state),
        "run_id": run.run_id,
        "task_state": str(ti.state),
        "try_number": ti.try_number,
        "xcom": ti.xcom_pull(task_ids="tokenize") if str(ti.state).endswith("success") else None,
    }
    with open(result, "w", encoding="utf-8") as fh:
        json.dump(out, fh, default=str)


if __name__ == "__main__":
    main(sys.argv[1])
