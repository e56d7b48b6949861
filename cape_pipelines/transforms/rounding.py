"""Rounding: ``numeric-rounding`` (half to even) and ``date-truncation``, on pyarrow kernels.

cape-python rounded half-to-even on pandas but half-up on Spark; here both
families are one pyarrow kernel call each (``pc.round`` with
``round_mode="half_to_even"`` and ``pc.floor_temporal``), so every engine gets
the same bytes and the cost stays close to the bare kernel's (one extra
``min_max`` pass for truncation); the slower guards run only where the kernel
alone would be wrong or would fail.

Decisions:

* ``numeric-rounding`` rounds exactly as ``pc.round(x, precision,
  round_mode="half_to_even")``. Integers with ``precision >= 0`` are unchanged;
  with a negative precision they round to tens, hundreds, ... A float too large
  to have digits at ``precision`` is returned unchanged (the kernel does the
  same, except that it raises when scaling overflows). A result beyond the
  type's range (``126`` as int8 to tens is ``130``) is a :class:`TransformError`.
  float16 is rounded as float32. Decimals round in their own type.
* ``date-truncation`` truncates timestamps with a time zone on their **UTC**
  wall time, as cape-python did: Arrow's local-time flooring raises on every
  ambiguous or non-existent local time (each DST change), which a pipeline
  cannot afford. Truncating a date to ``hour``, ``minute`` or ``second``
  leaves it unchanged. Values whose truncation falls outside the type's range
  (the first months of ``timestamp[ns]``, before 1678) are a
  :class:`TransformError`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import field_validator

from ..errors import TransformError
from . import _prf
from .base import CapeDType, ColumnContext, ColumnTransformation, SqlArg, SqlFunction

_MANTISSA_BITS = {16: 10, 32: 23, 64: 52}


def _cast_to_dtype(result: pa.Array, out_type: pa.DataType) -> pa.Array:
    if result.type.equals(out_type):
        return result
    try:
        return result.cast(out_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise TransformError(f"cannot cast the rounded values to dtype {out_type}: {exc}") from None


class NumericRounding(ColumnTransformation):
    """Round numbers to ``precision`` decimal digits, half to even (negative: tens, hundreds...).

    >>> t = NumericRounding(precision=1)
    >>> t.apply(pa.array([0.25, 0.35, None]), ColumnContext("x")).to_pylist()
    [0.2, 0.4, None]
    """

    type_name: ClassVar[str] = "numeric-rounding"
    sql_functions: ClassVar[tuple[SqlFunction, ...]] = (
        SqlFunction("round", (SqlArg("precision", convert=int),), pa.float64()),
        SqlFunction("round_long", (SqlArg("precision", convert=int),), pa.int64()),
    )

    precision: int
    dtype: CapeDType | None = None

    @field_validator("precision", mode="before")
    @classmethod
    def _check_precision(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, not {type(value).__name__}")
        if abs(value) > 400:
            raise ValueError("must be between -400 and 400")
        return value

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: CapeDType | None) -> CapeDType | None:
        if value in (CapeDType.String, CapeDType.Date):
            raise ValueError(f"dtype must be numeric, not {value.value}")
        return value

    def output_type(self, input_type: pa.DataType, column: str) -> pa.DataType:
        if not (
            pa.types.is_integer(input_type)
            or pa.types.is_floating(input_type)
            or pa.types.is_decimal(input_type)
        ):
            raise self.refuse(column, input_type, "a numeric column (integer, float or decimal)")
        return self.dtype.arrow() if self.dtype is not None else input_type

    def apply(self, array: pa.Array, ctx: ColumnContext) -> pa.Array:
        out_type = self.output_type(array.type, ctx.column)
        t = array.type
        if pa.types.is_integer(t):
            result = self._round_int(array)
        elif pa.types.is_float16(t):
            result = self._round_float(array.cast(pa.float32())).cast(t)
        elif pa.types.is_floating(t):
            result = self._round_float(array)
        else:
            try:
                result = pc.round(array, self.precision, round_mode="half_to_even")
            except pa.ArrowInvalid as exc:
                raise TransformError(f"rounding to {self.precision} digits failed: {exc}") from None
        return _cast_to_dtype(result, out_type)

    def _round_int(self, array: pa.Array) -> pa.Array:
        if self.precision >= 0:
            return array
        scale = 10 ** (-self.precision)
        info = np.iinfo(array.type.to_pandas_dtype())
        if scale > info.max:
            # Arrow refuses a power of ten the type cannot hold. Its only
            # representable multiple is 0: values up to half of it round to 0
            # (half to even), any larger one would round out of range.
            lo_hi = pc.min_max(array)
            lo, hi = lo_hi["min"].as_py(), lo_hi["max"].as_py()
            if lo is not None and max(-lo, hi) > scale // 2:
                raise self._overflow(array.type)
            return pc.multiply(array, pa.scalar(0, array.type))
        try:
            return pc.round(array, self.precision, round_mode="half_to_even")
        except pa.ArrowInvalid:
            raise self._overflow(array.type) from None

    def _round_float(self, array: pa.Array) -> pa.Array:
        try:
            return pc.round(array, self.precision, round_mode="half_to_even")
        except pa.ArrowInvalid:
            pass
        # The kernel raises when scaling a value by 10**precision overflows. A
        # value whose scaled magnitude reaches 2**mantissa already has no
        # digits to drop, and the kernel returns such values unchanged; do the
        # same for the overflowing ones and let the kernel round the rest.
        magnitude = pc.abs(array.cast(pa.float64()))
        p = self.precision
        scaled = pc.multiply(magnitude, 10.0**p) if p >= 0 else pc.divide(magnitude, 10.0**-p)
        limit = float(1 << _MANTISSA_BITS[array.type.bit_width])
        unchanged = pc.fill_null(pc.greater_equal(scaled, limit), False)
        rest = pc.if_else(unchanged, pa.scalar(0, array.type), array)
        try:
            rounded = pc.round(rest, p, round_mode="half_to_even")
        except pa.ArrowInvalid:
            raise self._overflow(array.type) from None
        return pc.if_else(unchanged, array, rounded)

    def _overflow(self, typ: pa.DataType) -> TransformError:
        return TransformError(
            f"rounding to {self.precision} digits gives values beyond the range of {typ}"
        )


_TRUNCATION_UNITS = ("year", "month", "day", "hour", "minute", "second")
_PERIOD_SECONDS = {
    "year": 366 * 86_400,
    "month": 31 * 86_400,
    "day": 86_400,
    "hour": 3_600,
    "minute": 60,
    "second": 1,
}
_UNITS_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
# 0001-01-01 and 10000-01-01 as days since 1970-01-01; inside these the kernel is exact.
_FIRST_DAY = -719_162
_END_DAY = 2_932_897
# For nanoseconds: 1678-01-01, the first year whose start the ns range can hold.
_NS_FIRST_DAY = -106_650


class DateTruncation(ColumnTransformation):
    """Truncate dates and timestamps to the start of their year, month, day, hour, minute or second.

    >>> import datetime as dt
    >>> t = DateTruncation(frequency="Month")
    >>> t.apply(pa.array([dt.date(2020, 5, 17)]), ColumnContext("d")).to_pylist()
    [datetime.date(2020, 5, 1)]
    """

    type_name: ClassVar[str] = "date-truncation"
    sql_functions: ClassVar[tuple[SqlFunction, ...]] = (
        SqlFunction("truncate_date", (SqlArg("frequency"),), pa.date32()),
        SqlFunction("truncate_timestamp", (SqlArg("frequency"),), pa.timestamp("us", tz="UTC")),
    )

    frequency: str

    @field_validator("frequency", mode="before")
    @classmethod
    def _check_frequency(cls, value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, not {type(value).__name__}")
        unit = value.lower()
        if unit not in _TRUNCATION_UNITS:
            raise ValueError(f"unknown frequency {value!r}; one of {', '.join(_TRUNCATION_UNITS)}")
        return unit

    def output_type(self, input_type: pa.DataType, column: str) -> pa.DataType:
        if pa.types.is_date(input_type) or pa.types.is_timestamp(input_type):
            return input_type
        raise self.refuse(column, input_type, "a date or timestamp column")

    def apply(self, array: pa.Array, ctx: ColumnContext) -> pa.Array:
        out_type = self.output_type(array.type, ctx.column)
        t = array.type
        work = array
        if pa.types.is_timestamp(t) and t.tz is not None:
            work = array.view(pa.timestamp(t.unit))
        if pa.types.is_date32(t):
            per_day, low, high = 1, -(1 << 31), (1 << 31) - 1
            units_per_second = None
        else:
            unit = "ms" if pa.types.is_date64(t) else t.unit
            units_per_second = _UNITS_PER_SECOND[unit]
            per_day = 86_400 * units_per_second
            low, high = -(1 << 63), (1 << 63) - 1
        safe_low = max(_FIRST_DAY * per_day, low)
        if pa.types.is_timestamp(t) and t.unit == "ns":
            # Truncating anything before 1678 to its year would leave the ns range.
            safe_low = _NS_FIRST_DAY * per_day
        safe_high = min(_END_DAY * per_day - 1, high)
        bounds = pc.min_max(work.view(pa.int32() if pa.types.is_date32(t) else pa.int64()))
        lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
        out = pc.floor_temporal(work, unit=self.frequency)
        if lo is not None and (lo < safe_low or hi > safe_high):
            period = _PERIOD_SECONDS[self.frequency]
            period_units = (
                max(period // 86_400, 1) if units_per_second is None else period * units_per_second
            )
            self._check_outliers(work, out, period_units)
        if not out.type.equals(out_type):
            out = out.view(out_type)
        return out

    def _check_outliers(self, work: pa.Array, out: pa.Array, period: int) -> None:
        """Raise where the kernel wrapped around: a floor must be <= the value and close to it."""
        before = _prf.values_view(work).astype(np.int64)
        after = _prf.values_view(out).astype(np.int64)
        with np.errstate(over="ignore"):
            gap = before - after
        bad = (after > before) | (gap < 0) | (gap >= period)
        if work.null_count:
            bad &= work.is_valid().to_numpy(zero_copy_only=False)
        if bad.any():
            raise TransformError(
                f"{int(bad.sum())} value(s) cannot be truncated to {self.frequency}: "
                "the result lies outside the range the column's type can hold"
            )
