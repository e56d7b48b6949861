"""What every coordinator service shares: who is calling, and the names it may use.

Kept apart from the services so that each of them (tokens, policies, secrets,
the audit chain, ingest, runs) imports it without importing another service.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ApiError

ROLES = ("admin", "author", "reviewer", "pipeline", "auditor", "requester")
RUN_EVENTS = ("run.started", "policy.fetched", "run.completed", "run.failed")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PRINCIPAL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's id, name (the person or job), role and allowed labels."""

    token_id: str
    name: str
    role: str
    labels: tuple[str, ...] = ()


def check_label_access(actor: Principal, label: str) -> None:
    """403 when a pipeline token asks for a label it does not hold."""
    if actor.role == "pipeline" and label not in actor.labels:
        raise ApiError(403, "label_forbidden", "token is not allowed for this policy label")
