"""Alembic's entry point for the coordinator's migrations.

The coordinator runs migrations itself (:func:`cape_coordinator.migrate.upgrade`)
on a connection it opened, passed in ``config.attributes["connection"]``; there
is no ``alembic.ini`` and no offline (SQL script) mode.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run coordinator migrations through cape_coordinator.migrate.upgrade")
# Batch mode lets ALTER TABLE work on SQLite (table copy) and is plain ALTER elsewhere.
context.configure(connection=connection, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
