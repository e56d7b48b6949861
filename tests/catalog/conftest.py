"""Fixtures for the catalog tests: the workflow tests' in-process coordinator (one token
per person), reused from ``tests/console/_console_support``."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "console"))

from _console_support import Coord, make_coord


@pytest.fixture
def cc(tmp_path: Path) -> Iterator[Coord]:
    """A fresh coordinator in this process with a token per person."""
    c = make_coord(tmp_path)
    try:
        yield c
    finally:
        c.coord.close()
