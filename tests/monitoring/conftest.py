"""Fixtures for the monitoring tests: the coordinator suite's throwaway PostgreSQL cluster
(``tests/coordinator/_postgres.py``), so the database figures are checked on both
databases the coordinator runs on."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "coordinator"))

from _postgres import Cluster, pg_bin_dir, unavailable


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """One PostgreSQL cluster for the session (skipped visibly without it, failed in CI)."""
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        unavailable("initdb/pg_ctl not found (apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("the psycopg driver is not installed (the coordinator extra)")
    cluster = Cluster(bin_dir)  # type: ignore[arg-type]
    try:
        cluster.start()
    except RuntimeError as exc:
        cluster.stop()
        unavailable(str(exc))
    try:
        yield cluster
    finally:
        cluster.stop()
