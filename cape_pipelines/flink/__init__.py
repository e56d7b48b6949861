"""Apache Flink integration (PyFlink): policies on Tables and DataStreams, SQL functions.

Needs the ``flink`` extra (``apache-flink``), which pins its own apache-beam,
pandas and pyarrow, so it lives in a virtualenv of its own (see
docs/engines/flink.md). Import :mod:`cape_pipelines.flink.apply` members from here.
"""

from __future__ import annotations

from .apply import apply_policy, apply_to_stream, collect, execute_insert
from .sql import register_functions

__all__ = ["apply_policy", "apply_to_stream", "collect", "execute_insert", "register_functions"]
