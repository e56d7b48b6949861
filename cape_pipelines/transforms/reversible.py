"""``reversible-tokenizer`` and ``token-reverser``: AES-SIV tokens that a key holder can undo.

A token is hex(SIV tag || ciphertext) of the value's bytes under AES-SIV
(RFC 5297) with no nonce and no associated data, from the ``cryptography``
package; a 32-byte key is AES-128-SIV and a 64-byte key AES-256-SIV. With a
32-byte key the tokens equal cape-python's (pycryptodome
``AES.new(key, AES.MODE_SIV).encrypt_and_digest(x)`` written as
``tag.hex() + ciphertext.hex()``), whose plain string keys are their UTF-8
bytes. Values are strings, encoded with ``encoding``; other types with a
canonical text (integers, dates, ...; see :mod:`cape_pipelines.transforms._text`)
are tokenized as that text, so the reverser gives the text back, not the
original type. Binary columns are refused: the reverser returns text.

The reverser checks each token: one that is not hex, is shorter than a tag, or
fails authentication (wrong key, altered token) is an error naming the row
(never the key, nor the token), or null with ``on_error: null``. Both work once
per distinct value of a batch with one cipher object per process.

>>> import pyarrow as pa
>>> from cape_pipelines.transforms.base import ColumnContext
>>> ctx = ColumnContext("name", key=bytes(range(32)))
>>> tokens = ReversibleTokenizer(key={"secret": "k"}).apply(pa.array(["alice", None]), ctx)
>>> TokenReverser(key={"secret": "k"}).apply(tokens, ctx).to_pylist()
['alice', None]
"""

from __future__ import annotations

import binascii
import codecs
from typing import ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from pydantic import ConfigDict, field_validator

from ..errors import KeyFormatError, TransformError
from ..keys import KeyRef, KeyResolver
from ._text import (
    Distinct,
    ValueCache,
    bytes_of,
    canonical_text,
    distinct,
    has_canonical_text,
    is_binary,
    is_text,
    strings_from_parts,
)
from .base import ColumnContext, KeyedTransformation, SqlArg, SqlFunction
from .tokenize import required_key

SIV_KEY_LENGTHS = (32, 64)
TAG_BYTES = 16


def siv_encrypt(
    cipher: AESSIV, plaintexts: list[bytes], associated_data: list[bytes] | None = None
) -> list[bytes]:
    """SIV tag || ciphertext of each plaintext (RFC 5297's output order), as the tokenizer uses it.

    The transformation passes no associated data; the parameter exists so the
    published RFC 5297 vectors, which use it, test this same function.
    """
    encrypt = cipher.encrypt
    return [encrypt(p, associated_data) for p in plaintexts]


def siv_decrypt(
    cipher: AESSIV, tokens: list[bytes], associated_data: list[bytes] | None = None
) -> list[bytes]:
    """The plaintext of each SIV tag || ciphertext; ``InvalidTag`` if one does not authenticate."""
    decrypt = cipher.decrypt
    return [decrypt(t, associated_data) for t in tokens]


def check_siv_key(length: int, type_name: str) -> str | None:
    """The problem with a key of ``length`` bytes for AES-SIV, or None (never shows the key)."""
    if length in SIV_KEY_LENGTHS:
        return None
    return f"{type_name} needs a 32- or 64-byte key (AES-SIV), but the key is {length} byte(s) long"


def _check_encoding(value: str) -> str:
    try:
        codecs.lookup(value)
    except LookupError:
        raise ValueError(f"unknown text encoding {value!r}") from None
    return value


def _is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == "utf-8"


class _SivTransformation(KeyedTransformation):
    """The key and encoding parameters both AES-SIV transformations share."""

    # A rejected key must not be echoed by pydantic's error message.
    model_config = ConfigDict(hide_input_in_errors=True)

    encoding: str = "utf-8"

    @field_validator("key")
    @classmethod
    def _check_inline_key(cls, value: KeyRef) -> KeyRef:
        if value.inline is not None:
            problem = check_siv_key(len(value.inline.get_secret_value()), cls.type_name)
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        return _check_encoding(value)

    def resolve_key(self, resolver: KeyResolver) -> bytes | None:
        """The key bytes, checked to be an AES-SIV key (``KeyFormatError`` otherwise)."""
        key = super().resolve_key(resolver)
        if key is not None:
            problem = check_siv_key(len(key), self.type_name)
            if problem:
                raise KeyFormatError(problem)
        return key

    def cipher(self, ctx: ColumnContext) -> AESSIV:
        """The step's AES-SIV object, built once per process and kept in ``ctx.state``."""
        cipher = ctx.state.get("aes-siv")
        if cipher is None:
            key = required_key(ctx, self.type_name)
            problem = check_siv_key(len(key), self.type_name)
            if problem:
                raise TransformError(problem)
            cipher = ctx.state["aes-siv"] = AESSIV(key)
        return cipher


class ReversibleTokenizer(_SivTransformation):
    """Replace each value by hex(SIV tag || AES-SIV ciphertext) of its ``encoding`` bytes."""

    type_name: ClassVar[str] = "reversible-tokenizer"
    sql_functions: ClassVar[tuple[SqlFunction, ...]] = (
        SqlFunction("tokenize_reversible", (SqlArg("key", role="key"),), pa.string()),
    )

    def output_type(self, input_type: pa.DataType, column: str) -> pa.DataType:
        """Always a string column; binary and nested types are refused."""
        value_type = input_type.value_type if pa.types.is_dictionary(input_type) else input_type
        if is_binary(value_type) or not has_canonical_text(input_type):
            raise self.refuse(
                column,
                input_type,
                "strings (or integers, booleans, floats, decimals, dates, times or "
                "timestamps, tokenized as their canonical text)",
            )
        return pa.string()

    def apply(self, array: pa.Array, ctx: ColumnContext) -> pa.Array:
        """Tokens for ``array``, one encryption per distinct value."""
        cipher = self.cipher(ctx)
        parts = distinct(array)
        text = canonical_text(parts.values)
        if is_binary(text.type):
            raise TransformError(f"{self.type_name} cannot take binary values")
        data = self._encode(text, parts)
        cache = ctx.state.setdefault("tokens", ValueCache())
        sealed = cache.compute(data, lambda values: siv_encrypt(cipher, values))
        tokens = strings_from_parts(sealed, text, as_hex=True)
        return pc.take(tokens, parts.indices)

    def _encode(self, text: pa.Array, parts: Distinct) -> list[bytes]:
        if _is_utf8(self.encoding):
            return [b"" if v is None else v for v in bytes_of(text)]
        out = []
        for position, value in enumerate(text.to_pylist()):
            if value is None:
                out.append(b"")
                continue
            try:
                out.append(value.encode(self.encoding))
            except UnicodeEncodeError:
                row = parts.first_row(position)
                raise TransformError(
                    f"the value at row {row} cannot be encoded as {self.encoding}"
                ) from None
        return out


class TokenReverser(_SivTransformation):
    """Turn reversible tokens back into their strings; a bad token is an error, or null."""

    type_name: ClassVar[str] = "token-reverser"
    sql_functions: ClassVar[tuple[SqlFunction, ...]] = (
        SqlFunction("reveal", (SqlArg("key", role="key"),), pa.string()),
    )

    on_error: Literal["error", "null"] = "error"

    def output_type(self, input_type: pa.DataType, column: str) -> pa.DataType:
        """A string column, from a column of tokens (strings)."""
        value_type = input_type.value_type if pa.types.is_dictionary(input_type) else input_type
        if not (is_text(value_type) or pa.types.is_null(value_type)):
            raise self.refuse(column, input_type, "a string column of reversible tokens")
        return pa.string()

    def apply(self, array: pa.Array, ctx: ColumnContext) -> pa.Array:
        """The original strings, one decryption per distinct token."""
        cipher = self.cipher(ctx)
        parts = distinct(array)
        tokens = canonical_text(parts.values)
        if not is_text(tokens.type):
            raise TransformError(f"{self.type_name} takes strings, not {tokens.type}")
        hex_tokens = bytes_of(tokens)
        plain = _reverse_all(cipher, hex_tokens)
        failed = [False] * len(hex_tokens)
        if plain is None:
            plain = self._reverse_each(cipher, hex_tokens, failed, parts)
        utf8 = _is_utf8(self.encoding)
        if not utf8:
            self._recode(plain, failed, parts)
        valid = tokens
        if any(failed):
            valid = pc.if_else(pa.array(failed), pa.scalar(None, tokens.type), tokens)
        values = strings_from_parts(plain, valid)
        if utf8:
            values = self._check_utf8(values, plain, failed, parts)
        return pc.take(values, parts.indices)

    def _reverse_each(
        self, cipher: AESSIV, hex_tokens: list[bytes | None], failed: list[bool], parts: Distinct
    ) -> list[bytes]:
        """Token by token, to name the first bad one (or null each bad one)."""
        plain = []
        for position, token in enumerate(hex_tokens):
            problem, value = (None, b"") if token is None else _reverse(cipher, token)
            if problem is not None:
                self._fail(parts, position, problem)
                failed[position] = True
            plain.append(value)
        return plain

    def _recode(self, plain: list[bytes], failed: list[bool], parts: Distinct) -> None:
        """Plaintexts in ``encoding`` to UTF-8, in place."""
        for position, value in enumerate(plain):
            if failed[position]:
                continue
            try:
                plain[position] = value.decode(self.encoding).encode("utf-8")
            except UnicodeDecodeError:
                self._fail(parts, position, f"decrypts to bytes that are not valid {self.encoding}")
                failed[position] = True
                plain[position] = b""

    def _fail(self, parts: Distinct, position: int, problem: str) -> None:
        if self.on_error == "error":
            row = parts.first_row(position)
            raise TransformError(f"the token at row {row} {problem}")

    def _check_utf8(
        self, values: pa.Array, plain: list[bytes], failed: list[bool], parts: Distinct
    ) -> pa.Array:
        """``values``, with plaintexts that are not UTF-8 (made with another encoding) nulled."""
        try:
            values.validate(full=True)
            return values
        except pa.ArrowInvalid:
            pass
        for position, value in enumerate(plain):
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                self._fail(parts, position, "decrypts to bytes that are not valid utf-8")
                failed[position] = True
                plain[position] = b""
        mask = pa.array(failed)
        return pc.if_else(mask, pa.scalar(None, pa.string()), strings_from_parts(plain, values))


def _reverse_all(cipher: AESSIV, hex_tokens: list[bytes | None]) -> list[bytes] | None:
    """Every plaintext when every token is good (the common case), else None."""
    unhexlify = binascii.unhexlify
    try:
        return siv_decrypt(cipher, [unhexlify(t) for t in hex_tokens])  # type: ignore[arg-type]
    except (binascii.Error, ValueError, TypeError, InvalidTag):
        return None


def _reverse(cipher: AESSIV, token: bytes) -> tuple[str | None, bytes]:
    """(problem, plaintext) for one token's ASCII hex bytes."""
    try:
        raw = binascii.unhexlify(token)
    except (binascii.Error, ValueError):
        return "is not hexadecimal", b""
    if len(raw) < TAG_BYTES:
        return (
            f"is too short ({len(token)} hex characters; a token has at least {2 * TAG_BYTES})",
            b"",
        )
    try:
        return None, siv_decrypt(cipher, [raw])[0]
    except InvalidTag:
        return "does not authenticate with this key (wrong key, or an altered token)", b""
