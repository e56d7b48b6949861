"""The bundled Cape coordinator: reviewed, signed policies; keys; a tamper-evident audit trail.

An ASGI app (FastAPI) on SQLAlchemy, a SQLite file by default or any SQLAlchemy
URL. Start it with ``cape coordinator init --db cape.db`` then ``cape
coordinator serve --db cape.db``; see ``docs/coordinator/``. Importing this
package needs only the core; the server's dependencies (the ``coordinator``
extra) are imported by :mod:`cape_coordinator.app` and :mod:`cape_coordinator.store`.
"""

from .errors import ApiError

__all__ = ["ApiError"]
