"""The contract every transformation keeps: one small base class per kind.

A transformation is a frozen pydantic model of its validated parameters. Its
kind is its base class, so the plan dispatches on types and never guesses
attributes:

* :class:`ColumnTransformation` maps one column to one column with pure
  functions over pyarrow data: ``output_type`` (which also refuses an input
  type it cannot take) and ``apply``. Beam schemas, Dask ``meta`` and Spark
  schemas all come from ``output_type``; every engine runs ``apply``. It may
  declare :class:`SqlFunction` signatures, from which the Spark adapter
  derives its SQL functions.
* :class:`ColumnDrop` removes columns; :class:`RowFilter` removes rows.

This module imports no transformation family; the registry that lists them is
:mod:`cape_pipelines.transforms.registry`, so there is no import cycle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, field_validator

from ..errors import PlanError
from ..keys import KeyRef, KeyResolver, parse_key_ref

if TYPE_CHECKING:
    from ..conditions import Condition

Kind = Literal["column", "columns", "rows"]


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
    state: dict[Any, Any] = field(default_factory=dict)


class Transformation(BaseModel):
    """Common base of every kind: validated, frozen parameters and a safe ``repr``.

    Subclass one of the kind classes, not this one: :class:`ColumnTransformation`,
    :class:`ColumnDrop` or :class:`RowFilter`. Subclasses set ``type_name``
    (the policy's ``type``); ``kind`` names the kind in messages and listings.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    type_name: ClassVar[str] = ""
    kind: ClassVar[Kind]

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.__dict__.items() if k != "key"}
        key = getattr(self, "key", None)
        if key is not None:
            shown["key"] = repr(key)
        args = ", ".join(f"{k}={v!r}" for k, v in shown.items() if v is not None)
        return f"{type(self).__name__}({args})"

    __str__ = __repr__


class ColumnTransformation(Transformation):
    """Maps one column to one column of the same length, one batch at a time.

    ``sql_functions`` lists the SQL functions (``cape_<name>``) the Spark
    adapter registers for this transformation; empty means none.
    """

    kind: ClassVar[Kind] = "column"
    sql_functions: ClassVar[tuple[SqlFunction, ...]] = ()

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

    def count_names(self) -> tuple[str, ...]:
        """Names of the counts :meth:`apply_counted` reports (``text-scrub``: its entity types).

        Empty for a transformation that reports none. Every name is counted
        (zero included) in the run's ``counts``, so the record's shape depends
        on the policy only, never on the data.
        """
        return ()

    def apply_counted(self, array: pa.Array, ctx: ColumnContext) -> tuple[pa.Array, dict[str, int]]:
        """:meth:`apply`, plus counts by name (:meth:`count_names`) over the rows of this batch.

        The counts are returned, not stored, so concurrent batches cannot mix
        them; the core adds them to the batch's counters.
        """
        return self.apply(array, ctx), {}

    def refuse(self, column: str, input_type: pa.DataType, wanted: str) -> PlanError:
        """The error for an input type this transformation cannot take."""
        return PlanError(
            f"column {column!r}: {self.type_name} needs {wanted}, but the column is {input_type}"
        )


class ColumnDrop(Transformation):
    """Removes ``columns``, or, when that is empty, the columns its rule matched."""

    kind: ClassVar[Kind] = "columns"

    columns: list[str] | None = None


class RowFilter(Transformation):
    """Removes every row where :attr:`parsed` is true or null (fails closed)."""

    kind: ClassVar[Kind] = "rows"

    condition: str

    @property
    def parsed(self) -> Condition:
        """The parsed condition, compiled against the schema at plan time."""
        raise NotImplementedError


KINDS: tuple[type[Transformation], ...] = (ColumnTransformation, ColumnDrop, RowFilter)


def sql_number(value: Any) -> int | float:
    """A SQL numeric literal as a Python number (SQL's ``-2.5`` arrives as a Decimal)."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


@dataclass(frozen=True)
class SqlArg:
    """One argument of a SQL function after the column.

    ``role`` says what the literal fills: ``param`` (the parameter ``param``,
    through ``convert``), ``key`` (a key *name*, resolved on the driver, never
    key material) or ``column`` (the column name the transformation sees,
    for transformations whose output depends on it).
    """

    name: str
    role: Literal["param", "key", "column"] = "param"
    param: str = ""
    convert: Callable[[Any], Any] | None = None
    required: bool = True


@dataclass(frozen=True)
class SqlFunction:
    """A SQL function signature: ``cape_<name>(col, args...) -> returns``.

    A SQL function has one return type, so a transformation whose output type
    follows its input declares one function per output type; the core's
    output is cast to ``returns``.
    """

    name: str
    args: tuple[SqlArg, ...]
    returns: pa.DataType

    def params(self, values: list[Any]) -> dict[str, Any]:
        """The transformation's parameters from the literal ``values`` (key and column left out)."""
        out: dict[str, Any] = {}
        for arg, value in zip(self.args, values, strict=False):
            if arg.role != "param" or value is None:
                continue
            out[arg.param or arg.name] = arg.convert(value) if arg.convert else value
        return out


class KeyedTransformation(ColumnTransformation):
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
