"""Former home of the coordinator's service layer, kept so existing imports keep working.

The class that lived here is now :class:`cape_coordinator.coordinator.Coordinator`,
assembled from one service per job in :mod:`cape_coordinator.services`. New code
imports from those modules; this one only re-exports.
"""

from __future__ import annotations

from .coordinator import SCHEMA_VERSION, Coordinator
from .services.base import ROLES, RUN_EVENTS, Principal
from .services.chain import GENESIS, VerifyResult, verify_chain
from .services.ingest import GroupWriter as _GroupWriter
from .services.ingest import PendingBatch as _PendingBatch
from .services.policies import canonical_yaml, inline_key_locations
from .services.tokens import TOKEN_CACHE_SECONDS

__all__ = [
    "GENESIS",
    "ROLES",
    "RUN_EVENTS",
    "SCHEMA_VERSION",
    "TOKEN_CACHE_SECONDS",
    "Coordinator",
    "Principal",
    "VerifyResult",
    "_GroupWriter",
    "_PendingBatch",
    "canonical_yaml",
    "inline_key_locations",
    "verify_chain",
]
