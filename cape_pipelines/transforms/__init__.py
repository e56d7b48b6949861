"""Transformations, one module per family, registered by their policy ``type`` name."""

from .base import (
    CapeDType,
    ColumnContext,
    KeyedTransformation,
    Transformation,
    get_transformation_class,
    known_types,
    register,
)

__all__ = [
    "CapeDType",
    "ColumnContext",
    "KeyedTransformation",
    "Transformation",
    "get_transformation_class",
    "known_types",
    "register",
]
