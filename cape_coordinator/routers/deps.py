"""What every router depends on: the coordinator of the app, and role checks on the caller.

Every ``/v1`` endpoint takes ``Authorization: Bearer TOKEN`` and names the roles
it admits (see ``docs/coordinator/roles.md``): 401 without a valid token, 403
for a role the endpoint does not admit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from cape_pipelines.policy.models import LABEL_RE

from ..coordinator import Coordinator
from ..errors import ApiError
from ..services.base import ROLES, Principal

ALL_ROLES = ROLES
READERS = ("admin", "author", "reviewer", "auditor")
LabelPath = Annotated[str, Path(pattern=f"^{LABEL_RE.pattern}$", max_length=128)]
VersionPath = Annotated[int, Path(ge=1, le=2**31 - 1)]
KeyNamePath = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]

_bearer = HTTPBearer(auto_error=False, description="an API token: `cape token create`")


def coordinator(request: Request) -> Coordinator:
    """The coordinator the app serves."""
    return request.app.state.coordinator  # type: ignore[no-any-return]


Coord = Annotated[Coordinator, Depends(coordinator)]


def require(*roles: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency admitting tokens of ``roles`` only (401 without a valid token, else 403).

    A token verified in the last second is answered from memory on the event loop;
    otherwise the database is asked from the thread pool (it may block)."""

    async def dependency(
        request: Request,
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        if creds is None:
            raise ApiError(401, "unauthenticated", "send Authorization: Bearer <token>")
        tokens = coordinator(request).tokens
        principal = tokens.cached_principal(creds.credentials)
        if principal is None:
            principal = await run_in_threadpool(tokens.authenticate, creds.credentials)
        if principal.role not in roles:
            raise ApiError(403, "forbidden", f"role {principal.role} may not do this")
        return principal

    dependency.__name__ = f"require_{'_'.join(roles)}"
    return dependency


def checked_time(moment: datetime | None) -> datetime | None:
    """A query time within the years the store can hold, else 422."""
    if moment is None:
        return None
    if not 1 <= moment.year <= 9998:
        raise ApiError(422, "invalid_request", "time is out of range")
    return moment
