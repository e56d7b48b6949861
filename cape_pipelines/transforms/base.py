"""The contract every transformation keeps, and the registry of them by ``type`` name.

A transformation is a frozen pydantic model of its validated parameters plus
pure functions over pyarrow data: ``output_type`` (which also refuses an input
type it cannot take) and ``apply``. Beam schemas, Dask ``meta`` and Spark
schemas all come from ``output_type``; every engine runs ``apply``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum
from importlib.metadata import entry_points
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, field_validator

from ..errors import PlanError
from ..keys import KeyRef, KeyResolver, parse_key_ref

ENTRY_POINT_GROUP = "cape_pipelines.transforms"


class CapeDType(StrEnum):
    """cape-python's ``dtype`` names; a ``dtype`` argument fixes the output type."""

    Integer = "Integer"
    Long = "Long"
    Float = "Float"
    Double = "Double"
    Short = "Short"
    Byte = "Byte"
    String = "String"
    Date = "Date"

    def arrow(self, input_type: pa.DataType | None = None) -> pa.DataType:
        """The Arrow type for this name (``Date`` keeps a temporal input type)."""
        if self is CapeDType.Date:
            if input_type is not None and (
                pa.types.is_timestamp(input_type) or pa.types.is_date(input_type)
            ):
                return input_type
            return pa.date32()
        return _DTYPES[self]


_DTYPES = {
    CapeDType.Integer: pa.int32(),
    CapeDType.Long: pa.int64(),
    CapeDType.Float: pa.float32(),
    CapeDType.Double: pa.float64(),
    CapeDType.Short: pa.int16(),
    CapeDType.Byte: pa.int8(),
    CapeDType.String: pa.string(),
}


@dataclass
class ColumnContext:
    """What ``apply`` may use beyond the array: column name, key, whole batch, a memo.

    ``state`` is a per-process memo shared by every batch of one plan step, for
    derived objects worth building once (a keyed HMAC state, a cipher); it is
    never pickled.
    """

    column: str
    key: bytes | None = None
    batch: pa.RecordBatch | None = None
    state: dict[str, Any] = field(default_factory=dict)


class Transformation(BaseModel):
    """Base class: validated, frozen parameters and pure Arrow functions.

    Subclasses set ``type_name`` (the policy's ``type``) and ``kind``:
    ``column`` (maps one column to one column), ``columns`` (removes columns:
    ``column-redact``) or ``rows`` (removes rows: ``row-redact``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    type_name: ClassVar[str] = ""
    kind: ClassVar[Literal["column", "columns", "rows"]] = "column"

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.__dict__.items() if k != "key"}
        if getattr(self, "key", None) is not None:
            shown["key"] = repr(self.key)
        args = ", ".join(f"{k}={v!r}" for k, v in shown.items() if v is not None)
        return f"{type(self).__name__}({args})"

    __str__ = __repr__

    def resolve_key(self, resolver: KeyResolver) -> bytes | None:
        """The key bytes this transformation needs, resolved once at plan time."""
        ref = getattr(self, "key", None)
        if isinstance(ref, KeyRef):
            return resolver.resolve(ref)
        return None

    def context_columns(self) -> list[str]:
        """Other columns of the batch that ``apply`` reads (e.g. perturbation ``context``)."""
        return []

    def output_type(self, input_type: pa.DataType, column: str) -> pa.DataType:
        """The output type for ``input_type``; raise :class:`PlanError` if it cannot take it."""
        raise NotImplementedError

    def apply(self, array: pa.Array, ctx: ColumnContext) -> pa.Array:
        """Transform one column of one batch. Nulls pass through unless the class says so."""
        raise NotImplementedError

    def refuse(self, column: str, input_type: pa.DataType, wanted: str) -> PlanError:
        """The error for an input type this transformation cannot take."""
        return PlanError(
            f"column {column!r}: {self.type_name} needs {wanted}, but the column is {input_type}"
        )


class KeyedTransformation(Transformation):
    """A transformation with a ``key`` parameter in any of the forms POLICY.md accepts."""

    # A rejected inline key must not be echoed back in a validation message.
    model_config = ConfigDict(hide_input_in_errors=True)

    key: KeyRef

    @field_validator("key", mode="before")
    @classmethod
    def _parse_key(cls, value: Any) -> KeyRef:
        return parse_key_ref(value)


def seed_key(seed: int) -> bytes:
    """Key bytes derived from a public integer ``seed`` (reproducible, not secret)."""
    return hashlib.sha256(b"cape-pipelines seed\x00" + str(int(seed)).encode()).digest()


_REGISTRY: dict[str, type[Transformation]] = {}
_entry_points_loaded = False


def register(cls: type[Transformation]) -> type[Transformation]:
    """Class decorator: make ``cls`` available to policies under ``cls.type_name``."""
    if not cls.type_name:
        raise TypeError(f"{cls.__name__} has no type_name")
    existing = _REGISTRY.get(cls.type_name)
    if existing is not None and existing is not cls:
        raise TypeError(f"transformation type {cls.type_name!r} is registered twice")
    _REGISTRY[cls.type_name] = cls
    return cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        register(ep.load())


def known_types() -> list[str]:
    """Every registered ``type`` name, sorted."""
    from . import _builtin  # noqa: F401  (registers the built-in families)

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
