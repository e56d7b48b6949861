"""Liveness, the caller's identity and the policy signing key."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from ..schemas import SigningKey, WhoAmI
from ..services.base import Principal
from .deps import ALL_ROLES, Coord, require

router = APIRouter(tags=["meta"])
Anyone = Annotated[Principal, Depends(require(*ALL_ROLES))]


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness (no authentication)."""
    return {"status": "ok"}


@router.get("/v1/whoami")
def whoami(p: Anyone) -> WhoAmI:
    """The calling token's identity and role."""
    return WhoAmI(token_id=p.token_id, name=p.name, role=p.role, labels=list(p.labels))


@router.get("/v1/signing-key")
def signing_key(coord: Coord, _p: Anyone) -> SigningKey:
    """The Ed25519 public key policies are signed with (pin it out of band too)."""
    return SigningKey(public_key=coord.public_key_text)
