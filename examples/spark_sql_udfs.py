"""Protect the bundled sample customers with Spark: ``cape_*`` SQL functions, then ``apply_policy``.

The sample dataset and demo policy are the ones every example shares
(``cape_pipelines/data``); the demo keys are PUBLIC and for the demo only.
Part 1 registers the SQL functions (keys by name, resolved here on the
driver) and queries the table with ``spark.sql``. Part 2 applies the whole
demo policy with ``apply_policy`` (lazy, every check done at the call) and
runs it once with the audited ``write``: one ``run.started`` and one
``run.completed`` record. The tokens of both parts are equal, because both
call the same core transformation.

    python examples/spark_sql_udfs.py
    python examples/spark_sql_udfs.py --output out/customers --audit out/audit.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.csv as pacsv

from cape_pipelines import spark as cape_spark
from cape_pipelines.cli import demo_keys, demo_paths

QUERY = """
SELECT customer_id,
       cape_tokenize(email, 'demo-email-key', 32)           AS email,
       cape_truncate_date(birthdate, 'year')                AS birth_year,
       cape_round_long(salary, -3)                          AS salary_k,
       cape_perturb_timestamp(signup, 'demo-noise-key', 'DAY', -7, 7, 'signup') AS signup
FROM customers
WHERE age >= 18
ORDER BY customer_id
"""


def local_session() -> Any:
    """A small local SparkSession for running this file on its own."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return (
        SparkSession.builder.master("local[2]")
        .appName("cape-spark-example")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )


def main(argv: list[str] | None = None, spark: Any = None) -> int:
    """Run both parts on ``spark`` (a local session if none is given)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="write Parquet here (default: a temporary directory)")
    parser.add_argument("--audit", help="JSONL audit file (default: a temporary file)")
    args = parser.parse_args(argv)

    own_session = spark is None
    spark = spark or local_session()
    work = Path(tempfile.mkdtemp(prefix="cape-spark-"))
    output = args.output or str(work / "customers")
    audit = Path(args.audit or work / "audit.jsonl")
    try:
        data, policy = demo_paths()
        customers = spark.createDataFrame(pacsv.read_csv(data)).repartition(4)
        customers.createOrReplaceTempView("customers")

        # Part 1: SQL functions. Keys are named in SQL and resolved now, on the driver.
        cape_spark.register_udfs(spark, keys=demo_keys())
        print("spark.sql with cape_* functions:")
        spark.sql(QUERY).show(5, truncate=24)

        # Part 2: the whole policy. Checked now; runs at the audited write.
        protected = cape_spark.apply_policy(customers, policy, keys=demo_keys(), audit=audit)
        print("output schema (from the plan, before any job):")
        print(protected.schema.simpleString())
        counters = cape_spark.write(protected, output, mode="overwrite")
        print(f"wrote {output}: {counters.rows_out} rows")

        sql_email = {
            r["customer_id"]: r["email"]
            for r in spark.sql(QUERY).select("customer_id", "email").collect()
        }
        written = {
            r["customer_id"]: r["email"]
            for r in spark.read.parquet(output).select("customer_id", "email").collect()
        }
        assert sql_email == written, "SQL function and policy gave different tokens"
        print("cape_tokenize in SQL == the policy's tokenizer, for every row")
    finally:
        if own_session:
            spark.stop()

    done = json.loads(audit.read_text().splitlines()[-1])
    print(
        f"audit ({audit}): {done['event']}: {done['rows_in']} rows in, "
        f"{done['rows_out']} out, {done['rows_redacted']} redacted"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
