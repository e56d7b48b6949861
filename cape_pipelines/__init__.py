"""Cape Pipelines: privacy policies applied inside Beam, Dask and Spark pipelines.

One core on Apache Arrow data does all the work; engines only move batches in
and out of it. ``import cape_pipelines`` needs none of the engines installed.

>>> import cape_pipelines as cape
>>> policy = cape.load_policy({"label": "demo", "rules": [
...     {"match": {"name": "ssn"}, "actions": ["drop"]}]})
"""

from .api import apply_policy
from .errors import (
    CapeError,
    DataError,
    KeyMissingError,
    PlanError,
    PolicyError,
    TransformError,
)
from .plan import Plan, build_plan
from .policy import Policy, load_policy

__version__ = "0.1.0"

__all__ = [
    "CapeError",
    "DataError",
    "KeyMissingError",
    "Plan",
    "PlanError",
    "Policy",
    "PolicyError",
    "TransformError",
    "__version__",
    "apply_policy",
    "build_plan",
    "load_policy",
]
