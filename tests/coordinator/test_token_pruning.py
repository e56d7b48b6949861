"""Expired worker and audit-writer tokens are pruned; nothing else is, and the chain keeps them.

Every run by label mints a worker token (and Beam's an audit-writer token), so
their rows would pile up forever. A mint also deletes, in a bounded pass, the
minted tokens that expired more than a grace period ago. These tests check what
an operator and an auditor rely on: a token past expiry + grace is gone
(``invalid token``), one within the grace still gets ``token_expired``, a live
one still works, no admin or user token is ever deleted however long expired,
and the ``token.created`` records of the pruned tokens stay in an intact chain.
Time passing is simulated by moving a row's ``expires_at`` back in the database,
the same way on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from _coord_support import Server, new_label

from cape_coordinator import db
from cape_coordinator.config import Paths, Settings
from cape_coordinator.coordinator import Coordinator
from cape_coordinator.errors import ApiError
from cape_coordinator.services import tokens as tokens_module
from cape_coordinator.services.base import Principal

GRACE = tokens_module.MINTED_TOKEN_GRACE_SECONDS
ADMIN = Principal("-", "admin", "admin")
LABEL = "customers"


def _url(database: Path | str) -> str:
    return database if isinstance(database, str) else f"sqlite:///{database}"


def _expire(database: Path | str, token_ids: list[str], ago_seconds: float) -> None:
    """Make these tokens have expired ``ago_seconds`` ago (as if that much time had passed)."""
    stamp = db.format_time(datetime.now(UTC) - timedelta(seconds=ago_seconds))
    engine = sa.create_engine(_url(database))
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.update(db.tokens).where(db.tokens.c.id.in_(token_ids)).values(expires_at=stamp)
            )
    finally:
        engine.dispose()


def _stored_ids(database: Path | str) -> set[str]:
    engine = sa.create_engine(_url(database))
    try:
        with engine.connect() as conn:
            return {r[0] for r in conn.execute(sa.select(db.tokens.c.id))}
    finally:
        engine.dispose()


def _error_code(coord: Coordinator, token: str) -> str | None:
    """The 401 code authenticating ``token`` gives (None: it authenticates)."""
    try:
        coord.tokens.authenticate(token)
    except ApiError as exc:
        assert exc.status == 401
        return str(exc.code)
    return None


# ---- in process (SQLite) -----------------------------------------------------------------


class Setup:
    """A coordinator database with one pipeline token and tokens of every kind to prune or keep."""

    def __init__(self, tmp_path: Path):
        self.paths = Paths.resolve(str(tmp_path / "cape.db"))
        self.coord, _ = Coordinator.initialize(self.paths, Settings())
        _, self.pipe_token = self.coord.create_token(
            ADMIN, name="pipe", role="pipeline", labels=[LABEL]
        )
        self.made: dict[str, tuple[str, str]] = {}

    @property
    def pipe(self) -> Principal:
        return self.coord.tokens.authenticate(self.pipe_token)

    def mint(self, key: str, role: str = "worker", expires_in: int = 3600) -> None:
        mint = (
            self.coord.tokens.mint_worker
            if role == "worker"
            else self.coord.tokens.mint_audit_writer
        )
        info, token = mint(self.pipe, LABEL, expires_in)
        self.made[key] = (info["id"], token)

    def make(self, key: str, role: str, expires_in: int | None = 3600) -> None:
        labels = [LABEL] if role == "pipeline" else []
        info, token = self.coord.create_token(
            ADMIN, name=key, role=role, labels=labels, expires_in=expires_in
        )
        self.made[key] = (info["id"], token)

    def ids(self, *keys: str) -> list[str]:
        return [self.made[k][0] for k in keys]

    def reopen(self) -> None:
        """Close and open the database again: a restarted coordinator's first mint prunes."""
        self.coord.close()
        self.coord = Coordinator.open(self.paths, Settings())

    def expire(self, keys: list[str], ago_seconds: float) -> None:
        _expire(self.paths.sqlite_file, self.ids(*keys), ago_seconds)  # type: ignore[arg-type]

    def stored(self) -> set[str]:
        return _stored_ids(self.paths.sqlite_file)  # type: ignore[arg-type]


@pytest.fixture
def setup(tmp_path: Path) -> Any:
    s = Setup(tmp_path)
    try:
        yield s
    finally:
        s.coord.close()


def test_a_mint_prunes_minted_tokens_past_expiry_and_grace_and_nothing_else(setup: Setup) -> None:
    s = setup
    for key in ("old_worker", "grace_worker", "live_worker", "revoked_worker"):
        s.mint(key)
    for key in ("old_writer", "grace_writer"):
        s.mint(key, role="audit-writer")
    s.coord.tokens.revoke(ADMIN, s.made["revoked_worker"][0])
    # Tokens no mint made, expired far longer ago than any grace: never pruned.
    s.make("old_admin", "admin", expires_in=60)
    s.make("old_pipeline", "pipeline", expires_in=60)
    s.make("old_auditor", "auditor", expires_in=60)
    s.make("forever_author", "author", expires_in=None)
    pruned = ["old_worker", "old_writer", "revoked_worker"]
    s.expire([*pruned, "old_admin", "old_pipeline", "old_auditor"], GRACE + 3600)
    s.expire(["grace_worker", "grace_writer"], GRACE - 3600)
    before = s.stored()
    assert set(s.ids(*s.made)) <= before

    s.reopen()
    s.mint("trigger")

    after = s.stored()
    assert not set(s.ids(*pruned)) & after
    kept = [k for k in s.made if k not in pruned]
    assert set(s.ids(*kept)) <= after
    assert after == (before - set(s.ids(*pruned))) | set(s.ids("trigger"))
    # A pruned token is unknown; one within the grace is still reported as expired.
    for key in pruned:
        assert _error_code(s.coord, s.made[key][1]) == "unauthenticated"
    for key in ("grace_worker", "grace_writer", "old_admin", "old_pipeline", "old_auditor"):
        assert _error_code(s.coord, s.made[key][1]) == "token_expired"
    for key in ("live_worker", "trigger", "forever_author"):
        assert _error_code(s.coord, s.made[key][1]) is None
    assert _error_code(s.coord, s.pipe_token) is None
    # The chain still says each pruned token existed, who minted it and until when; intact.
    created = {
        e["record"]["token_id"]: e["record"]
        for e in s.coord.list_audit(event="token.created", limit=1000)
    }
    for key in pruned:
        rec = created[s.made[key][0]]
        assert rec["name"].endswith(":" + s.pipe.token_id) and rec["expires_at"]
    assert s.coord.verify_audit().intact


def test_pruning_is_bounded_per_pass_and_drains_a_backlog(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = setup
    monkeypatch.setattr(tokens_module, "MINTED_PRUNE_BATCH", 2)
    old = [f"old{i}" for i in range(5)]
    for key in old:
        s.mint(key)
    s.expire(old, GRACE + 60)
    s.reopen()
    left = []
    for i in range(3):
        s.mint(f"trigger{i}")
        left.append(len(set(s.ids(*old)) & s.stored()))
    # Two a pass; a full pass lets the next mint prune again at once.
    assert left == [3, 1, 0]


def test_a_long_running_coordinator_prunes_again_once_the_interval_passed(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = setup
    s.mint("first")  # this process's first pass (nothing to prune yet)
    s.mint("old")
    s.expire(["old"], GRACE + 60)
    s.mint("soon")
    # Within the interval a mint does not scan the table again.
    assert s.made["old"][0] in s.stored()
    # As if the interval had passed since this process's last pass.
    monkeypatch.setattr(tokens_module, "MINTED_PRUNE_INTERVAL_SECONDS", 0.0)
    s.mint("later")
    assert s.made["old"][0] not in s.stored()


def test_a_failing_prune_never_fails_the_mint(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = setup

    def broken(self: Any, **_: Any) -> int:
        raise sa.exc.OperationalError("DELETE", {}, Exception("database is locked"))

    monkeypatch.setattr(tokens_module.TokenService, "prune_expired", broken)
    s.mint("minted")
    assert _error_code(s.coord, s.made["minted"][1]) is None


# ---- over HTTP, SQLite and PostgreSQL --------------------------------------------------------


def _status(server: Server, token: str, label: str) -> tuple[int, str | None]:
    resp = requests.get(
        f"{server.url}/v1/labels/{label}/keys",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    return resp.status_code, resp.json().get("error", {}).get("code") if resp.content else None


def test_a_served_coordinator_prunes_at_the_next_mint(fresh_server: Server) -> None:
    server = fresh_server
    admin = server.client(server.admin_token)
    label = new_label("prune")
    admin.create_key(f"{label}-k", [label])
    pipe = server.client(admin.create_token(label, "pipeline", labels=[label])["token"])
    old = pipe.mint_worker_token(label)
    old_writer = pipe.mint_audit_token(label)
    grace = pipe.mint_worker_token(label)
    live = pipe.mint_worker_token(label)
    server.stop()
    _expire(server.db, [old["id"], old_writer["id"]], GRACE + 600)
    _expire(server.db, [grace["id"]], 600)
    server.start()

    trigger = pipe.mint_worker_token(label)

    stored = _stored_ids(server.db)
    assert old["id"] not in stored and old_writer["id"] not in stored
    assert {grace["id"], live["id"], trigger["id"]} <= stored
    assert _status(server, old["token"], label) == (401, "unauthenticated")
    assert _status(server, grace["token"], label) == (401, "token_expired")
    assert _status(server, live["token"], label)[0] == 200
    listed = {t["id"] for t in admin.list_tokens()}
    assert old["id"] not in listed and live["id"] in listed
    created = {e["record"]["token_id"] for e in admin.list_audit(event="token.created")}
    assert {old["id"], old_writer["id"]} <= created
    assert admin.verify_audit()["intact"]
