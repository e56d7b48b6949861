"""Schema versions: the coordinator's database is upgraded by Alembic migrations.

The migrations ship inside the package (``cape_coordinator/migrations``) and run
on a connection the coordinator opens, so no ``alembic.ini`` is needed. A
database made before migrations existed (the first-wave schema, no
``alembic_version`` table) is stamped with revision ``0001`` and upgraded from
there. Concurrent upgrades (two replicas starting at once) are serialised:
``BEGIN IMMEDIATE`` on SQLite, a transaction-scoped advisory lock on PostgreSQL.
"""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

FIRST_WAVE = "0001"
# An arbitrary constant naming the coordinator's migration lock on PostgreSQL.
_PG_LOCK = 0x43415045


def _config(conn: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "cape_coordinator:migrations")
    if conn is not None:
        cfg.attributes["connection"] = conn
    return cfg


def head() -> str:
    """The newest revision this code knows."""
    return str(ScriptDirectory.from_config(_config()).get_current_head())


def current(engine: Engine) -> str | None:
    """The database's revision; ``FIRST_WAVE`` for an unversioned first-wave database,
    None for an empty one."""
    with engine.connect() as conn:
        return _current(conn)


def _current(conn: Connection) -> str | None:
    rev = MigrationContext.configure(conn).get_current_revision()
    if rev is None and inspect(conn).has_table("settings"):
        return FIRST_WAVE
    return rev


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the database to the newest revision; returns (revision before, after)."""
    with engine.connect() as conn:
        conn.execution_options(cape_write=True)
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})
            before = _current(conn)
            if (
                before == FIRST_WAVE
                and MigrationContext.configure(conn).get_current_revision() is None
            ):
                command.stamp(_config(conn), FIRST_WAVE)
            command.upgrade(_config(conn), "head")
            after = _current(conn)
    return before, str(after)
