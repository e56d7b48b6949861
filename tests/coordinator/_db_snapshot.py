"""Row counts of every table of a coordinator's database, to show a refused request stored nothing.

A 4xx that still wrote a row (half an audit batch, a token, a policy version)
would be a refusal in name only; each refusal test takes a snapshot before the
request and compares it after. Works on the SQLite file or a database URL.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def row_counts(db: Path | str) -> dict[str, int]:
    """``{table: rows}`` for every table of ``db`` (a SQLite path or a SQLAlchemy URL)."""
    text = str(db)
    if "://" not in text:
        with contextlib.closing(sqlite3.connect(f"file:{text}?mode=ro", uri=True)) as conn:
            names = [
                row[0]
                for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND name NOT LIKE 'sqlite_%'"
                )
            ]
            return {n: conn.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names}
    import sqlalchemy as sa

    engine = sa.create_engine(text)
    try:
        with engine.connect() as conn:
            names = sa.inspect(conn).get_table_names()
            return {
                n: conn.execute(sa.text(f'SELECT count(*) FROM "{n}"')).scalar_one() for n in names
            }
    finally:
        engine.dispose()


@contextlib.contextmanager
def stores_nothing(server: Any) -> Iterator[None]:
    """Assert that the block leaves every table of ``server``'s database as it was."""
    before = row_counts(server.db)
    yield
    after = row_counts(server.db)
    changed = {
        t: (before.get(t), after.get(t)) for t in {*before, *after} if before.get(t) != after.get(t)
    }
    assert not changed, f"a refused request changed the database (rows before, after): {changed}"
