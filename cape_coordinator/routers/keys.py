"""Named keys: create and rotate (admin), list (admin, auditor), material for a label
(its pipeline tokens and the worker tokens they mint, never cached by intermediaries, every
read audited), and minting the tokens a pipeline token of the label gives its workers: a
worker token (reads the label's keys) and an audit-writer token (posts its run records)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from ..schemas import KeyCreate, KeyInfo, KeyMaterial, LabelKeys, TokenCreated, WorkerTokenCreate
from ..services.base import WORKER_ROLE, Principal
from .deps import Coord, KeyNamePath, LabelPath, require

router = APIRouter(tags=["keys"])
Admin = Annotated[Principal, Depends(require("admin"))]


@router.post("/v1/keys", status_code=201)
def create_key(body: KeyCreate, coord: Coord, p: Admin) -> KeyInfo:
    """Make a named random 32-byte key for pipelines of the given labels."""
    return KeyInfo(**coord.secrets.create(p, body.name, body.labels))


@router.get("/v1/keys")
def list_keys(
    coord: Coord, _p: Annotated[Principal, Depends(require("admin", "auditor"))]
) -> list[KeyInfo]:
    """Every key's name, labels and versions (never material)."""
    return [KeyInfo(**k) for k in coord.secrets.list()]


@router.post("/v1/keys/{name}/rotate")
def rotate_key(name: KeyNamePath, coord: Coord, p: Admin) -> KeyInfo:
    """A new current version; old versions stay readable for reversal."""
    return KeyInfo(**coord.secrets.rotate(p, name))


@router.get("/v1/labels/{label}/keys")
def label_keys(
    label: LabelPath,
    response: Response,
    coord: Coord,
    p: Annotated[Principal, Depends(require("pipeline", WORKER_ROLE))],
) -> LabelKeys:
    """Key material for a label (pipeline and worker tokens of that label only; every read
    audited)."""
    response.headers["Cache-Control"] = "no-store"
    keys = coord.secrets.for_label(p, label)
    return LabelKeys(label=label, keys={n: KeyMaterial(**k) for n, k in keys.items()})


@router.post("/v1/labels/{label}/worker-tokens", status_code=201)
def mint_worker_token(
    label: LabelPath,
    body: WorkerTokenCreate,
    response: Response,
    coord: Coord,
    p: Annotated[Principal, Depends(require("pipeline"))],
) -> TokenCreated:
    """A token for a job's workers: reads this label's keys only, nothing else, and expires
    (``expires_in``, at most a day and never past the calling pipeline token)."""
    response.headers["Cache-Control"] = "no-store"
    info, token = coord.tokens.mint_worker(p, label, body.expires_in)
    return TokenCreated(**info, token=token)


@router.post("/v1/labels/{label}/audit-tokens", status_code=201)
def mint_audit_token(
    label: LabelPath,
    body: WorkerTokenCreate,
    response: Response,
    coord: Coord,
    p: Annotated[Principal, Depends(require("pipeline"))],
) -> TokenCreated:
    """A token for the workers that write a run's records (Beam's): posts this label's audit
    records only (no keys, nothing else), and expires (``expires_in``, at most a day and
    never past the calling pipeline token)."""
    response.headers["Cache-Control"] = "no-store"
    info, token = coord.tokens.mint_audit_writer(p, label, body.expires_in)
    return TokenCreated(**info, token=token)
