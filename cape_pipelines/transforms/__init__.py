"""Transformations, one module per family, registered by their policy ``type`` name.

Write a new one by subclassing a kind class (:class:`ColumnTransformation`,
:class:`ColumnDrop`, :class:`RowFilter`); list a built-in in ``_builtin.py``,
or register a third-party class through the ``cape_pipelines.transforms``
entry-point group.
"""

from .base import (
    CapeDType,
    ColumnContext,
    ColumnDrop,
    ColumnTransformation,
    KeyedTransformation,
    RowFilter,
    SqlArg,
    SqlFunction,
    Transformation,
)
from .registry import get_transformation_class, known_types, register, registered

__all__ = [
    "CapeDType",
    "ColumnContext",
    "ColumnDrop",
    "ColumnTransformation",
    "KeyedTransformation",
    "RowFilter",
    "SqlArg",
    "SqlFunction",
    "Transformation",
    "get_transformation_class",
    "known_types",
    "register",
    "registered",
]
