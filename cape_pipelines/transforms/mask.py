"""``mask``: hide characters of a string behind a mask character, keeping chosen parts.

Masking keeps a value readable enough to recognise (``****-****-****-1111``,
``*****@example.com``) without showing it. Three ways to say what stays:

* ``keep_first`` / ``keep_last``: that many characters at each end. A value
  no longer than ``keep_first + keep_last`` is masked entirely: keeping "the
  first 2 and last 4" of a five-letter value would show all of it.
* ``keep_pattern``: a regular expression (RE2 syntax, no capturing groups:
  write ``(?:...)``); its first match stays, everything else is masked. A
  value it does not match is masked entirely (fail closed).
* ``keep``: a named pattern, ``email-domain`` (``@`` and the domain) or
  ``last-4-digits`` (the last four digits and the characters between them).

``ignore`` lists characters that are never masked (separators such as ``-``
or ``@``). Each character (Unicode code point) masked becomes one ``char``,
so the length in characters is kept. Strings only; nulls stay null. Every
step is a pyarrow kernel (``utf8_slice_codeunits``, ``binary_repeat``,
``replace_substring_regex``, ``extract_regex``), no Python per row.

>>> import pyarrow as pa
>>> from cape_pipelines.transforms.base import ColumnContext
>>> Mask(keep_last=4).apply(pa.array(["4111111111111111", None]), ColumnContext("c")).to_pylist()
['************1111', None]
>>> Mask(keep="email-domain").apply(pa.array(["ann@example.com"]), ColumnContext("e")).to_pylist()
['***@example.com']
"""

from __future__ import annotations

from typing import ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from ..errors import TransformError
from ._text import is_text
from .base import ColumnContext, ColumnTransformation, SqlArg, SqlFunction

NAMED_PATTERNS = {
    "email-domain": r"@[^@]*$",
    "last-4-digits": r"\d\D*\d\D*\d\D*\d\D*$",
}


def re2_class(chars: str, *, negate: bool = False) -> str:
    """An RE2 character class of exactly ``chars`` (or all but them), whatever they are.

    Every ASCII punctuation character is backslash-escaped (RE2 accepts that for
    all of them, and it keeps ``]``, ``\\``, ``^`` and ``-`` literal); other
    characters stand for themselves.
    """
    body = "".join(
        "\\" + c if c.isascii() and not c.isalnum() and c.isprintable() else c
        for c in sorted(set(chars))
    )
    return f"[{'^' if negate else ''}{body}]"


def _regex_problem(pattern: str) -> str | None:
    """Why pyarrow's RE2 cannot use ``pattern`` as the kept part, or None."""
    try:
        pc.extract_regex(pa.array([], pa.string()), f"(?P<keep>{pattern})")
    except pa.ArrowInvalid as exc:
        text = str(exc)
        if "unnamed groups" in text:
            return "keep_pattern must not contain capturing groups; write (?:...) instead"
        return f"keep_pattern is not a valid RE2 regular expression: {text}"
    return None


class Mask(ColumnTransformation):
    """Replace characters by ``char``, keeping the first/last N or the part a pattern matches."""

    type_name: ClassVar[str] = "mask"
    sql_functions: ClassVar[tuple[SqlFunction, ...]] = (
        SqlFunction(
            "mask",
            (
                SqlArg("keep_first", convert=int, required=False),
                SqlArg("keep_last", convert=int, required=False),
                SqlArg("char", required=False),
            ),
            pa.string(),
        ),
    )

    char: str = "*"
    keep_first: int = Field(default=0, ge=0)
    keep_last: int = Field(default=0, ge=0)
    keep_pattern: str | None = None
    keep: Literal["email-domain", "last-4-digits"] | None = None
    ignore: str = ""

    @field_validator("char")
    @classmethod
    def _one_char(cls, value: str) -> str:
        if len(value) != 1:
            raise ValueError("char must be exactly one character")
        return value

    @field_validator("keep_pattern")
    @classmethod
    def _valid_pattern(cls, value: str | None) -> str | None:
        if value is not None:
            problem = _regex_problem(value)
            if problem:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _one_way(self) -> Mask:
        ways = [self.keep_first or self.keep_last, self.keep_pattern, self.keep]
        if sum(1 for w in ways if w) > 1:
            raise ValueError(
                "give one of keep_first/keep_last, keep_pattern or keep (a named pattern)"
            )
        return self

    @property
    def pattern(self) -> str | None:
        """The regular expression of the kept part, if one was given (named or not)."""
        return NAMED_PATTERNS[self.keep] if self.keep is not None else self.keep_pattern

    def output_type(self, input_type: pa.DataType, column: str) -> pa.DataType:
        """A string column, from a string column."""
        value_type = input_type.value_type if pa.types.is_dictionary(input_type) else input_type
        if not (is_text(value_type) or pa.types.is_null(value_type)):
            raise self.refuse(column, input_type, "a string column")
        return pa.string()

    def _mask_all(self, values: pa.Array) -> pa.Array:
        """Every character of ``values`` masked (except ``ignore``d ones)."""
        if not self.ignore:
            return pc.binary_repeat(pa.scalar(self.char, pa.string()), pc.utf8_length(values))
        pattern = "(?s)" + re2_class(self.ignore, negate=True)
        return pc.replace_substring_regex(values, pattern, self.char.replace("\\", "\\\\"))

    def apply(self, array: pa.Array, ctx: ColumnContext) -> pa.Array:
        """The masked strings; nulls stay null."""
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        if pa.types.is_dictionary(array.type):
            array = array.dictionary_decode()
        if pa.types.is_null(array.type):
            return pa.nulls(len(array), pa.string())
        values = array.cast(pa.string())
        try:
            return self._apply(values)
        except pa.ArrowInvalid as exc:
            raise TransformError(f"masking failed: {exc}") from None

    def _apply(self, values: pa.Array) -> pa.Array:
        pattern = self.pattern
        if pattern is not None:
            parts = pc.extract_regex(values, f"(?s)^(?P<pre>.*?)(?P<keep>{pattern})(?P<post>.*)$")
            pre, kept, post = (pc.struct_field(parts, i) for i in range(3))
            joined = pc.binary_join_element_wise(
                self._mask_all(pre), kept, self._mask_all(post), ""
            )
            matched = pc.fill_null(pc.is_valid(parts), False)
            return pc.if_else(matched, joined, self._mask_all(values))
        first, last = self.keep_first, self.keep_last
        if not first and not last:
            return self._mask_all(values)
        lengths = pc.utf8_length(values)
        long_enough = pc.greater(lengths, first + last)
        parts = []
        if first:
            parts.append(pc.utf8_slice_codeunits(values, 0, first))
        if self.ignore:
            middle = pc.utf8_slice_codeunits(values, first, -last if last else None)
            parts.append(self._mask_all(middle))
        else:
            # One length pass serves both the masked count and the short-value test.
            count = pc.max_element_wise(pc.subtract(lengths, first + last), 0)
            parts.append(pc.binary_repeat(pa.scalar(self.char, pa.string()), count))
        if last:
            parts.append(pc.utf8_slice_codeunits(values, -last))
        joined = pc.binary_join_element_wise(*parts, "")
        if pc.all(pc.fill_null(long_enough, True)).as_py():
            # The usual case: no value short enough to be masked whole.
            return joined
        return pc.if_else(long_enough, joined, self._mask_all(values))
