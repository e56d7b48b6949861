"""API tokens (admin only): create, list, revoke."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response

from ..schemas import TokenCreate, TokenCreated, TokenInfo
from ..services.base import Principal
from .deps import Coord, require

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])
Admin = Annotated[Principal, Depends(require("admin"))]


@router.post("", status_code=201)
def create_token(body: TokenCreate, response: Response, coord: Coord, p: Admin) -> TokenCreated:
    """Make an API token (admin). The token is in this response only (never cached)."""
    response.headers["Cache-Control"] = "no-store"
    info, token = coord.tokens.create(
        p, name=body.name, role=body.role, labels=body.labels, expires_in=body.expires_in
    )
    return TokenCreated(**info, token=token)


@router.get("")
def list_tokens(coord: Coord, _p: Admin) -> list[TokenInfo]:
    """Every token (never its secret)."""
    return [TokenInfo(**t) for t in coord.tokens.list()]


@router.post("/{token_id}/revoke")
def revoke_token(
    token_id: Annotated[str, Path(pattern=r"^[0-9a-f]{16}$")], coord: Coord, p: Admin
) -> TokenInfo:
    """Revoke a token at once."""
    return TokenInfo(**coord.tokens.revoke(p, token_id))
