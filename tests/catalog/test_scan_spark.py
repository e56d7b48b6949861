"""``cape catalog scan TABLE --engine spark``: a Spark table's sample, collected as Arrow, gets
the same proposals as the same rows read from a file."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from _synthetic import dataset

from cape_pipelines.catalog.scan import scan_spark_table, scan_table
from cape_pipelines.cli import main

pytestmark = pytest.mark.spark


def test_spark_table_scan_matches_the_arrow_scan(spark, tmp_path, capsys):
    table = dataset(rows=300)
    path = tmp_path / "customers.parquet"
    pq.write_table(table, path)
    spark.read.parquet(str(path)).createOrReplaceTempView("catalog_scan_customers")
    result = scan_spark_table(spark, "catalog_scan_customers", sample=300)
    assert result.rows == 300
    assert sorted(result.proposals, key=lambda p: (p.column, p.tag)) == sorted(
        scan_table(table), key=lambda p: (p.column, p.tag)
    )
    # A path table, and the CLI on the same session.
    assert main(["catalog", "scan", f"parquet.`{path}`", "--engine", "spark", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 300
    assert ("email", "pii.email") in {(p["column"], p["tag"]) for p in out["proposals"]}
    for bad in ("x; DROP TABLE y", "a b", "parquet.`x`.`y` --"):
        with pytest.raises(ValueError, match="not a Spark table name"):
            scan_spark_table(spark, bad)
