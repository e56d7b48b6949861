"""Engine-suite fixtures: the session's Dask ``LocalCluster`` is closed when the session ends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import runners


@pytest.fixture(scope="session", autouse=True)
def _close_dask_cluster() -> Iterator[None]:
    yield
    runners.close_distributed()


@pytest.fixture(scope="session")
def dask_client():
    """The session's ``distributed`` client: a LocalCluster with two worker processes."""
    pytest.importorskip("distributed")
    return runners.distributed_client()
