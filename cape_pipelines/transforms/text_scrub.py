"""``text-scrub``: find personal data inside free text and replace each finding.

Free-text columns (support tickets, notes) carry e-mail addresses, phone
numbers and card numbers that column rules cannot reach. ``text-scrub`` finds
them with detectors that match a pattern *and* validate it, so that order
numbers and dates are not mistaken for personal data:

==========  ==========================================================  =====================
entity      pattern                                                     validation
==========  ==========================================================  =====================
``email``   local part, ``@``, domain with a dot and a 2+ letter TLD     (the pattern)
``card``    13-19 digits, single spaces or dashes between them          Luhn checksum
``iban``    country, 2 check digits, 11-30 letters/digits (spaces ok)   ISO 13616 mod 97 == 1
``ssn``     ``AAA-GG-SSSS`` (US, dashes required)                       area not 000/666/9xx,
                                                                        group not 00, serial
                                                                        not 0000
``ipv4``    four dotted decimal octets                                  each octet <= 255
``ipv6``    hex groups with colons                                      Python's ``ipaddress``
``phone``   optional ``+country``, digits in groups                     ``+`` and 8-15 digits,
                                                                        or 3-3-4 digits with
                                                                        separators; not a date
==========  ==========================================================  =====================

Where findings overlap, the earlier one wins, then the entity listed first.
Each finding becomes, by ``replace``: ``placeholder`` (``<EMAIL>``),
``token`` (``<EMAIL:token>``, the token being what the ``tokenizer`` gives for
that string with the same key and ``max_token_len``: HMAC-SHA256, so a
scrubbed address joins with a tokenized address column) or ``mask`` (one
``mask_char`` per character).

Vectorised where the work allows: the batch's distinct texts are screened by
one RE2 pass of pyarrow (``match_substring_regex``) and only texts that may
hold a finding go through the detectors; each distinct finding is tokenized
once; untouched texts are never copied into Python. :meth:`TextScrub.scrub`
also returns the number of findings per entity type, which the core adds to the
run's counters (``counts`` in ``run.completed``: ``{"note": {"text-scrub.email": 3}}``).

>>> import pyarrow as pa
>>> from cape_pipelines.transforms.base import ColumnContext
>>> t = TextScrub()
>>> t.apply(pa.array(["mail ann@example.com or call +1 415 555 0100"]), ColumnContext("note"))[0]
<pyarrow.StringScalar: 'mail <EMAIL> or call <PHONE>'>
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ConfigDict, Field, field_validator, model_validator

from ..errors import TransformError
from ..keys import KeyRef, parse_key_ref
from ._text import is_text
from .base import ColumnContext, ColumnTransformation, SqlArg, SqlFunction
from .tokenize import DIGEST_HEX, hmac_sha256_digester

Entity = Literal["email", "card", "iban", "ssn", "ipv4", "ipv6", "phone"]
ENTITIES: tuple[str, ...] = ("email", "card", "iban", "ssn", "ipv4", "ipv6", "phone")
_RANK = {e: i for i, e in enumerate(ENTITIES)}
_ALL_ENTITIES: tuple[Entity, ...] = ("email", "card", "iban", "ssn", "ipv4", "ipv6", "phone")


def luhn_valid(digits: str) -> bool:
    """Whether a string of decimal digits passes the Luhn check."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(text: str) -> bool:
    """ISO 13616: the IBAN with its first four characters moved to the end, letters as 10..35,
    is 1 modulo 97."""
    compact = text.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


def ssn_valid(text: str) -> bool:
    """US SSN rules: area not 000, 666 or 900-999; group not 00; serial not 0000."""
    area, group, serial = text.split("-")
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def ipv4_valid(text: str) -> bool:
    """Four octets, each at most 255, no leading zeros (``ipaddress`` rules)."""
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def ipv6_valid(text: str) -> bool:
    """A valid IPv6 address with at least two colons (``ipaddress`` rules)."""
    if text.count(":") < 2 or text.strip(":") == "":
        # "::" alone is the unspecified address, but in text it is C++ or a typo.
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


# A national (North American style) number: 3-3-4 digits with separators.
_NATIONAL = re.compile(r"\(\d{3}\) ?\d{3}[ .-]\d{4}|\d{3}([ .-])\d{3}\1\d{4}")
_NON_DIGITS = re.compile(r"\D+")
_DATE_LIKE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{4}")


def phone_valid(text: str) -> bool:
    """An international number (``+``, 8 to 15 digits: E.164) or a national 3-3-4 one
    written with separators, and not shaped like a date."""
    n = len(_NON_DIGITS.sub("", text))
    if _DATE_LIKE.fullmatch(text):
        return False
    if text.startswith("+"):
        return 8 <= n <= 15
    return _NATIONAL.fullmatch(text) is not None


def card_valid(text: str) -> bool:
    """13 to 19 digits passing Luhn."""
    digits = text.replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


# Python patterns (with look-arounds) find and delimit findings; the RE2 screen
# below is a superset used only to skip texts that cannot hold any.
_DETECTORS: dict[str, tuple[re.Pattern[str], Callable[[str], bool] | None]] = {
    "email": (
        re.compile(
            r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
        ),
        None,
    ),
    "card": (re.compile(r"(?<![\w-])(?<!\d )\d(?:[ -]?\d){12,18}(?![\w-])(?! \d)"), card_valid),
    "iban": (
        re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b"),
        iban_valid,
    ),
    "ssn": (re.compile(r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])"), ssn_valid),
    "ipv4": (re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)"), ipv4_valid),
    "ipv6": (
        re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])"),
        ipv6_valid,
    ),
    "phone": (
        re.compile(
            r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?"
            r"\d{2,4}(?:[ .-]?\d{2,4}){1,4}(?!\w)(?![ .-]\d)"
        ),
        phone_valid,
    ),
}

_SCREEN = {
    "email": r"@[A-Za-z0-9-]+\.",
    "card": r"\d[ -]?\d[ -]?\d[ -]?\d",
    "iban": r"[A-Z]{2}\d{2}",
    "ssn": r"\d{3}-\d{2}-\d{4}",
    "ipv4": r"\d\.\d{1,3}\.\d",
    "ipv6": r"[0-9A-Fa-f]*:[0-9A-Fa-f]*:",
    "phone": r"\d[ .-]?\d[ .-]?\d",
}


class TextScrub(ColumnTransformation):
    """Replace e-mails, phones, cards, IBANs, IPs and SSNs inside text by placeholders, tokens
    or masks."""

    type_name: ClassVar[str] = "text-scrub"
    sql_functions: ClassVar[tuple[SqlFunction, ...]] = (
        # placeholder or mask; tokens need a key the policy path provides.
        SqlFunction("scrub_text", (SqlArg("replace", required=False),), pa.string()),
    )
    # A rejected inline key must not be echoed by pydantic's message.
    model_config = ConfigDict(hide_input_in_errors=True)

    entities: list[Entity] = Field(default_factory=lambda: list(_ALL_ENTITIES))
    replace: Literal["placeholder", "token", "mask"] = "placeholder"
    key: KeyRef | None = None
    max_token_len: int | None = Field(default=16, ge=1)
    mask_char: str = "*"

    @field_validator("key", mode="before")
    @classmethod
    def _parse_key(cls, value: Any) -> KeyRef | None:
        return None if value is None else parse_key_ref(value)

    @field_validator("entities")
    @classmethod
    def _some_entities(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("entities must list at least one entity type")
        if len(set(value)) != len(value):
            raise ValueError("entities lists an entity type twice")
        return value

    @field_validator("mask_char")
    @classmethod
    def _one_char(cls, value: str) -> str:
        if len(value) != 1:
            raise ValueError("mask_char must be exactly one character")
        return value

    @model_validator(mode="after")
    def _key_for_tokens(self) -> TextScrub:
        if self.replace == "token" and self.key is None:
            raise ValueError("replace: token needs a key")
        if self.replace != "token" and self.key is not None:
            raise ValueError("key is used only with replace: token")
        return self

    def output_type(self, input_type: pa.DataType, column: str) -> pa.DataType:
        """A string column, from a string column."""
        value_type = input_type.value_type if pa.types.is_dictionary(input_type) else input_type
        if not (is_text(value_type) or pa.types.is_null(value_type)):
            raise self.refuse(column, input_type, "a string column")
        return pa.string()

    @property
    def _order(self) -> list[str]:
        return [e for e in ENTITIES if e in self.entities]

    def find(self, text: str, entities: list[str] | None = None) -> list[tuple[int, int, str]]:
        """The validated, non-overlapping findings in ``text``: (start, end, entity).

        ``entities`` narrows the detectors run (to those whose screen matched).
        """
        found = []
        for entity in self._order if entities is None else entities:
            rank = _RANK[entity]
            pattern, check = _DETECTORS[entity]
            for m in pattern.finditer(text):
                if check is None or check(m.group()):
                    found.append((m.start(), rank, -(m.end() - m.start()), m.end(), entity))
        found.sort()
        out: list[tuple[int, int, str]] = []
        end = 0
        for start, _, _, stop, entity in found:
            if start >= end:
                out.append((start, stop, entity))
                end = stop
        return out

    def apply(self, array: pa.Array, ctx: ColumnContext) -> pa.Array:
        """The texts with every finding replaced."""
        return self.scrub(array, ctx)[0]

    def count_names(self) -> tuple[str, ...]:
        """One count per entity type this rule looks for (findings replaced)."""
        return tuple(self._order)

    def apply_counted(self, array: pa.Array, ctx: ColumnContext) -> tuple[pa.Array, dict[str, int]]:
        """The texts with every finding replaced, and the findings per entity type."""
        return self.scrub(array, ctx)

    def scrub(self, array: pa.Array, ctx: ColumnContext) -> tuple[pa.Array, dict[str, int]]:
        """The texts with every finding replaced, and the number of findings per entity type.

        Counts are per row (a text shared by several rows counts once per row)
        and returned, not stored, so concurrent batches cannot mix them up.
        """
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        if pa.types.is_null(array.type):
            return pa.nulls(len(array), pa.string()), {}
        enc = pc.dictionary_encode(
            array.cast(pa.string())
            if not pa.types.is_dictionary(array.type)
            else array.dictionary_decode().cast(pa.string())
        )
        values, indices = enc.dictionary, enc.indices
        # One vectorised RE2 screen per entity type: a text meets only the
        # detectors whose screen it passes (most texts pass one or two).
        order = self._order
        screens = np.stack(
            [
                pc.fill_null(pc.match_substring_regex(values, _SCREEN[e]), False).to_numpy(
                    zero_copy_only=False
                )
                for e in order
            ]
        ).reshape(len(order), len(values))
        positions = np.flatnonzero(screens.any(axis=0))
        counts: Counter[str] = Counter()
        if len(positions):
            texts = pc.take(values, pa.array(positions)).to_pylist()
            hits = screens[:, positions].T.tolist()
            spans = [
                self.find(t, [e for e, hit in zip(order, row, strict=True) if hit])
                for t, row in zip(texts, hits, strict=True)
            ]
            replaced = self._substitute(texts, spans, ctx)
            # Counted per row: a text shared by several rows counts once per row.
            rows_per_value = np.bincount(
                indices.fill_null(len(values)).to_numpy(zero_copy_only=False),
                minlength=len(values) + 1,
            )
            for pos, found in zip(positions.tolist(), spans, strict=True):
                for _, _, entity in found:
                    counts[entity] += int(rows_per_value[pos])
            mask = np.zeros(len(values), dtype=bool)
            mask[positions] = True
            values = pc.replace_with_mask(values, pa.array(mask), pa.array(replaced, pa.string()))
        return pc.take(values, indices), dict(counts)

    def _substitute(
        self, texts: list[str], spans: list[list[tuple[int, int, str]]], ctx: ColumnContext
    ) -> list[str]:
        """Each text with its findings replaced; tokens computed once per distinct finding."""
        tokens: dict[str, str] = {}
        if self.replace == "token":
            distinct_findings = sorted(
                {t[s:e] for t, found in zip(texts, spans, strict=True) for s, e, _ in found}
            )
            if distinct_findings:
                tokens = self._tokens(distinct_findings, ctx)
        out = []
        for text, found in zip(texts, spans, strict=True):
            if not found:
                out.append(text)
                continue
            pieces = []
            last = 0
            for start, end, entity in found:
                pieces.append(text[last:start])
                pieces.append(self._replacement(text[start:end], entity, tokens))
                last = end
            pieces.append(text[last:])
            out.append("".join(pieces))
        return out

    def _replacement(self, finding: str, entity: str, tokens: dict[str, str]) -> str:
        if self.replace == "placeholder":
            return f"<{entity.upper()}>"
        if self.replace == "mask":
            return self.mask_char * len(finding)
        return f"<{entity.upper()}:{tokens[finding]}>"

    def _tokens(self, findings: list[str], ctx: ColumnContext) -> dict[str, str]:
        if not ctx.key:
            raise TransformError(
                "text-scrub with replace: token has no key: the plan resolved none"
            )
        digester = ctx.state.get("digester")
        if digester is None:
            digester = ctx.state["digester"] = hmac_sha256_digester(ctx.key)
        length = min(self.max_token_len or DIGEST_HEX, DIGEST_HEX)
        digests = digester([f.encode("utf-8") for f in findings])
        return {f: d.hex()[:length] for f, d in zip(findings, digests, strict=True)}
