"""Cape Pipelines: privacy policies applied inside Beam, Dask and Spark pipelines.

One core on Apache Arrow data does all the work; engines only move batches in
and out of it. ``import cape_pipelines`` needs none of the engines installed.

>>> import cape_pipelines as cape
>>> policy = cape.load_policy({"label": "demo", "rules": [
...     {"match": {"name": "ssn"}, "actions": ["drop"]}]})
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from . import pandas as _pandas  # noqa: F401  (registers the ``df.cape`` accessor)
from .audit import JsonlSink, LoggingSink, MemorySink, MultiSink, NullSink, Sink
from .core import ColumnCounter, Counters
from .errors import (
    CapeError,
    DataError,
    KeyMissingError,
    PlanError,
    PolicyError,
    TransformError,
)
from .pandas.apply import apply_policy
from .plan import Plan, build_plan
from .policy import Policy, load_policy

try:
    __version__ = _version("cape-pipelines")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "CapeError",
    "ColumnCounter",
    "Counters",
    "DataError",
    "JsonlSink",
    "KeyMissingError",
    "LoggingSink",
    "MemorySink",
    "MultiSink",
    "NullSink",
    "Plan",
    "PlanError",
    "Policy",
    "PolicyError",
    "Sink",
    "TransformError",
    "__version__",
    "apply_policy",
    "build_plan",
    "load_policy",
]
