"""Redaction: ``column-redact`` removes columns, ``row-redact`` removes rows.

Row redaction fails closed: a row whose condition is true *or null* is removed.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import PrivateAttr, field_validator

from ..conditions import Condition, parse_condition
from .base import ColumnDrop, RowFilter


class ColumnRedact(ColumnDrop):
    """Remove ``columns`` (or, inside a ``match`` rule with no ``columns``, the matched ones)."""

    type_name: ClassVar[str] = "column-redact"


class RowRedact(RowFilter):
    """Remove every row where ``condition`` is true or null."""

    type_name: ClassVar[str] = "row-redact"

    _parsed: Condition = PrivateAttr()

    @field_validator("condition")
    @classmethod
    def _check_condition(cls, value: str) -> str:
        parse_condition(value)
        return value

    def model_post_init(self, context: Any) -> None:
        self._parsed = parse_condition(self.condition)

    @property
    def parsed(self) -> Condition:
        """The parsed condition (an AST, compiled against a schema at plan time)."""
        return self._parsed
