"""What every coordinator service shares: who is calling, and the names it may use.

Kept apart from the services so that each of them (tokens, policies, secrets,
the audit chain, ingest, runs) imports it without importing another service.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ApiError

ROLES = ("admin", "author", "reviewer", "pipeline", "auditor", "requester")
# A token a pipeline mints for its job's workers: reads one label's keys, nothing else, and
# expires. Not in ROLES: no one makes one through the token API, only a pipeline token.
WORKER_ROLE = "worker"
# A token a pipeline mints for the workers that write its run's records (Beam's, which have
# no driver at run time): posts audit records for one label, nothing else (no keys), and
# expires. Not in ROLES either.
AUDIT_WRITER_ROLE = "audit-writer"
# Roles scoped to the labels they hold.
LABELLED_ROLES = ("pipeline", WORKER_ROLE, AUDIT_WRITER_ROLE)
RUN_EVENTS = ("run.started", "policy.fetched", "run.completed", "run.failed")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PRINCIPAL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")


# NUL and control characters other than tab and line breaks: refused in every stored
# string (PostgreSQL cannot store NUL at all; the others only hide text in logs and views).
CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def control_char_locations(value: object, where: str = "") -> list[str]:
    """Where in ``value`` (nested mappings, lists, keys too) a string holds such a character."""
    found: list[str] = []
    if isinstance(value, str):
        if CONTROL_RE.search(value):
            found.append(where or "value")
    elif isinstance(value, dict):
        for k, v in value.items():
            here = f"{where}.{k}" if where else str(k)
            if isinstance(k, str) and CONTROL_RE.search(k):
                found.append(f"{where or 'value'} (a key)")
            found.extend(control_char_locations(v, here))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found.extend(control_char_locations(v, f"{where}[{i}]"))
    return found


def refuse_control_chars(value: object, where: str) -> None:
    """422 ``invalid_text`` naming where a NUL or control character was found."""
    found = control_char_locations(value, where)
    if found:
        raise ApiError(
            422,
            "invalid_text",
            f"NUL or control character in {found[0]}",
            problems=[{"loc": loc, "msg": "NUL or control character"} for loc in found[:50]],
        )


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's id, name (the person or job), role and allowed labels."""

    token_id: str
    name: str
    role: str
    labels: tuple[str, ...] = ()


def check_label_access(actor: Principal, label: str) -> None:
    """403 when a pipeline (worker, audit-writer) token asks for a label it does not hold."""
    if actor.role in LABELLED_ROLES and label not in actor.labels:
        raise ApiError(403, "label_forbidden", "token is not allowed for this policy label")
