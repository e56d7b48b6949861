"""Perturbation: ``numeric-perturbation`` and ``date-perturbation``, with deterministic noise.

cape-python drew noise from a seeded random stream, so the output depended on
row order, partitioning and the engine. Here the noise is a keyed
pseudo-random function (see :mod:`._prf`) of the transformation's key, the
column name, and the value of the ``context`` column if one is given, else the
cell's own value. The same input therefore gives the same bytes however it is
batched, ordered or retried; with ``context: patient_id`` every row of one
patient moves by the same amount. The key is ``key`` if given, else one derived
from ``seed``, else a random key made once per run.

Edge cases, decided once for every engine:

* Integer columns stay integers: the noise is an integer ``n`` with
  ``min <= n < max``, i.e. uniform over ``[ceil(min), ceil(max))``; a range
  holding no integer is refused at plan time. Float columns get uniform
  float noise in ``[min, max)`` computed in float64.
* Results beyond the type's range saturate at its ends (integers and
  timestamps); a finite float stays finite (clamped to the largest finite
  value). NaN, infinities and nulls pass through unchanged.
* Decimal columns are refused unless ``dtype`` names a numeric type; they are
  then cast to it first (as is any input when ``dtype`` is set: a value that
  does not fit the ``dtype`` is an error, not a silent truncation).
* ``date-perturbation`` of a date column floors the total shift to whole days
  (cape-python added the shift to midnight and took the date), so sub-day
  frequencies move a date by whole days only, never by a fraction of one.
* A null ``context`` value is a value of its own: all such rows share a shift.

Why one module of about 500 lines: the two transformations share the keyed
noise, the saturating arithmetic and the edge-case rules above, which are
decided once here for both; splitting them would separate a rule from the
code that keeps it.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import PrivateAttr, field_validator, model_validator

from ..errors import TransformError
from ..keys import KeyRef, KeyResolver, parse_key_ref
from . import _prf
from .base import (
    CapeDType,
    ColumnContext,
    ColumnTransformation,
    SqlArg,
    SqlFunction,
    seed_key,
    sql_number,
)

_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1


def _strict_number(value: Any, what: str = "a number (int or float)") -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be {what}, not {type(value).__name__}")
    return value


def _strict_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, not {type(value).__name__}")
    return value


class _Perturbation(ColumnTransformation):
    """What both perturbations share: ``seed``/``key`` handling and the ``context`` column."""

    seed: int | None = None
    key: KeyRef | None = None
    context: str | None = None

    purpose: ClassVar[str] = ""

    @field_validator("seed", mode="before")
    @classmethod
    def _check_seed(cls, value: Any) -> Any:
        return None if value is None else _strict_int(value)

    @field_validator("key", mode="before")
    @classmethod
    def _parse_key(cls, value: Any) -> KeyRef | None:
        return None if value is None else parse_key_ref(value)

    @field_validator("context")
    @classmethod
    def _check_context(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise ValueError("context must name a column")
        return value

    @model_validator(mode="after")
    def _seed_or_key(self) -> _Perturbation:
        if self.seed is not None and self.key is not None:
            raise ValueError("give seed or key, not both")
        return self

    def resolve_key(self, resolver: KeyResolver) -> bytes:
        """``key`` if given, else a key derived from ``seed``, else the run's random key."""
        if self.key is not None:
            return resolver.resolve(self.key)
        if self.seed is not None:
            return seed_key(self.seed)
        return resolver.run_key()

    def context_columns(self) -> list[str]:
        return [self.context] if self.context is not None else []

    def _words(self, array: pa.Array, ctx: ColumnContext, outputs: int) -> list[np.ndarray]:
        """``outputs`` pseudo-random uint64 words per row (see :func:`._prf.prf_words`)."""
        if ctx.key is None:
            raise TransformError(f"{self.type_name} has no resolved key")
        source, null_tag = array, False
        if self.context is not None:
            if ctx.batch is None or self.context not in ctx.batch.schema.names:
                raise TransformError(f"context column {self.context!r} is not in the batch")
            source, null_tag = ctx.batch.column(self.context), True
        memo = (
            "prf-key",
            self.purpose,
            ctx.column,
            hashlib.sha256(ctx.key).digest(),
        )
        aes_key = ctx.state.get(memo)
        if aes_key is None:
            aes_key = _prf.derive_key(ctx.key, ctx.column, self.purpose)
            ctx.state[memo] = aes_key
        return _prf.prf_words(aes_key, _prf.encode(source, null_tag=null_tag), outputs)


def _rebuild(arr: pa.Array, values: np.ndarray, out_type: pa.DataType) -> pa.Array:
    """An array of ``out_type`` holding ``values`` and ``arr``'s validity (nulls stay null)."""
    n = len(arr)
    values = np.ascontiguousarray(values)
    if arr.null_count == 0:
        return pa.Array.from_buffers(out_type, n, [None, pa.py_buffer(values)], 0)
    validity = arr.buffers()[0]
    if arr.offset == 0:
        return pa.Array.from_buffers(out_type, n, [validity, pa.py_buffer(values)], arr.null_count)
    # The validity bitmap starts at arr.offset, so the data must start there too.
    padded = np.zeros(arr.offset + n, dtype=values.dtype)
    padded[arr.offset :] = values
    return pa.Array.from_buffers(
        out_type, n, [validity, pa.py_buffer(padded)], arr.null_count, arr.offset
    )


def _add_int64_saturating(
    values: np.ndarray, shift: np.ndarray, low: int, high: int, max_shift: int
) -> np.ndarray:
    """``values + shift`` in int64, saturated to [low, high]; the slow path only near the ends."""
    if len(values) == 0:
        return shift
    vmax = int(values.max())
    vmin = int(values.min())
    if vmax + max_shift <= high and vmin - max_shift >= low:
        # No sum can leave [low, high]: add in place, without temporaries.
        return np.add(values, shift, out=shift)
    with np.errstate(over="ignore"):
        out = values + shift
    wrapped = ((values ^ out) & (shift ^ out)) < 0
    if wrapped.any():
        out[wrapped] = np.where(shift[wrapped] > 0, np.int64(high), np.int64(low))
    np.clip(out, low, high, out=out)
    return out


class NumericPerturbation(_Perturbation):
    """Add keyed pseudo-random noise in ``[min, max)`` to a numeric column.

    >>> t = NumericPerturbation(min=-10, max=10, seed=7)
    >>> t.output_type(pa.int64(), "age")
    DataType(int64)
    """

    type_name: ClassVar[str] = "numeric-perturbation"
    purpose: ClassVar[str] = "numeric-perturbation"
    sql_functions: ClassVar[tuple[SqlFunction, ...]] = tuple(
        SqlFunction(
            name,
            (
                SqlArg("key", role="key"),
                SqlArg("min", convert=sql_number),
                SqlArg("max", convert=sql_number),
                SqlArg("column", role="column", required=False),
            ),
            returns,
        )
        for name, returns in (("perturb_number", pa.float64()), ("perturb_number_long", pa.int64()))
    )

    min: int | float
    max: int | float
    dtype: CapeDType | None = None

    @field_validator("min", "max", mode="before")
    @classmethod
    def _check_number(cls, value: Any) -> Any:
        value = _strict_number(value)
        if not math.isfinite(value):
            raise ValueError("must be finite")
        return value

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: CapeDType | None) -> CapeDType | None:
        if value in (CapeDType.String, CapeDType.Date):
            raise ValueError(f"dtype must be numeric, not {value.value}")
        return value

    @model_validator(mode="after")
    def _check_range(self) -> NumericPerturbation:
        if not self.min < self.max:
            raise ValueError(f"min ({self.min}) must be less than max ({self.max})")
        if not math.isfinite(float(self.max) - float(self.min)):
            raise ValueError("max - min must be a finite number")
        return self

    def _int_bounds(self) -> tuple[int, int]:
        """The integers the noise can take on an integer column: [lo, hi)."""
        return math.ceil(self.min), math.ceil(self.max)

    def output_type(self, input_type: pa.DataType, column: str) -> pa.DataType:
        numeric = pa.types.is_integer(input_type) or pa.types.is_floating(input_type)
        if pa.types.is_decimal(input_type) and self.dtype is None:
            raise self.refuse(
                column,
                input_type,
                "an integer or floating-point column (set dtype: Double to "
                "perturb a decimal column as float64)",
            )
        if not numeric and not pa.types.is_decimal(input_type):
            raise self.refuse(column, input_type, "an integer or floating-point column")
        out = self.dtype.arrow() if self.dtype is not None else input_type
        if pa.types.is_integer(out):
            lo, hi = self._int_bounds()
            if lo >= hi:
                raise self.refuse(
                    column,
                    out,
                    f"an integer in [min, max) = [{self.min}, {self.max}) for an "
                    "integer column (there is none)",
                )
            if lo < _I64_MIN or hi - 1 > _I64_MAX:
                raise self.refuse(column, out, "min and max within the 64-bit integer range")
        return out

    def apply(self, array: pa.Array, ctx: ColumnContext) -> pa.Array:
        out_type = self.output_type(array.type, ctx.column)
        if not array.type.equals(out_type):
            try:
                array = array.cast(out_type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise TransformError(f"cannot cast to dtype {out_type}: {exc}") from None
        words = self._words(array, ctx, 1)[0]
        values = _prf.values_view(array)
        if pa.types.is_floating(out_type):
            result = self._add_float(values, words)
        else:
            result = self._add_int(values, words, out_type)
        return _rebuild(array, result, out_type)

    def float_noise(self, words: np.ndarray) -> np.ndarray:
        """Noise for float columns: uniform float64 in [min, max)."""
        lo, hi = float(self.min), float(self.max)
        # (top 53 bits) * ((hi - lo) / 2**53) rounds once, like u * (hi - lo) with
        # u = top 53 bits / 2**53; doing it in place saves passes over the data.
        noise = np.right_shift(words, np.uint64(11)).astype(np.float64)
        noise *= (hi - lo) / float(1 << 53)
        noise += lo
        # Rounding in lo + u * (hi - lo) can land exactly on hi; keep it half-open.
        return np.minimum(noise, np.nextafter(hi, -math.inf), out=noise)

    def int_noise(self, words: np.ndarray) -> np.ndarray:
        """Noise for integer columns: uniform int64 over the integers in [min, max)."""
        lo, hi = self._int_bounds()
        picked = _prf.below(words, hi - lo)
        with np.errstate(over="ignore"):
            return (picked + np.uint64(lo & 0xFFFFFFFFFFFFFFFF)).view(np.int64)

    def _add_float(self, values: np.ndarray, words: np.ndarray) -> np.ndarray:
        total = self.float_noise(words)
        with np.errstate(all="ignore"):
            np.add(total, values, out=total)
            result = total if values.dtype == np.float64 else total.astype(values.dtype)
        overflowed = np.isinf(result)
        if overflowed.any():
            overflowed &= np.isfinite(values)
            biggest = np.finfo(values.dtype).max
            result[overflowed] = np.copysign(biggest, total[overflowed])
        return result

    def _add_int(self, values: np.ndarray, words: np.ndarray, out_type: pa.DataType) -> np.ndarray:
        noise = self.int_noise(words)
        lo, hi = self._int_bounds()
        info = np.iinfo(values.dtype)
        if values.dtype == np.uint64:
            return self._add_uint64(values, noise)
        if values.dtype == np.int64:
            reach = max(abs(lo), abs(hi - 1))
            return _add_int64_saturating(values, noise, info.min, info.max, reach)
        if lo < -(1 << 40) or hi > (1 << 40):
            # The type is at most 32 bits wide, so a larger shift saturates anyway;
            # clipping first keeps the int64 sum from wrapping.
            noise = np.clip(noise, -(1 << 40), 1 << 40)
        total = np.add(noise, values, out=noise)
        if len(values) and (
            int(values.min()) + lo < info.min or int(values.max()) + hi - 1 > info.max
        ):
            np.clip(total, info.min, info.max, out=total)
        return total.astype(values.dtype)

    @staticmethod
    def _add_uint64(values: np.ndarray, noise: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            total = values + noise.view(np.uint64)
        up = noise >= 0
        total[up & (total < values)] = np.iinfo(np.uint64).max
        total[~up & (total > values)] = 0
        return total


_FREQUENCY_SECONDS = {
    "YEAR": 365 * 86_400,
    "MONTH": 30 * 86_400,
    "DAY": 86_400,
    "HOUR": 3_600,
    "minutes": 60,
    "seconds": 1,
}
_FREQUENCY_BY_LOWER = {name.lower(): name for name in _FREQUENCY_SECONDS}
_UNITS_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_MAX_SHIFT_SECONDS = 1 << 62


class DatePerturbation(_Perturbation):
    """Shift dates and timestamps by keyed pseudo-random amounts of each ``frequency``.

    For each frequency ``f`` with bounds ``[min_f, max_f)`` an integer ``n_f`` is
    drawn (from its own PRF output) and the value moves by ``sum(n_f * f)``;
    ``YEAR`` is 365 days and ``MONTH`` 30 days, as in cape-python.

    >>> t = DatePerturbation(frequency=["DAY", "HOUR"], min=[-5, 0], max=[5, 24], seed=1)
    >>> t.frequencies
    ('DAY', 'HOUR')
    """

    type_name: ClassVar[str] = "date-perturbation"
    purpose: ClassVar[str] = "date-perturbation"
    sql_functions: ClassVar[tuple[SqlFunction, ...]] = tuple(
        SqlFunction(
            name,
            (
                SqlArg("key", role="key"),
                SqlArg("frequency"),
                SqlArg("min", convert=sql_number),
                SqlArg("max", convert=sql_number),
                SqlArg("column", role="column", required=False),
            ),
            returns,
        )
        for name, returns in (
            ("perturb_date", pa.date32()),
            ("perturb_timestamp", pa.timestamp("us", tz="UTC")),
        )
    )

    frequency: str | list[str]
    min: int | list[int]
    max: int | list[int]

    _frequencies: tuple[str, ...] = PrivateAttr()
    _mins: tuple[int, ...] = PrivateAttr()
    _maxs: tuple[int, ...] = PrivateAttr()

    @field_validator("frequency", mode="before")
    @classmethod
    def _check_frequency(cls, value: Any) -> Any:
        items = value if isinstance(value, list | tuple) else [value]
        if not items:
            raise ValueError("frequency must name at least one frequency")
        out = []
        for item in items:
            if not isinstance(item, str):
                raise ValueError(f"frequency must be a string, not {type(item).__name__}")
            name = _FREQUENCY_BY_LOWER.get(item.lower())
            if name is None:
                raise ValueError(
                    f"unknown frequency {item!r}; one of {', '.join(_FREQUENCY_SECONDS)}"
                )
            out.append(name)
        return out if isinstance(value, list | tuple) else out[0]

    @field_validator("min", "max", mode="before")
    @classmethod
    def _check_bounds(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return [_strict_int(v) for v in value]
        return _strict_int(value)

    @model_validator(mode="after")
    def _check_shape(self) -> DatePerturbation:
        freqs = self.frequency if isinstance(self.frequency, list) else [self.frequency]
        mins = self.min if isinstance(self.min, list) else [self.min]
        maxs = self.max if isinstance(self.max, list) else [self.max]
        if not len(freqs) == len(mins) == len(maxs):
            raise ValueError(
                f"frequency, min and max must have the same length "
                f"({len(freqs)}, {len(mins)}, {len(maxs)})"
            )
        reach = 0
        for f, lo, hi in zip(freqs, mins, maxs, strict=True):
            if not lo < hi:
                raise ValueError(f"min ({lo}) must be less than max ({hi}) for {f}")
            reach += max(abs(lo), abs(hi - 1)) * _FREQUENCY_SECONDS[f]
        if reach > _MAX_SHIFT_SECONDS:
            raise ValueError("the largest possible shift does not fit in 64-bit seconds")
        self._frequencies = tuple(freqs)
        self._mins = tuple(mins)
        self._maxs = tuple(maxs)
        return self

    @property
    def frequencies(self) -> tuple[str, ...]:
        """The frequencies, canonically spelled (``YEAR`` ... ``seconds``)."""
        return self._frequencies

    def max_shift_seconds(self) -> int:
        """The largest absolute shift this transformation can make, in seconds."""
        return sum(
            max(abs(lo), abs(hi - 1)) * _FREQUENCY_SECONDS[f]
            for f, lo, hi in zip(self._frequencies, self._mins, self._maxs, strict=True)
        )

    def output_type(self, input_type: pa.DataType, column: str) -> pa.DataType:
        if pa.types.is_date32(input_type):
            return input_type
        if pa.types.is_timestamp(input_type) or pa.types.is_date64(input_type):
            per = 1_000 if pa.types.is_date64(input_type) else _UNITS_PER_SECOND[input_type.unit]
            if self.max_shift_seconds() * per > _I64_MAX:
                raise self.refuse(
                    column,
                    input_type,
                    "a unit that can hold the largest shift (use a coarser unit or smaller bounds)",
                )
            return input_type
        raise self.refuse(column, input_type, "a date or timestamp column")

    def shift_seconds(self, words: list[np.ndarray]) -> np.ndarray:
        """The total shift of each row in seconds, from one PRF word per frequency."""
        return self._shift(words, 1)

    def _shift(self, words: list[np.ndarray], seconds_per_step: int) -> np.ndarray:
        """The total shift in steps of ``seconds_per_step`` (dividing each frequency exactly)."""
        total: np.ndarray | None = None
        for i, (f, lo, hi) in enumerate(
            zip(self._frequencies, self._mins, self._maxs, strict=True)
        ):
            picked = _prf.below(words[i], hi - lo).view(np.int64)
            picked += np.int64(lo)
            picked *= np.int64(_FREQUENCY_SECONDS[f] // seconds_per_step)
            if total is None:
                total = picked
            else:
                total += picked
        assert total is not None
        return total

    def shift_days(self, words: list[np.ndarray]) -> np.ndarray:
        """The total shift of each row in whole days, floored (for date columns)."""
        if all(_FREQUENCY_SECONDS[f] % 86_400 == 0 for f in self._frequencies):
            return self._shift(words, 86_400)
        return np.floor_divide(self._shift(words, 1), np.int64(86_400))

    def apply(self, array: pa.Array, ctx: ColumnContext) -> pa.Array:
        out_type = self.output_type(array.type, ctx.column)
        words = self._words(array, ctx, len(self._frequencies))
        values = _prf.values_view(array)
        reach = self.max_shift_seconds()
        if pa.types.is_date32(out_type):
            total = self.shift_days(words)
            total += values
            info = np.iinfo(np.int32)
            if len(values) and (
                int(values.min()) - reach // 86_400 - 1 < info.min
                or int(values.max()) + reach // 86_400 + 1 > info.max
            ):
                np.clip(total, info.min, info.max, out=total)
            result = total.astype(np.int32)
        elif pa.types.is_date64(out_type):
            shift = self.shift_days(words)
            shift *= np.int64(86_400_000)
            result = _add_int64_saturating(
                values, shift, _I64_MIN, _I64_MAX, (reach // 86_400 + 1) * 86_400_000
            )
        else:
            per = _UNITS_PER_SECOND[out_type.unit]
            shift = self._shift(words, 1)
            shift *= np.int64(per)
            # INT64_MIN is left out: pandas reads it as NaT.
            result = _add_int64_saturating(values, shift, _I64_MIN + 1, _I64_MAX, reach * per)
        return _rebuild(array, result, out_type)
