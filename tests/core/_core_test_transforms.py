"""Tiny column transformations registered for the core tests only.

They let the policy, plan, API and property tests exercise column steps (typed
output, keys, refused input types) without depending on the real
transformation families, which are tested on their own.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from cape_pipelines.transforms import (
    ColumnContext,
    ColumnTransformation,
    KeyedTransformation,
    known_types,
    register,
)


class Suffix(ColumnTransformation):
    """Appends ``suffix`` to strings; refuses any other type."""

    type_name: ClassVar[str] = "test-suffix"

    suffix: str = "!"

    def output_type(self, input_type: pa.DataType, column: str) -> pa.DataType:
        if not (pa.types.is_string(input_type) or pa.types.is_large_string(input_type)):
            raise self.refuse(column, input_type, "a string column")
        return input_type

    def apply(self, array: pa.Array, ctx: ColumnContext) -> pa.Array:
        return pc.binary_join_element_wise(array, pa.scalar(self.suffix, array.type), "")


class PlusN(ColumnTransformation):
    """Adds ``n`` to integers (cape-python's own test transformation, ``plusN``)."""

    type_name: ClassVar[str] = "plusN"

    n: int

    def output_type(self, input_type: pa.DataType, column: str) -> pa.DataType:
        if not (pa.types.is_integer(input_type) or pa.types.is_floating(input_type)):
            raise self.refuse(column, input_type, "a numeric column")
        return input_type

    def apply(self, array: pa.Array, ctx: ColumnContext) -> pa.Array:
        return pc.add(array, pa.scalar(self.n).cast(array.type))


class KeyedDigest(KeyedTransformation):
    """HMAC-SHA256 hex of each string's UTF-8, keyed: proves the key reached ``apply``."""

    type_name: ClassVar[str] = "test-keyed"

    def output_type(self, input_type: pa.DataType, column: str) -> pa.DataType:
        if not pa.types.is_string(input_type):
            raise self.refuse(column, input_type, "a string column")
        return pa.string()

    def apply(self, array: pa.Array, ctx: ColumnContext) -> pa.Array:
        assert ctx.key is not None
        return pa.array(
            [
                None if v is None else hmac.new(ctx.key, v.encode(), hashlib.sha256).hexdigest()
                for v in array.to_pylist()
            ],
            pa.string(),
        )


def _ensure_registered() -> None:
    known = set(known_types())
    for cls in (Suffix, PlusN, KeyedDigest):
        if cls.type_name not in known:
            register(cls)


_ensure_registered()
