"""``tokenizer``: a keyed, deterministic, one-way token (lower-case hex) for each value.

``hmac-sha256`` (the default) is HMAC-SHA256(key, utf8(value)) (RFC 2104,
built on the standard library's ``hashlib`` SHA-256). ``cape-sha256`` is
SHA-256(utf8(value) || key), the formula of cape-python's tokenizer
(``hashlib.sha256(x.encode() + key)``), kept for compatibility: the same key
gives cape-python's tokens. Both are cut to ``max_token_len`` hex characters
when it is set. Binary values are hashed as
their raw bytes; every other supported type is hashed as its canonical text
(see :mod:`cape_pipelines.transforms._text`: ``str(int)``, ISO-8601 dates and
timestamps, ``repr`` of floats, ...). Nulls stay null.

The work is done once per distinct value of a batch and gathered back into row
order, unless a sample of the batch shows that nearly every value is distinct
(then splitting it would cost more than it saves, and each row is hashed);
the keyed inner and outer SHA-256 states are built once per process
(``ctx.state``) and copied for each value, which measured about twice as fast
as copying a ``cryptography`` HMAC object and six times ``hmac.digest``.

>>> import pyarrow as pa
>>> from cape_pipelines.transforms.base import ColumnContext
>>> t = Tokenizer(key={"secret": "k"}, max_token_len=16)
>>> t.apply(pa.array(["alice", None]), ColumnContext("name", key=b"k" * 32)).to_pylist()
['6664a42048c6d6d7', None]
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import ClassVar, Literal

import pyarrow as pa
from pydantic import ConfigDict, Field

from ..errors import TransformError
from . import _native_sha256 as native
from ._text import (
    ValueCache,
    canonical_text,
    distinct_or_rows,
    gather_fixed_width,
    has_canonical_text,
    hex_cut,
)
from .base import ColumnContext, KeyedTransformation, SqlArg, SqlFunction

DIGEST_HEX = 64
# SHA-256's block size, the HMAC pad length (RFC 2104's B).
_BLOCK = 64
# Above this estimated share of distinct values a batch is hashed row by row:
# splitting it into distinct values (Arrow's dictionary encoding, ~0.2 us per
# row at 70% distinct) costs more than the HMACs it would save. Measured the
# same for the native batch hash (~0.2 us per HMAC) and the hashlib loop
# (~0.5 us): at 50% distinct, splitting and not splitting cost the same.
_DEDUP_BELOW = 0.5

Digester = Callable[[list[bytes]], list[bytes]]


def hmac_pads(key: bytes) -> tuple[bytes, bytes]:
    """RFC 2104's ``K0 ^ ipad`` and ``K0 ^ opad`` for ``key`` (hashed first if over 64 bytes)."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    block = key.ljust(_BLOCK, b"\0")
    return bytes(b ^ 0x36 for b in block), bytes(b ^ 0x5C for b in block)


def hmac_sha256_digester(key: bytes) -> Digester:
    """A function computing HMAC-SHA256(key, v) for each ``v``, with the keyed state built once.

    This is RFC 2104's construction written with ``hashlib``: a key longer
    than SHA-256's 64-byte block is first hashed, then zero-padded to the
    block; the inner and outer hash states after absorbing ``key ^ ipad`` and
    ``key ^ opad`` are computed once, and each value costs two state copies
    and two short hashes (one compression each for values up to 55 bytes).
    Measured about twice as fast per value as copying a ``cryptography`` HMAC
    object. The states are only ever held in this closure (never pickled,
    logged or shown).
    """
    inner_pad, outer_pad = hmac_pads(key)
    inner = hashlib.sha256(inner_pad)
    outer = hashlib.sha256(outer_pad)
    del inner_pad, outer_pad
    inner_copy = inner.copy
    outer_copy = outer.copy

    def digest_all(values: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        add = out.append
        for v in values:
            h = inner_copy()
            h.update(v)
            o = outer_copy()
            o.update(h.digest())
            add(o.digest())
        return out

    return digest_all


def cape_sha256_digester(key: bytes) -> Digester:
    """A function computing SHA-256(v || key) for each ``v`` (cape-python's token formula)."""
    sha256 = hashlib.sha256

    def digest_all(values: list[bytes]) -> list[bytes]:
        return [sha256(v + key).digest() for v in values]

    return digest_all


_DIGESTERS: dict[str, Callable[[bytes], Digester]] = {
    "hmac-sha256": hmac_sha256_digester,
    "cape-sha256": cape_sha256_digester,
}


def required_key(ctx: ColumnContext, type_name: str) -> bytes:
    """The step's resolved key, or a :class:`TransformError` if none was resolved."""
    if not ctx.key:
        raise TransformError(f"{type_name} has no key: the plan resolved none for this step")
    return ctx.key


class Tokenizer(KeyedTransformation):
    """Replace each value by its keyed one-way token (lower-case hex, ``max_token_len`` long)."""

    type_name: ClassVar[str] = "tokenizer"
    # An inline key rejected by validation must not be echoed by pydantic's message.
    model_config = ConfigDict(hide_input_in_errors=True)

    max_token_len: int | None = Field(default=None, ge=1)
    algorithm: Literal["hmac-sha256", "cape-sha256"] = "hmac-sha256"

    sql_functions: ClassVar[tuple[SqlFunction, ...]] = (
        SqlFunction(
            "tokenize",
            (
                SqlArg("key", role="key"),
                SqlArg("max_len", param="max_token_len", convert=int, required=False),
                SqlArg("algorithm", required=False),
            ),
            pa.string(),
        ),
    )

    def output_type(self, input_type: pa.DataType, column: str) -> pa.DataType:
        """Always a string column; lists, structs, maps, durations... are refused."""
        if not has_canonical_text(input_type):
            raise self.refuse(
                column,
                input_type,
                "strings, binary, integers, booleans, floats, decimals, dates, times or timestamps",
            )
        return pa.string()

    @property
    def token_len(self) -> int:
        """The number of hex characters per token."""
        if self.max_token_len is None:
            return DIGEST_HEX
        return min(self.max_token_len, DIGEST_HEX)

    def apply(self, array: pa.Array, ctx: ColumnContext) -> pa.Array:
        """Tokens for ``array``, computed once per distinct value."""
        key = required_key(ctx, self.type_name)
        parts = distinct_or_rows(array, _DEDUP_BELOW)
        text = canonical_text(parts.values)
        values = _as_binary(text)
        joined = self._native_digests(values, key, ctx)
        if joined is None:
            memo = f"digester:{self.algorithm}"
            digester = ctx.state.get(memo)
            if digester is None:
                digester = ctx.state[memo] = _DIGESTERS[self.algorithm](key)
            cache = ctx.state.setdefault("tokens", ValueCache())
            joined = b"".join(cache.compute(values.to_pylist(), digester))
        blob = hex_cut(joined, len(text), self.token_len)
        return gather_fixed_width(blob, self.token_len, text, parts.indices)

    def _native_digests(self, values: pa.Array, key: bytes, ctx: ColumnContext) -> bytes | None:
        """Every value's digest from one native batch call, or None to use the hashlib loop.

        Same bytes either way; see :mod:`._native_sha256` for when it is used.
        """
        if self.algorithm == "cape-sha256":
            return native.sha256_digests(values, key)
        pads = ctx.state.get("hmac-pads")
        if pads is None:
            pads = ctx.state["hmac-pads"] = hmac_pads(key)
        return native.hmac_sha256_digests(values, *pads)


def _as_binary(text: pa.Array) -> pa.Array:
    """``text`` as a binary array of its UTF-8 bytes (or raw bytes), nulls as empty values."""
    t = text.type
    if pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        values = text.cast(pa.large_binary())
    else:
        values = text.cast(pa.binary())
    if values.null_count:
        # A null's token is never used (it stays null); hash something in its place.
        values = values.fill_null(b"")
    return values
