"""Apache Arrow Flight integration: ``cape flight serve`` and :class:`CapeFlightServer`.

Datasets go out of the service with their policy applied (``do_get``), and
callers' own batches come back protected (``do_exchange``), so key material
stays inside the service. Needs ``pyarrow.flight`` (part of the pyarrow
wheels); see docs/flight.md.
"""

from __future__ import annotations

from .access import Access, CoordinatorAccess, Grant, StaticAccess, flight_error
from .server import CapeFlightServer, Dataset, ticket_for

__all__ = [
    "Access",
    "CapeFlightServer",
    "CoordinatorAccess",
    "Dataset",
    "Grant",
    "StaticAccess",
    "flight_error",
    "ticket_for",
]
