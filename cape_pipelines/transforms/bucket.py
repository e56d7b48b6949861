"""``bucket``: numbers into ranges and dates into periods, so single values stop standing out.

An age of 37 becomes ``"30-39"``, a birth date becomes its quarter. Three
forms, one per policy:

* ``width`` (with ``origin``, default 0): fixed-width buckets
  ``[origin + k*width, origin + (k+1)*width)``;
* ``edges``: explicit ascending edges ``[e0, e1, ..., en]``; the buckets are
  ``< e0``, ``[e0, e1)``, ..., ``>= en``; ``labels`` may name them (one more
  label than edges);
* ``unit``: ``week`` (ISO, from Monday), ``month``, ``quarter`` or ``year``,
  for dates and timestamps (timestamps with a time zone on their UTC wall
  time, as ``date-truncation`` does).

``output`` chooses what a value becomes: ``label`` (default; a string) or
``lower`` (the bucket's lower bound in a number type, or the period's first
day in the input's type). Labels: integer buckets of integers are written
inclusive, ``"30-39"``; buckets of floats half-open, ``"[0.5, 1)"``; the open
ends of ``edges`` as ``"<0"`` and ``">=65"``; periods as ``"2020"``,
``"2020-Q2"``, ``"2020-05"`` and ISO weeks ``"2020-W07"``. Numbers are
written as Arrow casts them to text (the core does it, so every engine gives
the same text). NaN and infinities fall in no bucket: they become null. The
work is numpy and pyarrow kernels over the whole batch (``floor_divide``,
``searchsorted``, ``take``, ``floor_temporal``, ``strftime``).

>>> import pyarrow as pa
>>> from cape_pipelines.transforms.base import ColumnContext
>>> Bucket(width=10).apply(pa.array([37, None, -1]), ColumnContext("age")).to_pylist()
['30-39', None, '-10--1']
>>> Bucket(edges=[18, 65]).apply(pa.array([17, 18, 70]), ColumnContext("age")).to_pylist()
['<18', '18-64', '>=65']
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import field_validator, model_validator

from ..errors import TransformError
from .base import ColumnContext, ColumnTransformation, SqlArg, SqlFunction, sql_number

Number = int | float

_LABEL_FORMATS = {"year": "%Y", "month": "%Y-%m", "week": "%G-W%V"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(values: np.ndarray) -> pa.Array:
    return pa.array(values).cast(pa.string())


class Bucket(ColumnTransformation):
    """Numbers into fixed-width or explicit buckets, dates into weeks, months, quarters, years."""

    type_name: ClassVar[str] = "bucket"
    sql_functions: ClassVar[tuple[SqlFunction, ...]] = (
        SqlFunction(
            "bucket",
            (
                SqlArg("width", convert=sql_number),
                SqlArg("origin", convert=sql_number, required=False),
            ),
            pa.string(),
        ),
        SqlFunction("bucket_date", (SqlArg("unit"),), pa.string()),
    )

    width: Number | None = None
    origin: Number = 0
    edges: list[Number] | None = None
    labels: list[str] | None = None
    unit: Literal["week", "month", "quarter", "year"] | None = None
    output: Literal["label", "lower"] = "label"

    @field_validator("width")
    @classmethod
    def _positive(cls, value: Number | None) -> Number | None:
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError("width must be a positive number")
        return value

    @field_validator("edges")
    @classmethod
    def _ascending(cls, value: list[Number] | None) -> list[Number] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("edges needs at least one edge")
        if not all(math.isfinite(e) for e in value):
            raise ValueError("edges must be finite numbers")
        if any(b <= a for a, b in pairwise(value)):
            raise ValueError("edges must be strictly ascending")
        return value

    @model_validator(mode="after")
    def _one_form(self) -> Bucket:
        given = [k for k in ("width", "edges", "unit") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("bucket takes exactly one of width, edges or unit")
        if self.labels is not None:
            if self.edges is None:
                raise ValueError("labels go with edges")
            if len(self.labels) != len(self.edges) + 1:
                raise ValueError(
                    f"{len(self.edges)} edges make {len(self.edges) + 1} buckets, "
                    f"but {len(self.labels)} labels are given"
                )
        return self

    def _integral(self, input_type: pa.DataType) -> bool:
        """Whether buckets are integer ranges (integer column, integer width/origin/edges)."""
        if not pa.types.is_integer(input_type):
            return False
        if self.width is not None:
            return _is_int(self.width) and _is_int(self.origin)
        return all(_is_int(e) for e in self.edges or [])

    def output_type(self, input_type: pa.DataType, column: str) -> pa.DataType:
        if self.unit is not None:
            if not (pa.types.is_date(input_type) or pa.types.is_timestamp(input_type)):
                raise self.refuse(column, input_type, "a date or timestamp column (unit)")
            return pa.string() if self.output == "label" else input_type
        if not (pa.types.is_integer(input_type) or pa.types.is_floating(input_type)):
            raise self.refuse(column, input_type, "an integer or float column (width or edges)")
        if self.output == "label":
            return pa.string()
        return pa.int64() if self._integral(input_type) else pa.float64()

    def apply(self, array: pa.Array, ctx: ColumnContext) -> pa.Array:
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        if self.unit is not None:
            return self._periods(array)
        valid = array.is_valid()
        if self._integral(array.type):
            values = self._int64(array)
            finite = np.ones(len(values), dtype=bool)
        else:
            values = array.cast(pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False)
            finite = np.isfinite(values)
            values = np.where(finite, values, 0.0)
        keep = np.asarray(valid.to_numpy(zero_copy_only=False), dtype=bool) & finite
        if self.width is not None:
            out = self._fixed(values, array.type)
        else:
            out = self._edges(values, array.type)
        return pc.if_else(pa.array(keep), out, pa.scalar(None, out.type))

    @staticmethod
    def _int64(array: pa.Array) -> np.ndarray:
        if pa.types.is_uint64(array.type):
            top = pc.max(array).as_py()
            if top is not None and top >= 1 << 63:
                raise TransformError("bucket takes uint64 values only below 2**63")
        values: np.ndarray = array.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
        return values

    def _fixed(self, values: np.ndarray, input_type: pa.DataType) -> pa.Array:
        width, origin = self.width, self.origin
        assert width is not None
        if self._integral(input_type):
            # Exact int64 arithmetic, checked first: numpy would wrap silently.
            if len(values):
                lo, hi = int(values.min()), int(values.max())
                far = max(abs(lo - origin), abs(hi - origin)) + abs(origin) + 2 * int(width)
                if far >= 1 << 63:
                    raise TransformError(
                        "values too close to the int64 limits to bucket with this width/origin"
                    )
            w, o = np.int64(width), np.int64(origin)
            lower = (values - o) // w * w + o
            if self.output == "lower":
                return pa.array(lower, pa.int64())
            upper = lower + (w - 1)
            return pc.binary_join_element_wise(_text(lower), _text(upper), "-")
        lower_f = np.floor((values - origin) / width) * width + origin
        if self.output == "lower":
            return pa.array(lower_f, pa.float64())
        upper_f = lower_f + width
        return pc.binary_join_element_wise("[", _text(lower_f), ", ", _text(upper_f), ")", "")

    def _edges(self, values: np.ndarray, input_type: pa.DataType) -> pa.Array:
        edges = self.edges
        assert edges is not None
        integral = self._integral(input_type)
        edge_array = np.array(edges, dtype=np.int64 if integral else np.float64)
        index = np.searchsorted(edge_array, values, side="right")
        if self.output == "lower":
            bounds = pa.array([None, *edges], pa.int64() if integral else pa.float64())
            return pc.take(bounds, pa.array(index))
        return pc.take(pa.array(self._edge_labels(integral), pa.string()), pa.array(index))

    def _edge_labels(self, integral: bool) -> list[str]:
        if self.labels is not None:
            return list(self.labels)
        edges = self.edges or []
        text = _text(np.array(edges, dtype=np.int64 if integral else np.float64)).to_pylist()
        labels = [f"<{text[0]}"]
        for i in range(len(edges) - 1):
            if integral:
                labels.append(f"{text[i]}-{int(edges[i + 1]) - 1}")
            else:
                labels.append(f"[{text[i]}, {text[i + 1]})")
        labels.append(f">={text[-1]}")
        return labels

    def _periods(self, array: pa.Array) -> pa.Array:
        t = array.type
        naive = array
        if pa.types.is_timestamp(t) and t.tz is not None:
            # UTC wall time: local flooring raises on every DST change.
            naive = array.cast(pa.timestamp(t.unit))
        try:
            if self.output == "lower":
                floored = pc.floor_temporal(naive, unit=self.unit, week_starts_monday=True)
                return floored.cast(t) if floored.type != t else floored
            if self.unit == "quarter":
                return pc.binary_join_element_wise(
                    pc.strftime(naive, format="%Y"),
                    pc.cast(pc.quarter(naive), pa.string()),
                    "-Q",
                )
            assert self.unit is not None
            return pc.strftime(naive, format=_LABEL_FORMATS[self.unit])
        except pa.ArrowInvalid as exc:
            raise TransformError(f"bucketing dates by {self.unit} failed: {exc}") from None
