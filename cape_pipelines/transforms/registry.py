"""Transformations by their policy ``type`` name: the built-ins, then third parties.

Built-ins come from the list in :mod:`._builtin`; third-party packages add
theirs through the ``cape_pipelines.transforms`` entry-point group (each entry
point names a class), loaded once on first lookup; tests and applications may
also call :func:`register`. A class must subclass one of the kind classes of
:mod:`.base`, so the plan knows what it does without guessing.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TypeVar

from ._builtin import BUILTINS
from .base import KINDS, Transformation

ENTRY_POINT_GROUP = "cape_pipelines.transforms"

T = TypeVar("T", bound=type[Transformation])

_REGISTRY: dict[str, type[Transformation]] = {}
_entry_points_loaded = False


def register(cls: T) -> T:
    """Make ``cls`` available to policies under ``cls.type_name`` (usable as a decorator)."""
    if not cls.type_name:
        raise TypeError(f"{cls.__name__} has no type_name")
    if not issubclass(cls, KINDS):
        kinds = ", ".join(k.__name__ for k in KINDS)
        raise TypeError(f"{cls.__name__} must subclass one of {kinds}")
    existing = _REGISTRY.get(cls.type_name)
    if existing is not None and existing is not cls:
        raise TypeError(f"transformation type {cls.type_name!r} is registered twice")
    _REGISTRY[cls.type_name] = cls
    return cls


for _cls in BUILTINS:
    register(_cls)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        register(ep.load())


def registered() -> list[type[Transformation]]:
    """Every registered class, built-ins first in their listed order."""
    _load_entry_points()
    return list(_REGISTRY.values())


def known_types() -> list[str]:
    """Every registered ``type`` name, sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get_transformation_class(type_name: str) -> type[Transformation]:
    """The class registered for ``type_name``; ``KeyError`` lists the known names."""
    known = known_types()
    try:
        return _REGISTRY[type_name]
    except KeyError:
        raise KeyError(
            f"unknown transformation type {type_name!r}; known types: {', '.join(known)}"
        ) from None
