"""Fixtures: a real coordinator (uvicorn in a subprocess on 127.0.0.1), its tokens and clients.

The server fixtures are parametrised over the database: every test using them
runs once on SQLite and once on PostgreSQL (a throwaway cluster, see
``_postgres.py``; skipped visibly without the binaries, a failure in CI).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _coord_support import ROLES, Server
from _postgres import Cluster, pg_bin_dir, unavailable

DATABASES = ["sqlite", "postgresql"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/coordinator/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.coordinator)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """One PostgreSQL cluster for the whole session."""
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


def _db_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None
    cluster: Cluster = request.getfixturevalue("pg_cluster")
    return cluster.new_database()


@pytest.fixture(scope="session", params=DATABASES)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    srv = Server(
        tmp_path_factory.mktemp("coordinator"),
        "--max-body-bytes",
        "1000000",
        "--lost-after",
        "5",
        "--api-docs",
        db_url=_db_url(request),
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


@pytest.fixture(params=DATABASES)
def fresh_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    """A coordinator of its own, for tests that stop and restart it."""
    srv = Server(tmp_path / "coord", db_url=_db_url(request))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
