"""``fpe`` and ``fpe-reverser``: format-preserving encryption (NIST SP 800-38G FF1 on AES).

A card number stays sixteen digits, an account code stays eight base-36
characters: FF1 (:mod:`cape_pipelines.transforms._ff1`) encrypts a string over
an alphabet into another string of the same length over the same alphabet,
and a key holder turns it back with ``fpe-reverser`` (like ``token-reverser``).
Unlike a token, the output still passes format checks downstream.

Parameters: the ``key`` (16, 24 or 32 bytes: AES-128/192/256), the alphabet
(``radix`` 10, 36 or 62, or a custom ``alphabet`` of distinct ASCII
characters), an optional tweak (a constant ``tweak`` string, or ``tweak_column``
naming a column whose value is the row's tweak: equal values under different
tweaks encrypt differently), and format options:

* ``keep_first`` / ``keep_last``: that many alphabet characters stay in clear
  (a card's issuer prefix, its last four);
* ``luhn``: the input must pass the Luhn check; every digit but the last is
  encrypted and the last is recomputed, so the output passes it too;
* ``keep_separators``: characters outside the alphabet stay where they are
  (``4111-1111-1111-1111`` keeps its dashes) and only the others are encrypted.
  Without it such a character is an error.

The part that is encrypted must hold at least two characters and
``radix**length >= 1,000,000`` values (SP 800-38G Rev. 1); a shorter value is
an error naming the row and the reason, or null with ``on_error: null``.
Work is done once per distinct (value, tweak) of a batch, and all strings of
one length go through FF1 together (numpy arithmetic, one AES call per round).

>>> import pyarrow as pa
>>> from cape_pipelines.transforms.base import ColumnContext
>>> ctx = ColumnContext("card", key=bytes(16))
>>> t = Fpe(key={"secret": "k"}, keep_separators=True, luhn=True)
>>> enc = t.apply(pa.array(["4111-1111-1111-1111", None]), ctx)
>>> FpeReverser(key={"secret": "k"}, keep_separators=True, luhn=True).apply(enc, ctx).to_pylist()
['4111-1111-1111-1111', None]
"""

from __future__ import annotations

import string
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ConfigDict, Field, field_validator, model_validator

from ..errors import KeyFormatError, TransformError
from ..keys import KeyRef, KeyResolver
from ._ff1 import FF1, check_domain
from ._text import bytes_of, canonical_text, distinct, is_text
from .base import ColumnContext, KeyedTransformation, SqlArg, SqlFunction
from .mask import re2_class
from .tokenize import required_key

AES_KEY_LENGTHS = (16, 24, 32)

ALPHABETS = {
    10: string.digits,
    36: string.digits + string.ascii_lowercase,
    62: string.digits + string.ascii_lowercase + string.ascii_uppercase,
}


def check_aes_key(length: int, type_name: str) -> str | None:
    """The problem with a key of ``length`` bytes for FF1-AES, or None (never shows the key)."""
    if length in AES_KEY_LENGTHS:
        return None
    return (
        f"{type_name} needs a 16-, 24- or 32-byte key (AES), but the key is {length} byte(s) long"
    )


def luhn_check_digits(payload: np.ndarray) -> np.ndarray:
    """The Luhn check digit for each row of ``payload`` (``(k, n)`` decimal digits)."""
    n = payload.shape[1]
    # From the right, the first payload digit (next to the check digit) is doubled.
    doubled = (np.arange(n)[::-1] % 2) == 0
    d = payload.astype(np.int64)
    twice = d * 2
    twice = np.where(twice > 9, twice - 9, twice)
    total = np.where(doubled, twice, d).sum(axis=1)
    check: np.ndarray = (10 - total % 10) % 10
    return check


class _FpeTransformation(KeyedTransformation):
    """Parameters both directions share; they must be equal for a reverser to undo an ``fpe``."""

    model_config = ConfigDict(hide_input_in_errors=True)

    radix: Literal[10, 36, 62] = 10
    alphabet: str | None = None
    tweak: str | None = None
    tweak_column: str | None = None
    keep_first: int = Field(default=0, ge=0)
    keep_last: int = Field(default=0, ge=0)
    luhn: bool = False
    keep_separators: bool = False
    on_error: Literal["error", "null"] = "error"

    @field_validator("key")
    @classmethod
    def _check_inline_key(cls, value: KeyRef) -> KeyRef:
        if value.inline is not None:
            problem = check_aes_key(len(value.inline.get_secret_value()), cls.type_name)
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("alphabet")
    @classmethod
    def _check_alphabet(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if len(value) < 2:
            raise ValueError("alphabet needs at least 2 characters")
        if len(set(value)) != len(value):
            raise ValueError("alphabet characters must be distinct")
        if not value.isascii() or not value.isprintable():
            raise ValueError("alphabet characters must be printable ASCII")
        return value

    @field_validator("tweak_column")
    @classmethod
    def _check_tweak_column(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise ValueError("tweak_column must name a column")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> _FpeTransformation:
        if self.alphabet is not None and "radix" in self.model_fields_set:
            raise ValueError("give radix or alphabet (whose length is the radix), not both")
        if self.tweak is not None and self.tweak_column is not None:
            raise ValueError("give tweak (a constant) or tweak_column, not both")
        if self.luhn:
            if self.chars != string.digits:
                raise ValueError("luhn works on decimal digits only (radix 10, no custom alphabet)")
            if self.keep_last:
                raise ValueError(
                    "luhn recomputes the last digit, so it cannot be kept with keep_last"
                )
        return self

    @property
    def chars(self) -> str:
        """The alphabet in use: the custom one, or the radix's."""
        return self.alphabet if self.alphabet is not None else ALPHABETS[self.radix]

    def resolve_key(self, resolver: KeyResolver) -> bytes | None:
        """The key bytes, checked to be an AES key (``KeyFormatError`` otherwise)."""
        key = super().resolve_key(resolver)
        if key is not None:
            problem = check_aes_key(len(key), self.type_name)
            if problem:
                raise KeyFormatError(problem)
        return key

    def context_columns(self) -> list[str]:
        return [self.tweak_column] if self.tweak_column is not None else []

    def output_type(self, input_type: pa.DataType, column: str) -> pa.DataType:
        """A string column, from a string column."""
        value_type = input_type.value_type if pa.types.is_dictionary(input_type) else input_type
        if not (is_text(value_type) or pa.types.is_null(value_type)):
            raise self.refuse(column, input_type, "a string column")
        return pa.string()

    def _ff1(self, ctx: ColumnContext) -> FF1:
        ff1 = ctx.state.get("ff1")
        if ff1 is None:
            key = required_key(ctx, self.type_name)
            problem = check_aes_key(len(key), self.type_name)
            if problem:
                raise TransformError(problem)
            ff1 = ctx.state["ff1"] = FF1(key, len(self.chars))
        return ff1

    def _run(self, array: pa.Array, ctx: ColumnContext, decrypt: bool) -> pa.Array:
        ff1 = self._ff1(ctx)
        if pa.types.is_null(array.type):
            return pa.nulls(len(array), pa.string())
        parts = distinct(array)
        values = parts.values.cast(pa.string())
        indices = parts.indices
        tweaks: list[bytes] | bytes = b"" if self.tweak is None else self.tweak.encode("utf-8")
        if self.tweak_column is not None:
            values, tweaks, indices = self._pair_with_tweaks(values, parts.indices, ctx)
        out, failed = self._transform(ff1, values, tweaks, decrypt)
        if failed:
            mask = np.zeros(len(out), dtype=bool)
            mask[list(failed)] = True
            if self.on_error == "error":
                per_row = indices.fill_null(0).to_numpy(zero_copy_only=False)
                hit = mask[per_row] & indices.is_valid().to_numpy(zero_copy_only=False)
                row = int(np.flatnonzero(hit)[0])
                what = "token" if decrypt else "value"
                raise TransformError(f"the {what} at row {row} {failed[int(per_row[row])]}")
            out = pc.if_else(pa.array(mask), pa.scalar(None, pa.string()), out)
        return pc.take(out, indices)

    def _pair_with_tweaks(
        self, values: pa.Array, indices: pa.Array, ctx: ColumnContext
    ) -> tuple[pa.Array, list[bytes], pa.Array]:
        """Distinct (value, tweak) pairs: their values, tweaks, and one index per row."""
        if ctx.batch is None or self.tweak_column not in ctx.batch.schema.names:
            raise TransformError(f"tweak column {self.tweak_column!r} is not in the batch")
        tweak_parts = distinct(canonical_text(ctx.batch.column(self.tweak_column)))
        tweak_values = [b"" if v is None else v for v in bytes_of(tweak_parts.values)]
        tweak_values.append(b"")  # a null tweak is the empty tweak
        null_code = len(tweak_values) - 1
        width = len(tweak_values)
        vi = indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        ti = tweak_parts.indices.fill_null(null_code).to_numpy(zero_copy_only=False)
        pair = np.where(vi >= 0, vi * width + ti.astype(np.int64), -1)
        valid = pair >= 0
        unique, inverse = np.unique(pair[valid], return_inverse=True)
        row_index = np.full(len(pair), -1, dtype=np.int64)
        row_index[valid] = inverse
        new_indices = pa.array(row_index, mask=~valid, type=pa.int64())
        paired = pc.take(values, pa.array(unique // width))
        tweaks = [tweak_values[j] for j in (unique % width).tolist()]
        return paired, tweaks, new_indices

    def _transform(
        self, ff1: FF1, values: pa.Array, tweaks: list[bytes] | bytes, decrypt: bool
    ) -> tuple[pa.Array, dict[int, str]]:
        """Each distinct value en/decrypted (same length, same offsets), and the failures."""
        chars = self.chars
        original = values
        if self.keep_separators:
            values = pc.replace_substring_regex(values, re2_class(chars, negate=True), "")
        if values.offset:
            values = pa.concat_arrays([values])
        m = len(values)
        validity, offsets_buf, data_buf = values.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=np.int32, count=m + 1).astype(np.int64)
        data = (
            np.frombuffer(data_buf, dtype=np.uint8).copy()
            if data_buf is not None
            else np.zeros(0, np.uint8)
        )
        # Alphabet index per byte; 255 marks a byte outside the alphabet (radix <= 95).
        lookup = np.full(256, 255, dtype=np.uint8)
        lookup[np.frombuffer(chars.encode("ascii"), dtype=np.uint8)] = np.arange(len(chars))
        symbols = np.frombuffer(chars.encode("ascii"), dtype=np.uint8)
        lengths = np.diff(offsets)
        is_valid = np.asarray(values.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        failed: dict[int, str] = {}
        tweak_lengths = (
            np.fromiter((len(t) for t in tweaks), dtype=np.int64, count=m)
            if isinstance(tweaks, list)
            else np.zeros(m, dtype=np.int64)
        )
        keep_tail = self.keep_last + (1 if self.luhn else 0)
        run = ff1.decrypt if decrypt else ff1.encrypt
        for n in np.unique(lengths[is_valid]).tolist():
            rows = np.flatnonzero(is_valid & (lengths == n))
            # All values of one length back to back (the usual column of card
            # numbers): a reshaped view of the data, no per-character index.
            if len(rows) == m and offsets[-1] - offsets[0] == m * n:
                raw = data[offsets[0] : offsets[-1]].reshape(m, n)
                positions = None
            else:
                positions = offsets[rows][:, None] + np.arange(n)
                raw = data[positions]
            digits = lookup[raw]
            keep = ~(digits == 255).any(axis=1)
            for r in rows[~keep].tolist():
                failed[r] = "has a character outside the alphabet (no keep_separators)"
            width = n - self.keep_first - keep_tail
            problem = check_domain(len(chars), width) if keep.any() else None
            if problem:
                for r in rows[keep].tolist():
                    failed[r] = f"is too short to encrypt: {problem}"
                continue
            if self.luhn:
                ok = luhn_check_digits(digits[:, :-1]) == digits[:, -1]
                for r in rows[keep & ~ok].tolist():
                    failed[r] = "does not pass the Luhn check (luhn: true)"
                keep &= ok
            part = slice(self.keep_first, n - keep_tail)
            for t in np.unique(tweak_lengths[rows[keep]]).tolist():
                sel = keep & (tweak_lengths[rows] == t)
                whole = bool(sel.all())
                tweak_arg: bytes | np.ndarray
                if isinstance(tweaks, list):
                    joined = b"".join(tweaks[r] for r in rows[sel].tolist())
                    tweak_arg = np.frombuffer(joined, np.uint8).reshape(int(sel.sum()), t)
                else:
                    tweak_arg = tweaks
                group = digits if whole else digits[sel]
                group[:, part] = run(group[:, part], tweak_arg)
                if self.luhn:
                    group[:, -1] = luhn_check_digits(group[:, :-1])
                out = symbols[group]
                if positions is None:
                    if whole:
                        raw[...] = out
                    else:
                        raw[sel] = out
                else:
                    data[positions[sel]] = out
        stripped_out = pa.StringArray.from_buffers(
            m, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data.tobytes()), validity
        )
        result = stripped_out
        if self.keep_separators:
            result = self._reinsert(original, stripped_out, set(chars))
        return result, failed

    @staticmethod
    def _reinsert(original: pa.Array, encrypted: pa.Array, alphabet: set[str]) -> pa.Array:
        """Put the separators of ``original`` back around the encrypted characters."""
        same = pc.equal(pc.utf8_length(original), pc.utf8_length(encrypted))
        same = pc.fill_null(same, True)
        if pc.all(same).as_py():
            return encrypted
        # Only values that had separators take this per-value loop.
        out = encrypted.to_pylist()
        for i, (orig, keep) in enumerate(zip(original.to_pylist(), same.to_pylist(), strict=True)):
            if keep or orig is None:
                continue
            enc = iter(out[i])
            out[i] = "".join(next(enc) if ch in alphabet else ch for ch in orig)
        return pa.array(out, pa.string())


_SQL_ARGS = (
    SqlArg("key", role="key"),
    SqlArg("radix", convert=int, required=False),
    SqlArg("tweak", required=False),
)


class Fpe(_FpeTransformation):
    """Encrypt each string with FF1, keeping its length, alphabet and the chosen format."""

    type_name: ClassVar[str] = "fpe"
    sql_functions: ClassVar[tuple[SqlFunction, ...]] = (SqlFunction("fpe", _SQL_ARGS, pa.string()),)

    def apply(self, array: pa.Array, ctx: ColumnContext) -> pa.Array:
        """FF1 ciphertexts for ``array``, one encryption per distinct (value, tweak)."""
        return self._run(array, ctx, decrypt=False)


class FpeReverser(_FpeTransformation):
    """Turn ``fpe`` output back into the original strings (same key and parameters)."""

    type_name: ClassVar[str] = "fpe-reverser"
    sql_functions: ClassVar[tuple[SqlFunction, ...]] = (
        SqlFunction("fpe_reveal", _SQL_ARGS, pa.string()),
    )

    def apply(self, array: pa.Array, ctx: ColumnContext) -> pa.Array:
        """The plaintexts for ``array``, one decryption per distinct (value, tweak)."""
        return self._run(array, ctx, decrypt=True)
