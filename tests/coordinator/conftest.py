"""Fixtures: a real coordinator (uvicorn in a subprocess on 127.0.0.1), its tokens and clients."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _coord_support import ROLES, Server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/coordinator/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.coordinator)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(
        tmp_path_factory.mktemp("coordinator"),
        "--max-body-bytes",
        "1000000",
        "--lost-after",
        "5",
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def tokens(server: Server) -> dict[str, str]:
    """One token per role; the pipeline token may use labels ``customers`` and ``matrix``."""
    admin = server.client(server.admin_token)
    out = {"admin": server.admin_token}
    for role in ROLES[1:]:
        labels = ["customers", "matrix"] if role == "pipeline" else []
        out[role] = admin.create_token(f"{role}-person", role, labels=labels)["token"]
    return out


@pytest.fixture(scope="session")
def clients(server: Server, tokens: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("clients")
    return {role: server.client(token, spool_dir=base / role) for role, token in tokens.items()}


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[Server]:
    """A coordinator of its own, for tests that stop and restart it."""
    srv = Server(tmp_path / "coord")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
