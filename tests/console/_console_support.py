"""Support for the workflow and console tests: an in-process coordinator on a temporary
SQLite file, its FastAPI app, and one token per person (two reviewers, for the two-person
rule). The browser tests add a live server and one Chromium (``_browser``)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cape_coordinator.app import create_app  # noqa: E402
from cape_coordinator.config import Paths, Settings  # noqa: E402
from cape_coordinator.coordinator import Coordinator  # noqa: E402
from cape_coordinator.services.base import Principal  # noqa: E402

PEOPLE = {
    "admin": "admin",
    "requester": "rita",
    "author": "alice",
    "reviewer": "bob",
    "reviewer2": "dana",
    "auditor": "carol",
    "pipeline": "nightly",
}

POLICY = {
    "label": "customers",
    "rules": [
        {
            "match": {"name": "email"},
            "actions": [{"transform": {"type": "tokenizer", "key": {"secret": "customers-key"}}}],
        },
        {"match": {"name": "ssn"}, "actions": ["drop"]},
    ],
}


@dataclass
class Coord:
    """A coordinator in this process, its app and a token per person."""

    coord: Coordinator
    app: Any
    tokens: dict[str, str]
    principals: dict[str, Principal]

    def client(self, who: str | None) -> TestClient:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return TestClient(self.app, headers=headers)

    def audit_count(self) -> int:
        return self.coord.audit_count()

    def coord_comments(self, label: str, version: int) -> list[dict[str, Any]]:
        return self.coord.workflow.comments(label, version)


def make_coord(directory: Path, settings: Settings | None = None) -> Coord:
    paths = Paths.resolve(str(directory / "cape.db"))
    coord, admin_token = Coordinator.initialize(paths, settings or Settings())
    app = create_app(coord)
    system = coord.tokens.authenticate(admin_token)
    tokens = {"admin": admin_token}
    principals = {"admin": system}
    for key, name in PEOPLE.items():
        if key == "admin":
            continue
        role = "reviewer" if key.startswith("reviewer") else key
        labels = ["customers", "orders"] if role == "pipeline" else []
        _, token = coord.create_token(system, name=name, role=role, labels=labels)
        tokens[key] = token
        principals[key] = coord.tokens.authenticate(token)
    return Coord(coord, app, tokens, principals)
