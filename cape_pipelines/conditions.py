"""Placeholder conditions module (being written)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc


class Condition:
    def __init__(self, text: str):
        self.text = text

    def columns(self) -> set[str]:
        return set()

    def to_expression(self, schema: pa.Schema) -> pc.Expression:
        raise NotImplementedError


def parse_condition(text: str) -> Condition:
    return Condition(text)
