"""Apache Atlas exchange: the export's typedefs and entities in Atlas v2 shape, classifications
read back (from an export and from Atlas's own entity answer), and push/pull against a
local stand-in server that records every request and checks its shape."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from test_catalog_cli import cape, live, sample  # noqa: F401 - fixtures

from cape_pipelines.catalog.atlas import (
    AtlasClient,
    AtlasError,
    classifications_from,
    export_catalog,
)

DATASETS = [
    {
        "name": "customers",
        "owner": "alice",
        "columns": [
            {"name": "id", "type": "int64", "tags": []},
            {"name": "email", "type": "string", "tags": [{"tag": "pii.email"}]},
            {"name": "ssn", "type": "string", "tags": [{"tag": "pii.ssn"}, {"tag": "pii.name"}]},
        ],
    }
]


def test_export_is_atlas_v2_typedefs_and_entities():
    doc = export_catalog(DATASETS)
    defs = doc["typedefs"]
    entity_defs = {d["name"]: d for d in defs["entityDefs"]}
    assert set(entity_defs) == {"cape_dataset", "cape_column"}
    assert all(d["superTypes"] == ["DataSet"] for d in entity_defs.values())
    (rel,) = defs["relationshipDefs"]
    assert rel["relationshipCategory"] == "COMPOSITION"
    assert (rel["endDef1"]["type"], rel["endDef1"]["name"]) == ("cape_dataset", "columns")
    assert (rel["endDef2"]["type"], rel["endDef2"]["name"]) == ("cape_column", "dataset")
    assert [c["name"] for c in defs["classificationDefs"]] == ["pii.email", "pii.name", "pii.ssn"]
    entities = doc["entities"]["entities"]
    ds = entities[0]
    assert ds["typeName"] == "cape_dataset"
    assert ds["attributes"] == {
        "qualifiedName": "customers@cape",
        "name": "customers",
        "owner": "alice",
    }
    email = next(e for e in entities if e["attributes"]["name"] == "email")
    assert email["attributes"]["qualifiedName"] == "customers.email@cape"
    assert email["relationshipAttributes"]["dataset"] == {
        "guid": ds["guid"],
        "typeName": "cape_dataset",
    }
    assert email["classifications"] == [
        {"typeName": "pii.email", "entityGuid": email["guid"], "propagate": False}
    ]
    guids = [e["guid"] for e in entities]
    assert len(set(guids)) == len(guids) and all(int(g) < 0 for g in guids)


def test_classifications_round_trip_and_read_atlas_answers():
    doc = export_catalog(DATASETS, namespace="prod")
    assert classifications_from(doc, "prod") == {
        "customers": {"email": ["pii.email"], "ssn": ["pii.name", "pii.ssn"]}
    }
    assert classifications_from(doc, "other") == {}
    answer = {
        "entity": {
            "typeName": "cape_dataset",
            "guid": "a",
            "attributes": {"qualifiedName": "my.data@cape"},
        },
        "referredEntities": {
            "b": {
                "typeName": "cape_column",
                "guid": "b",
                "attributes": {"qualifiedName": "my.data.phone@cape", "name": "phone"},
                "classifications": [{"typeName": "pii.phone"}],
            },
            "c": {
                "typeName": "hive_column",
                "attributes": {"qualifiedName": "x.y@cape", "name": "y"},
            },
        },
    }
    # A dataset name with a dot is split by the column's own name, not the first dot.
    assert classifications_from(answer) == {"my.data": {"phone": ["pii.phone"]}}
    bad = {
        "entities": [
            {"typeName": "cape_column", "attributes": {"qualifiedName": "a.b@cape", "name": "c"}}
        ]
    }
    with pytest.raises(AtlasError, match="does not end with its name"):
        classifications_from(bad)


class FakeAtlas:
    """A stand-in for Atlas's REST API on loopback: records requests, checks their shape,
    answers 409 to a second typedef creation (as Atlas does for existing types)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.types: set[str] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> Any:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n)) if n else None

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                body = self._body() if self.command in ("POST", "PUT") else None
                outer.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "auth": self.headers.get("Authorization"),
                        "type": self.headers.get("Content-Type"),
                        "body": body,
                    }
                )
                if self.path == "/api/atlas/v2/types/typedefs":
                    names = {
                        d["name"] for k in ("entityDefs", "classificationDefs") for d in body[k]
                    }
                    if self.command == "POST" and names & outer.types:
                        return self._send(409, {"errorCode": "ATLAS-409-00-001"})
                    outer.types |= names
                    return self._send(200, body)
                if self.path == "/api/atlas/v2/entity/bulk" and self.command == "POST":
                    return self._send(200, {"mutatedEntities": {"CREATE": body["entities"]}})
                if self.path.startswith("/api/atlas/v2/entity/uniqueAttribute/type/cape_dataset?"):
                    return self._send(
                        200,
                        {
                            "entity": {"typeName": "cape_dataset", "guid": "g1"},
                            "referredEntities": {
                                "g2": {
                                    "typeName": "cape_column",
                                    "guid": "g2",
                                    "attributes": {
                                        "qualifiedName": "customers.note@cape",
                                        "name": "note",
                                    },
                                    "classifications": [
                                        {"typeName": "pii.email"},
                                        {"typeName": "PHI"},
                                    ],
                                }
                            },
                        },
                    )
                return self._send(404, {"errorCode": "ATLAS-404-00-005"})

            do_GET = do_POST = do_PUT = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@pytest.fixture
def atlas() -> Iterator[FakeAtlas]:
    fake = FakeAtlas()
    fake.thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()


def test_push_creates_then_updates_types_and_posts_entities(atlas):
    client = AtlasClient(atlas.url, "steward", "s3cret-pw", timeout=10)
    assert "s3cret" not in repr(client)
    doc = export_catalog(DATASETS)
    client.push(doc)
    client.push(doc)
    calls = [(r["method"], r["path"]) for r in atlas.requests]
    assert calls == [
        ("POST", "/api/atlas/v2/types/typedefs"),
        ("POST", "/api/atlas/v2/entity/bulk"),
        ("POST", "/api/atlas/v2/types/typedefs"),  # 409: the types exist
        ("PUT", "/api/atlas/v2/types/typedefs"),
        ("POST", "/api/atlas/v2/entity/bulk"),
    ]
    expected_auth = "Basic " + base64.b64encode(b"steward:s3cret-pw").decode()
    assert all(r["auth"] == expected_auth for r in atlas.requests)
    assert all(r["type"] == "application/json" for r in atlas.requests)
    assert atlas.requests[0]["body"] == doc["typedefs"]
    assert atlas.requests[1]["body"] == doc["entities"]
    with pytest.raises(AtlasError, match="answered 404"):
        AtlasClient(atlas.url + "/nowhere").push(doc)
    with pytest.raises(AtlasError, match="cannot reach"):
        AtlasClient("http://127.0.0.1:9", timeout=2).pull("x")


def test_cli_push_and_pull_through_proposals(live, atlas, tmp_path, monkeypatch):  # noqa: F811
    c, _ = live
    admin = c.principals["admin"]
    c.coord.catalog.register(
        admin, "customers", "alice", {"id": "int64", "note": "string", "email": "string"}
    )
    c.coord.catalog.tag(admin, "customers", "email", "pii.email")
    monkeypatch.setenv("CAPE_ATLAS_URL", atlas.url)
    monkeypatch.setenv("CAPE_ATLAS_USER", "steward")
    monkeypatch.setenv("CAPE_ATLAS_PASSWORD", "s3cret-pw")
    out = cape(live, "auditor", "catalog", "atlas", "push", "--dataset", "customers")
    assert "pushed 4 entities" in out and "s3cret" not in out
    bulk = next(r for r in atlas.requests if r["path"] == "/api/atlas/v2/entity/bulk")
    email = next(e for e in bulk["body"]["entities"] if e["attributes"]["name"] == "email")
    assert [x["typeName"] for x in email["classifications"]] == ["pii.email"]
    # Pulling: Atlas says note holds e-mail addresses (and PHI, not in our taxonomy).
    out = cape(live, "author", "catalog", "atlas", "pull", "customers")
    assert "1 proposal(s) stored as pending, 1 skipped" in out
    assert "customers.note PHI" in out
    pull = atlas.requests[-1]
    assert pull["method"] == "GET" and "attr%3AqualifiedName=customers%40cape" in pull["path"]
    assert c.coord.catalog.column_tags("customers") == {"email": ["pii.email"]}
    (p,) = c.coord.catalog.proposals("customers", "pending")
    assert (p["column"], p["tag"], p["detector"]) == ("note", "pii.email", "atlas")
    # Export to a file and import it: the tags already set are not proposed again.
    path = tmp_path / "atlas.json"
    cape(live, "auditor", "catalog", "atlas", "export", "--output", str(path))
    assert json.loads(path.read_text())["typedefs"]["entityDefs"]
    out = cape(live, "author", "catalog", "atlas", "import", str(path))
    assert "0 proposal(s) stored as pending" in out
