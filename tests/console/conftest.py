"""Fixtures for the workflow and console tests (helpers in ``_console_support``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _console_support import Coord, make_coord


@pytest.fixture
def cc(tmp_path: Path) -> Iterator[Coord]:
    """A fresh coordinator in this process with a token per person."""
    c = make_coord(tmp_path)
    try:
        yield c
    finally:
        c.coord.close()
