"""Fixtures for the orchestrator tests: an in-process coordinator with endpoints configured."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cape_coordinator.config import Paths, Settings
from cape_coordinator.coordinator import Coordinator


@pytest.fixture
def make_coord(tmp_path: Path) -> Iterator[Callable[..., Coordinator]]:
    made: list[Coordinator] = []

    def make(*endpoints: dict[str, Any], **settings: Any) -> Coordinator:
        paths = Paths.resolve(str(tmp_path / f"c{len(made)}.db"))
        coord, _ = Coordinator.initialize(
            paths, Settings(orchestrators=list(endpoints), **settings)
        )
        made.append(coord)
        return coord

    yield make
    for coord in made:
        coord.close()
