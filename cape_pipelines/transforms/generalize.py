"""``generalize``: replace a value by a coarser one from a hierarchy the policy names.

Two hierarchies, one per use:

* ``prefix: N`` keeps the first N characters, the usual hierarchy of codes
  (ZIP ``02139`` to ``021``); with ``fill`` the cut characters are replaced
  by it instead, keeping the length (``021**``).
* ``mapping`` is a value-to-group table written in the policy (a city to its
  region, a diagnosis code to its chapter). ``default`` is the group of a
  value the table does not list; without it such a value is an error naming
  the row (``unmapped: error``, so a new city never passes through
  unnoticed), or null (``unmapped: null``), or left as it is
  (``unmapped: keep``).

Strings only; nulls stay null. Both forms are pyarrow kernels over the batch
(``utf8_slice_codeunits``, ``binary_repeat``, ``index_in`` and ``take``).

>>> import pyarrow as pa
>>> from cape_pipelines.transforms.base import ColumnContext
>>> zip3 = Generalize(prefix=3, fill="*")
>>> zip3.apply(pa.array(["02139", None]), ColumnContext("zip")).to_pylist()
['021**', None]
>>> g = Generalize(mapping={"Boston": "Northeast", "Austin": "South"}, default="Other")
>>> g.apply(pa.array(["Austin", "Paris"]), ColumnContext("city")).to_pylist()
['South', 'Other']
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from ..errors import TransformError
from ._text import is_text
from .base import ColumnContext, ColumnTransformation, SqlArg, SqlFunction


class Generalize(ColumnTransformation):
    """Values to a coarser level: a prefix of N characters, or a group from a mapping table."""

    type_name: ClassVar[str] = "generalize"
    # The mapping form needs a table, which a SQL literal cannot carry.
    sql_functions: ClassVar[tuple[SqlFunction, ...]] = (
        SqlFunction(
            "generalize_prefix",
            (SqlArg("prefix", convert=int), SqlArg("fill", required=False)),
            pa.string(),
        ),
    )

    prefix: int | None = Field(default=None, ge=0)
    fill: str | None = None
    mapping: dict[str, str] | None = None
    default: str | None = None
    unmapped: Literal["error", "null", "keep"] = "error"

    @field_validator("fill")
    @classmethod
    def _one_char(cls, value: str | None) -> str | None:
        if value is not None and len(value) != 1:
            raise ValueError("fill must be exactly one character")
        return value

    @field_validator("mapping")
    @classmethod
    def _not_empty(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and not value:
            raise ValueError("mapping needs at least one entry")
        return value

    @model_validator(mode="after")
    def _one_form(self) -> Generalize:
        if (self.prefix is None) == (self.mapping is None):
            raise ValueError("generalize takes exactly one of prefix or mapping")
        if self.prefix is not None and (
            self.default is not None or "unmapped" in self.model_fields_set
        ):
            raise ValueError("default and unmapped go with mapping, not prefix")
        if self.mapping is not None and self.fill is not None:
            raise ValueError("fill goes with prefix, not mapping")
        if self.default is not None and "unmapped" in self.model_fields_set:
            raise ValueError("give default (a group for unmapped values) or unmapped, not both")
        return self

    def output_type(self, input_type: pa.DataType, column: str) -> pa.DataType:
        """A string column, from a string column."""
        value_type = input_type.value_type if pa.types.is_dictionary(input_type) else input_type
        if not (is_text(value_type) or pa.types.is_null(value_type)):
            raise self.refuse(column, input_type, "a string column")
        return pa.string()

    def apply(self, array: pa.Array, ctx: ColumnContext) -> pa.Array:
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        if pa.types.is_dictionary(array.type):
            array = array.dictionary_decode()
        if pa.types.is_null(array.type):
            return pa.nulls(len(array), pa.string())
        values = array.cast(pa.string())
        if self.prefix is not None:
            return self._prefix(values, self.prefix)
        return self._map(values)

    def _prefix(self, values: pa.Array, n: int) -> pa.Array:
        head = pc.utf8_slice_codeunits(values, 0, n)
        if self.fill is None:
            return head
        cut = pc.subtract(pc.utf8_length(values), pc.utf8_length(head))
        return pc.binary_join_element_wise(
            head, pc.binary_repeat(pa.scalar(self.fill, pa.string()), cut), ""
        )

    def _map(self, values: pa.Array) -> pa.Array:
        assert self.mapping is not None
        keys = pa.array(list(self.mapping), pa.string())
        groups = pa.array(list(self.mapping.values()), pa.string())
        where = pc.index_in(values, value_set=keys)
        out = pc.take(groups, where)
        missing = pc.and_(pc.is_valid(values), pc.is_null(where))
        if not pc.any(missing).as_py():
            return out
        if self.default is not None:
            return pc.if_else(missing, pa.scalar(self.default, pa.string()), out)
        if self.unmapped == "keep":
            return pc.if_else(missing, values, out)
        if self.unmapped == "null":
            return out
        row = int(np.flatnonzero(missing.to_numpy(zero_copy_only=False))[0])
        raise TransformError(
            f"the value at row {row} is not in the mapping (set default or unmapped)"
        )
