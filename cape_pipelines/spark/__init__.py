"""Spark adapter: ``apply_policy`` via ``mapInArrow``, audited actions, and ``cape_*`` SQL UDFs.

>>> from cape_pipelines import spark as cape_spark  # doctest: +SKIP
>>> out = cape_spark.apply_policy(df, "policy.yaml", keys={"email-key": key})  # doctest: +SKIP
>>> cape_spark.write(out, "s3://bucket/clean/")  # one audited run  # doctest: +SKIP

Importing this package needs ``pyspark`` (the ``spark`` extra); ``import
cape_pipelines`` does not.
"""

try:
    import pyspark  # noqa: F401
except ImportError as exc:
    raise ImportError(
        "cape_pipelines.spark needs PySpark, which is not installed: "
        "pip install 'cape-pipelines[spark]'"
    ) from exc

from .apply import PolicyFunction, apply_policy, collect, plan_of, write
from .files import read_parquet
from .udfs import SPECS, register_udfs

__all__ = [
    "SPECS",
    "PolicyFunction",
    "apply_policy",
    "collect",
    "plan_of",
    "read_parquet",
    "register_udfs",
    "write",
]
