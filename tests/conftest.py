"""Shared fixtures for the whole suite (engine-specific ones live beside their tests)."""

from typing import Any

import pytest


@pytest.fixture(scope="session")
def spark() -> Any:
    """The one local SparkSession of this test session (see ``tests/_spark.py``)."""
    pytest.importorskip("pyspark")
    from _spark import get_spark

    return get_spark()
