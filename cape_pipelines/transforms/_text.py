"""Per-distinct-value work and the canonical text of non-string values, for the token families.

Tokens are deterministic functions of a value, so the token transformations
work once per *distinct* value of a batch: :func:`distinct` splits an array
into its distinct values and one index per row (nulls stay null in the
indices), the caller computes one result per distinct value, and
:func:`gather_fixed_width` / :func:`gather_strings` put the results back in
row order with Arrow's vectorised ``take``. No Python runs per row.

Values that are not text are tokenized from a canonical text, defined here
once so that every engine gives the same token for the same value:

* strings (``string``, ``large_string``, ``string_view``, and dictionaries of
  them): the string itself;
* binary (``binary``, ``large_binary``, ``binary_view``, ``fixed_size_binary``):
  the raw bytes, not a text;
* integers of any width and sign: decimal digits with a leading ``-`` when
  negative (``str(int)``): ``-128``;
* booleans: ``true`` / ``false``;
* ``float64``: Python's ``repr`` — the shortest text that round-trips, e.g.
  ``1.0``, ``0.1``, ``1e+20``, ``-0.0`` (so ``-0.0`` and ``0.0`` differ),
  ``inf``, ``-inf``, and ``nan`` for every NaN; ``float32`` and ``float16``:
  the shortest decimal that round-trips at *their* precision, written in the
  same style (``float32(0.1)`` gives ``0.1``, not ``0.10000000149011612``);
* decimals: fixed-point with exactly the type's scale digits after the point
  (``decimal128(10, 2)`` 1.5 gives ``1.50``; scale 0 gives no point);
* dates (``date32``, ``date64``): ISO-8601 ``YYYY-MM-DD``;
* timestamps: ISO-8601 ``YYYY-MM-DDTHH:MM:SS`` plus, when the sub-second part
  is not zero, ``.`` and its digits with trailing zeros removed (so one instant
  gives one text in ``s``, ``ms``, ``us`` and ``ns``: ``...T00:00:00.0015``); a
  timestamp with a time zone is written in UTC with a ``Z`` suffix, one without
  a time zone with no suffix;
* times (``time32``, ``time64``): ``HH:MM:SS`` plus the sub-second rule above;
* a year outside 0000-9999 (proleptic Gregorian, astronomical numbering, so
  year 0 is 1 BC) is written with a sign and at least four digits:
  ``-0001-12-31``, ``+10000-01-01``.

Lists, structs, maps, unions, durations and intervals have no canonical text.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_INT32_MAX = 2**31 - 1


def is_text(t: pa.DataType) -> bool:
    """Whether ``t`` holds strings."""
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def is_binary(t: pa.DataType) -> bool:
    """Whether ``t`` holds raw bytes."""
    return (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_binary_view(t)
        or pa.types.is_fixed_size_binary(t)
    )


def has_canonical_text(t: pa.DataType) -> bool:
    """Whether values of ``t`` (or of a dictionary of ``t``) have a canonical text (or bytes)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return (
        is_text(t)
        or is_binary(t)
        or pa.types.is_null(t)
        or pa.types.is_boolean(t)
        or pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_decimal(t)
        or pa.types.is_date(t)
        or pa.types.is_timestamp(t)
        or pa.types.is_time(t)
    )


@dataclass(frozen=True)
class Distinct:
    """An array split into its distinct ``values`` and, per row, an index into them.

    ``indices`` is null where the row is null. ``values`` may still hold a null
    (a dictionary array's dictionary may), which the caller keeps null.
    """

    values: pa.Array
    indices: pa.Array

    def first_row(self, position: int) -> int:
        """The first row whose value is ``values[position]`` (for error messages)."""
        return int(pc.index(self.indices, pa.scalar(position, self.indices.type)).as_py())

    def gather(self, per_value: pa.Array) -> pa.Array:
        """``per_value`` (one result per entry of ``values``) put back in row order."""
        return pc.take(per_value, self.indices)


@dataclass(frozen=True)
class Rows:
    """An array left row for row (not worth splitting): the same interface as :class:`Distinct`."""

    values: pa.Array
    indices: None = None

    def first_row(self, position: int) -> int:
        """The row of ``values[position]``: itself."""
        return position

    def gather(self, per_value: pa.Array) -> pa.Array:
        """``per_value`` is already in row order."""
        return per_value


# Rows sampled to estimate how many distinct values a batch has; a few thousand
# make the estimate cost well under a millisecond.
_SAMPLE_ROWS = 4096


def estimated_distinct_fraction(array: pa.Array) -> float:
    """A cheap estimate of (distinct values) / (rows) of ``array``, from a sample of its rows.

    It counts the pairs of sampled rows that hold equal values: in a column of
    ``d`` equally frequent values a random pair is equal with probability about
    ``1 / d``, so ``d`` is estimated as (sampled pairs) / (equal pairs). Skewed
    columns (a few very frequent values) read as less distinct than they are.
    The estimate only ever decides how the work is organised, never a result.
    """
    n = len(array)
    try:
        if n <= _SAMPLE_ROWS:
            return len(pc.unique(array)) / max(n, 1)
        # A fixed seed: the same batch is always organised the same way.
        positions = np.unique(np.random.default_rng(0).integers(0, n, _SAMPLE_ROWS))
        # Nulls are not values: they are left out of both the sample and the rows.
        sample = array.take(pa.array(positions)).drop_null()
        counts = pc.value_counts(sample).field("counts")
    except pa.ArrowNotImplementedError:
        # A type Arrow cannot hash directly (half floats, narrow decimals): split it.
        return 0.0
    counts = counts.to_numpy(zero_copy_only=False).astype(np.float64)
    s = float(len(sample))
    valid_rows = n - array.null_count
    equal_pairs = float(np.sum(counts * (counts - 1.0))) / 2.0
    if equal_pairs == 0.0 or valid_rows == 0:
        return 1.0
    return min(1.0, s * (s - 1.0) / 2.0 / equal_pairs / valid_rows)


def distinct_or_rows(array: pa.Array | pa.ChunkedArray, max_fraction: float) -> Distinct | Rows:
    """:func:`distinct`, unless the estimated share of distinct values is above ``max_fraction``.

    When nearly every value is distinct, splitting the array (a hash pass and a
    gather) costs more than the per-value work it saves; the array is then
    returned as :class:`Rows`. See :func:`estimated_distinct_fraction`.
    """
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
    t = array.type
    if (
        not pa.types.is_dictionary(t)
        and not pa.types.is_float16(t)
        and estimated_distinct_fraction(array) > max_fraction
    ):
        return Rows(array)
    return distinct(array)


def distinct(array: pa.Array | pa.ChunkedArray) -> Distinct:
    """Split ``array`` into its distinct values and per-row indices (one hash pass)."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
    t = array.type
    if pa.types.is_dictionary(t):
        if len(array.dictionary) <= len(array):
            return Distinct(array.dictionary, array.indices)
        # A small slice of a large dictionary (a pandas categorical cut into batches):
        # work on the values the slice uses, not on the whole dictionary.
        return distinct(array.dictionary_decode())
    if pa.types.is_float16(t):
        # Arrow has no hash kernel for half floats: group their bit patterns instead.
        enc = pc.dictionary_encode(array.view(pa.uint16()))
        return Distinct(enc.dictionary.view(pa.float16()), enc.indices)
    if pa.types.is_decimal(t) and t.bit_width < 128:
        enc = pc.dictionary_encode(array.cast(pa.decimal128(t.precision, t.scale)))
        return Distinct(enc.dictionary, enc.indices)
    enc = pc.dictionary_encode(array)
    return Distinct(enc.dictionary, enc.indices)


def canonical_text(values: pa.Array) -> pa.Array:
    """The canonical text (or raw bytes, for binary types) of each value; nulls stay null.

    The result is a string or binary array of the same length. See the module
    docstring for the rules.
    """
    t = values.type
    if pa.types.is_dictionary(t):
        return canonical_text(values.dictionary_decode())
    if is_text(t) or is_binary(t):
        return values
    if pa.types.is_null(t):
        return pa.nulls(len(values), pa.string())
    if pa.types.is_boolean(t) or pa.types.is_integer(t):
        return values.cast(pa.string())
    if pa.types.is_floating(t):
        return _float_text(values)
    if pa.types.is_decimal(t):
        return pa.array(
            [None if d is None else format(d, "f") for d in values.to_pylist()], pa.string()
        )
    if pa.types.is_date(t):
        days = _ticks(values)
        if pa.types.is_date64(t):
            days = days // 86_400_000
        return _keep_nulls(values, _date_text(days))
    if pa.types.is_timestamp(t):
        per_second = _PER_SECOND[t.unit]
        ticks = _ticks(values)
        seconds, sub = np.divmod(ticks, per_second)
        days, secs = np.divmod(seconds, 86_400)
        text = _join([_date_text(days), _clock_text(secs, sub, per_second)], "T")
        if t.tz is not None:
            text = _join([text, _repeat("Z", len(values))], "")
        return _keep_nulls(values, text)
    if pa.types.is_time(t):
        per_second = _PER_SECOND[t.unit]
        ticks = _ticks(values)
        secs, sub = np.divmod(ticks, per_second)
        return _keep_nulls(values, _clock_text(secs, sub, per_second))
    raise TypeError(f"{t} has no canonical text")


_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def _ticks(values: pa.Array) -> np.ndarray:
    """The stored integers of a temporal array as int64 (nulls as 0; their text is masked later)."""
    ints = values.view(pa.int32() if values.type.bit_width == 32 else pa.int64())
    return ints.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def _keep_nulls(values: pa.Array, text: pa.Array) -> pa.Array:
    if values.null_count == 0:
        return text
    return pc.if_else(pc.is_valid(values), text, pa.scalar(None, pa.string()))


def _repeat(text: str, n: int) -> pa.Array:
    return pa.array(np.full(n, text, dtype=object), pa.string())


def _join(parts: list[pa.Array], separator: str) -> pa.Array:
    return pc.binary_join_element_wise(*parts, separator)


def _digits(numbers: np.ndarray, width: int) -> pa.Array:
    """Non-negative integers as decimal text, zero-padded to at least ``width``."""
    return pc.utf8_lpad(pa.array(numbers, pa.int64()).cast(pa.string()), width=width, padding="0")


def _date_text(days: np.ndarray) -> pa.Array:
    """``YYYY-MM-DD`` for days since 1970-01-01, any int64 range (proleptic Gregorian)."""
    # Howard Hinnant's civil_from_days, vectorised; numpy's // floors, as the algorithm needs.
    z = days.astype(np.int64) + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1_460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = np.where(mp < 10, mp + 3, mp - 9)
    year = yoe + era * 400 + (month <= 2)
    sign = pa.array(np.where(year < 0, "-", np.where(year > 9999, "+", "")), pa.string())
    year_text = _join([sign, _digits(np.abs(year), 4)], "")
    return _join([year_text, _digits(month, 2), _digits(day, 2)], "-")


def _clock_text(seconds: np.ndarray, sub: np.ndarray, per_second: int) -> pa.Array:
    """``HH:MM:SS`` plus ``.digits`` (trailing zeros removed) when ``sub`` is not zero."""
    hours, rest = np.divmod(seconds, 3_600)
    minutes, secs = np.divmod(rest, 60)
    clock = _join([_digits(hours, 2), _digits(minutes, 2), _digits(secs, 2)], ":")
    if per_second == 1:
        return clock
    width = len(str(per_second)) - 1
    fraction = pc.utf8_rtrim(_digits(sub, width), characters="0")
    dotted = _join([_repeat(".", len(sub)), fraction], "")
    return _join([clock, pc.if_else(pa.array(sub != 0), dotted, "")], "")


def _float_text(values: pa.Array) -> pa.Array:
    t = values.type
    if pa.types.is_float64(t):
        return pa.array([None if v is None else repr(v) for v in values.to_pylist()], pa.string())
    # The shortest decimal at the column's own precision, re-read as a Python float so
    # it is written in the same style as float64 (numpy switches to exponents earlier).
    np_type = np.float32 if pa.types.is_float32(t) else np.float16
    raw = values.fill_null(0).to_numpy(zero_copy_only=False).astype(np_type)
    texts = [repr(float(str(v))) for v in raw]
    return _keep_nulls(values, pa.array(texts, pa.string()))


def bytes_of(values: pa.Array) -> list[bytes | None]:
    """Each value of a string or binary array as Python ``bytes`` (UTF-8 for strings)."""
    t = values.type
    if pa.types.is_string(t):
        values = values.cast(pa.binary())
    elif pa.types.is_large_string(t):
        values = values.cast(pa.large_binary())
    elif pa.types.is_string_view(t):
        values = values.cast(pa.binary_view())
    return values.to_pylist()


def _validity(valid: pa.Array | None) -> pa.Buffer | None:
    if valid is None or valid.null_count == 0:
        return None
    return pc.is_valid(valid).buffers()[1]


def gather_fixed_width(
    blob: bytes, width: int, like: pa.Array, indices: pa.Array | None
) -> pa.Array:
    """Strings of ``width`` ASCII bytes each, one per distinct value, gathered into row order.

    ``blob`` holds the distinct values' texts back to back (``len(like) * width``
    bytes); ``like`` is the distinct values array, whose nulls stay null;
    ``indices`` None means ``like`` is already in row order. A fixed-size
    ``take`` is a plain memory copy per row, and the string offsets are an
    arithmetic sequence, so this never touches Python per row.
    """
    m = len(like)
    valid = _validity(like)
    fixed = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), m, [valid, pa.py_buffer(blob)], null_count=like.null_count
    )
    taken = fixed if indices is None else pc.take(fixed, indices)
    if taken.offset:
        taken = pa.concat_arrays([taken])
    n = len(taken)
    if n * width > _INT32_MAX:
        raise OverflowError("the batch's tokens exceed 2 GiB; use smaller batches")
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    validity, data = taken.buffers()
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), data, validity, taken.null_count)


def hex_cut(joined: bytes, count: int, width: int) -> bytes:
    """Lower-case hex of ``count`` equal-length digests held back to back, each cut to ``width``."""
    if not count:
        return b""
    full = binascii.hexlify(joined)
    per = len(full) // count
    if width >= per:
        return full
    return np.frombuffer(full, dtype=np.uint8).reshape(-1, per)[:, :width].tobytes()


def strings_from_parts(parts: list[bytes], like: pa.Array, *, as_hex: bool = False) -> pa.Array:
    """A string array of ``parts`` (one per distinct value), not validated.

    ``parts`` are UTF-8 bytes, or, with ``as_hex``, raw bytes written as their
    lower-case hex (converted in one pass over all of them). ``like`` is the
    distinct values array; its nulls stay null (their part is ignored).
    """
    m = len(parts)
    scale = 2 if as_hex else 1
    lengths = np.fromiter(map(len, parts), dtype=np.int64, count=m)
    offsets = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(lengths * scale, out=offsets[1:])
    large = offsets[-1] > _INT32_MAX
    typ = pa.large_string() if large else pa.string()
    data = b"".join(parts)
    return pa.Array.from_buffers(
        typ,
        m,
        [
            _validity(like),
            pa.py_buffer(offsets if large else offsets.astype(np.int32)),
            pa.py_buffer(binascii.hexlify(data) if as_hex else data),
        ],
        null_count=like.null_count,
    )


class ValueCache:
    """A bounded per-process memo of value bytes -> result bytes, across batches.

    Engines hand the core small batches (Spark: 10,000 rows), so a column with
    few distinct values meets the same values again and again; remembering
    their tokens saves a keyed hash or an encryption each time. The memo holds
    at most ``limit`` entries (cleared when full), leaves batches of ``limit``
    distinct values or more alone, and switches itself off for
    good once it has seen ``limit`` lookups with fewer than one in five
    hits, so a high-cardinality column pays for it only briefly. It lives in
    ``ColumnContext.state``: never pickled, one per plan step and process.
    """

    def __init__(self, limit: int = 100_000):
        self.limit = limit
        self.enabled = True
        self._map: dict[bytes, bytes] = {}
        self._lookups = 0
        self._hits = 0

    def compute(self, values: list[bytes], fn: Callable[[list[bytes]], list[bytes]]) -> list[bytes]:
        """``fn(values)``, computing only the values not already remembered."""
        if not self.enabled or len(values) >= self.limit:
            # A batch this large already does its work once per distinct value;
            # remembering it would only cost lookups and a full memo.
            return fn(values)
        memo = self._map
        out = [memo.get(v) for v in values]
        missing = [i for i, r in enumerate(out) if r is None]
        if missing:
            computed = fn([values[i] for i in missing])
            for i, result in zip(missing, computed, strict=True):
                out[i] = result
            if len(memo) + len(missing) > self.limit:
                memo.clear()
            memo.update(zip((values[i] for i in missing[: self.limit]), computed, strict=False))
        self._lookups += len(values)
        self._hits += len(values) - len(missing)
        if self._lookups >= self.limit and self._hits * 5 < self._lookups:
            self.enabled = False
            memo.clear()
        return out  # type: ignore[return-value]
