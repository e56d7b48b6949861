"""Rounding: ``numeric-rounding`` (half to even) and ``date-truncation``, on pyarrow kernels.

cape-python rounded half-to-even on pandas but half-up on Spark; here both
families are one pyarrow kernel call each (``pc.round`` with
``round_mode="half_to_even"`` and ``pc.floor_temporal``), so every engine gets
the same bytes and the cost stays close to the bare kernel's (one extra
``min_max`` pass for truncation); the slower guards run only where the kernel
alone would be wrong or would fail.

Decisions:

* ``numeric-rounding`` of a float gives exactly what decimal arithmetic gives:
  the float's exact binary value rounded half to even at ``precision``, then
  the nearest value of the column's float type. ``pc.round`` alone does not
  (it scales by a power of ten in floating point: ``-980397061323.76`` to
  ``-12`` digits came out ``-999999995904.0``, and ties near ``5e11`` were off
  by a cent), so :func:`_round_floats` uses it nowhere: a numpy fast path
  handles every value whose result it can prove exact (scaled value below
  2**52 and not within its rounding error of a tie, powers of ten exact up to
  10**22), and Python's :mod:`decimal` computes the rest exactly. A float with
  no digits beyond ``precision`` is unchanged because rounding leaves it so,
  never because it is large; at ``precision <= -309`` every float64 rounds to
  zero. Integers with ``precision >= 0`` are unchanged; with a negative
  precision they round to tens, hundreds, ... A result beyond the type's range
  (``126`` as int8 to tens is ``130``; ``1.7e308`` to ``-308`` is ``2e308``) is
  a :class:`TransformError`. Decimals round in their own type.
* ``date-truncation`` truncates timestamps with a time zone on their **UTC**
  wall time, as cape-python did: Arrow's local-time flooring raises on every
  ambiguous or non-existent local time (each DST change), which a pipeline
  cannot afford. Truncating a date to ``hour``, ``minute`` or ``second``
  leaves it unchanged. Values whose truncation falls outside the type's range
  (the first months of ``timestamp[ns]``, before 1678) are a
  :class:`TransformError`.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import field_validator

from ..errors import TransformError
from . import _prf
from .base import CapeDType, ColumnContext, ColumnTransformation, SqlArg, SqlFunction

# Largest power of ten a float64 holds exactly (5**22 < 2**53).
_EXACT_POW10 = 22
_TWO52 = float(1 << 52)
# Enough digits for any float64 (at most 767 significant) quantized at |precision| <= 400.
_DECIMAL = Context(prec=1200, Emax=100_000, Emin=-100_000, rounding=ROUND_HALF_EVEN)


def _exact_round(x: float, precision: int) -> Decimal:
    """``x``'s exact value rounded half to even at ``precision`` digits (a Decimal, exact)."""
    return Decimal(x).quantize(Decimal((0, (1,), -precision)), context=_DECIMAL)


def _nearest(value: Decimal, dtype: np.dtype) -> Any:
    """The value of float ``dtype`` nearest to ``value``, ties to even (IEEE round to nearest)."""
    if dtype == np.float64:
        return float(value)  # Decimal -> float is correctly rounded
    info = np.finfo(dtype)
    top = Decimal(float(info.max))
    below_top = Decimal(float(np.nextafter(info.max, dtype.type(0), dtype=dtype)))
    if abs(value) >= top + (top - below_top) / 2:
        return dtype.type(np.inf if value > 0 else -np.inf)
    guess = dtype.type(float(value))
    candidates = [
        guess,
        np.nextafter(guess, dtype.type(-np.inf), dtype=dtype),
        np.nextafter(guess, dtype.type(np.inf), dtype=dtype),
    ]
    candidates = [c for c in candidates if np.isfinite(c)]

    def rank(c: Any) -> tuple[Decimal, int]:
        odd = int(np.array(c, dtype).view(f"u{dtype.itemsize}")) & 1
        return abs(Decimal(float(c)) - value), odd

    best = min(candidates, key=rank)
    if best == 0:
        best = dtype.type(-0.0) if value.is_signed() else dtype.type(0.0)
    return best


# Values per numpy pass of the float rounding: its float64 temporaries stay at 64 KiB,
# under glibc's 128 KiB mmap threshold. Larger ones are mapped and unmapped by every
# numpy call where that threshold is fixed, as in Dask's worker processes (Dask sets
# MALLOC_TRIM_THRESHOLD_): 125,000-value batches took 4-5x their time there.
_FLOAT_CHUNK = 8192


def _round_floats(values: np.ndarray, precision: int) -> np.ndarray:
    """Round float ``values`` (any float dtype, no nulls) exactly; same dtype out.

    Each value is rounded on its own, so the work is done :data:`_FLOAT_CHUNK`
    values at a time into one output array.
    """
    if len(values) <= _FLOAT_CHUNK:
        return _round_float_chunk(values, precision)
    out = np.empty(len(values), values.dtype)
    for start in range(0, len(values), _FLOAT_CHUNK):
        stop = start + _FLOAT_CHUNK
        out[start:stop] = _round_float_chunk(values[start:stop], precision)
    return out


def _round_float_chunk(values: np.ndarray, precision: int) -> np.ndarray:
    """:func:`_round_floats` for one pass.

    Every value is computed in float64 (which holds float16/32 values exactly)
    as the nearest float64 to the exactly rounded decimal, then narrowed to the
    column's type; a float64 lying exactly on a narrower type's rounding
    boundary is recomputed exactly, since narrowing it would round twice.
    """
    dtype = values.dtype
    x = values.astype(np.float64)
    mag = np.abs(x)
    out = x.copy()
    slow = np.zeros(x.shape, dtype=bool)
    back: Any = np.multiply  # undoes the scaling: x / 10**q -> N * 10**q, x * 10**p -> N / 10**p
    with np.errstate(all="ignore"):
        finite = np.isfinite(x)
        if precision >= 0:
            # No binary digit below 10**-precision's place: x * 10**p is an integer,
            # so the rounding is x itself. Or the rounding moves x by less than half
            # the gap to its neighbours, so the nearest float to the result is x.
            gap = np.spacing(mag)
            keep = (gap >= 2.0**-precision) | (10.0**-precision * 1.0001 < gap / 2)
            todo = finite & ~keep
            if precision <= _EXACT_POW10:
                scale = 10.0**precision
                y = x * scale
                back = np.true_divide
        else:
            q = -precision
            if q <= _EXACT_POW10:
                todo = finite.copy()
                scale = 10.0**q
                y = x / scale
                back = np.multiply
            else:
                # |x| below half of 10**q rounds to a signed zero; beyond float64's
                # range (q >= 309) that is every finite value.
                half = 0.4999 * 10.0**q if q <= 308 else np.inf
                zero = finite & (mag < half)
                out[zero] = np.copysign(0.0, x[zero])
                todo = finite & ~zero
        if abs(precision) <= _EXACT_POW10:
            # y is x scaled, off the exact product by at most half an ulp of y, which
            # is at most half of spacing(|y|): rint(y) is the exact rounding unless a
            # tie (a half-integer) lies within spacing(|y|) of y. frac is exact below 2**52.
            frac = y - np.floor(y)
            sure = (np.abs(y) < _TWO52) & (np.abs(frac - 0.5) > np.spacing(np.abs(y)))
            fast = todo & sure
            out[fast] = back(np.rint(y[fast]), scale)
            slow = todo & ~sure
        else:
            slow = todo
    for i in np.flatnonzero(slow):
        out[i] = float(_exact_round(float(x[i]), precision))
    if dtype == np.float64:
        return out
    with np.errstate(all="ignore"):
        narrow = out.astype(dtype)
        wide = narrow.astype(np.float64)
        toward = np.nextafter(narrow, np.where(out > wide, np.inf, -np.inf).astype(dtype))
        midpoint = (wide + toward.astype(np.float64)) / 2
        boundary = (out != wide) & np.isfinite(out) & (out == midpoint)
        info = np.finfo(dtype)
        top = float(info.max)
        edge = top + (top - float(np.nextafter(info.max, dtype.type(0), dtype=dtype))) / 2
        boundary |= np.abs(out) == edge
    for i in np.flatnonzero(boundary & finite):
        narrow[i] = _nearest(_exact_round(float(x[i]), precision), dtype)
    return narrow


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
        elif pa.types.is_floating(t):
            result = self._round_float(array)
        else:
            result = self._round_decimal(array)
        return _cast_to_dtype(result, out_type)

    def _round_decimal(self, array: pa.Array) -> pa.Array:
        whole_digits = array.type.precision - array.type.scale
        if -self.precision >= whole_digits:
            # Arrow refuses a power of ten the type cannot hold, whatever the data.
            # Every value is below 10**whole_digits, so it rounds to 0, or (more
            # than half of it) to 10**whole_digits, which the type cannot hold.
            lo_hi = pc.min_max(array)
            lo, hi = lo_hi["min"].as_py(), lo_hi["max"].as_py()
            step = Decimal(10) ** -self.precision
            if lo is not None and max(-lo, hi) * 2 > step:
                raise self._overflow(array.type)
            zeros = pa.array([0] * len(array), pa.int8()).cast(array.type)
            return pc.if_else(array.is_valid(), zeros, pa.scalar(None, array.type))
        if self.precision >= array.type.scale:
            return array
        try:
            result = pc.round(array, self.precision, round_mode="half_to_even")
        except pa.ArrowInvalid:
            raise self._overflow(array.type) from None
        # pyarrow 25 reports a result that does not fit only when it is the last
        # value of the array; before that it silently writes 0. A correct rounding
        # moves no value by more than half a step, so anything else overflowed.
        moved = pc.abs(pc.subtract(result, array))
        scale = max(self.precision + 1, 0)
        digits = max(-self.precision, scale, 1)
        half_step = pa.scalar(
            Decimal(5).scaleb(-self.precision - 1),
            (pa.decimal128 if digits <= 38 else pa.decimal256)(digits, scale),
        )
        if pc.any(pc.greater(moved, half_step)).as_py():
            raise self._overflow(array.type)
        return result

    def _round_int(self, array: pa.Array) -> pa.Array:
        if self.precision >= 0:
            return array
        scale = 10 ** (-self.precision)
        info = np.iinfo(_prf.numpy_dtype(array.type))
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
        np_type = _prf.numpy_dtype(array.type)
        values = array.fill_null(0).to_numpy(zero_copy_only=False).astype(np_type, copy=False)
        rounded = _round_floats(values, self.precision)
        if bool((np.isinf(rounded) & np.isfinite(values)).any()):
            raise self._overflow(array.type)
        mask = array.is_null().to_numpy(zero_copy_only=False) if array.null_count else None
        return pa.array(rounded, type=array.type, mask=mask)

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
