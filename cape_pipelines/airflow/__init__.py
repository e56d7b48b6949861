"""Cape in Apache Airflow: an operator that applies a policy by label, linked to its DAG run.

:mod:`.task` holds what a Cape task does (Airflow-free, so it is tested without
Airflow); :mod:`.operators` holds :class:`~.operators.CapeApplyOperator` and
:class:`~.operators.CapeHook`, which need the ``airflow`` extra. Importing this
package does not import Airflow. See docs/orchestrators.md.
"""

from __future__ import annotations

from .task import Coordinator, TaskRefused, TaskRetryable, apply_task

__all__ = ["Coordinator", "TaskRefused", "TaskRetryable", "apply_task"]
