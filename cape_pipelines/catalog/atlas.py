"""Apache Atlas exchange: the catalog's datasets, columns and tags as Atlas v2 JSON, and back.

:func:`export_catalog` turns catalog datasets (as ``GET /v1/catalog/datasets``
returns them) into one JSON document in Atlas's REST shapes: ``typedefs``
(``AtlasTypesDef``: the ``cape_dataset`` and ``cape_column`` entity types, both
``DataSet``s, the ``cape_dataset_columns`` composition between them, and one
classification type per tag in use, named as the tag) and ``entities``
(``AtlasEntitiesWithExtInfo``: one entity per dataset and per column, negative
placeholder guids, each column's tags as its ``classifications``).
Qualified names are ``DATASET@NAMESPACE`` and ``DATASET.COLUMN@NAMESPACE``.

:func:`classifications_from` reads classifications back from such a document
or from Atlas's own answers (an ``AtlasEntityWithExtInfo`` or
``AtlasEntitiesWithExtInfo``), for ``cape_column`` entities of the namespace.
The catalog stores them as *pending proposals* (detector ``atlas``): a person
accepts them, as with the scanner's.

:class:`AtlasClient` pushes an export (``POST``, or ``PUT`` for types Atlas
already has, ``/api/atlas/v2/types/typedefs``; ``POST
/api/atlas/v2/entity/bulk``) and pulls a dataset (``GET
/api/atlas/v2/entity/uniqueAttribute/type/cape_dataset``) with HTTP basic
authentication. No Atlas ships here: the tests check the requests' shape
against a local server.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..errors import CapeError

if TYPE_CHECKING:
    import requests

__all__ = ["AtlasClient", "AtlasError", "classifications_from", "export_catalog", "typedefs"]

DATASET_TYPE = "cape_dataset"
COLUMN_TYPE = "cape_column"
RELATIONSHIP_TYPE = "cape_dataset_columns"
DEFAULT_NAMESPACE = "cape"


class AtlasError(CapeError):
    """Atlas refused a request, could not be reached, or sent something unreadable."""


def _attr(name: str, type_name: str, optional: bool = True, unique: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "typeName": type_name,
        "isOptional": optional,
        "cardinality": "SINGLE",
        "isUnique": unique,
        "isIndexable": unique,
        "valuesMinCount": 0 if optional else 1,
        "valuesMaxCount": 1,
    }


def typedefs(tags: Iterable[str], descriptions: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``AtlasTypesDef`` an export needs: the two entity types, their relationship, and a
    classification type per tag."""
    descriptions = descriptions or {}
    return {
        "enumDefs": [],
        "structDefs": [],
        "classificationDefs": [
            {
                "name": tag,
                "description": descriptions.get(tag, f"Cape catalog tag {tag}"),
                "superTypes": [],
                "attributeDefs": [],
                "entityTypes": [COLUMN_TYPE, DATASET_TYPE],
            }
            for tag in sorted(set(tags))
        ],
        "entityDefs": [
            {
                "name": DATASET_TYPE,
                "description": "a dataset in the Cape Pipelines catalog",
                "superTypes": ["DataSet"],
                "attributeDefs": [],
            },
            {
                "name": COLUMN_TYPE,
                "description": "a column of a Cape Pipelines catalog dataset",
                "superTypes": ["DataSet"],
                "attributeDefs": [_attr("type", "string")],
            },
        ],
        "relationshipDefs": [
            {
                "name": RELATIONSHIP_TYPE,
                "relationshipCategory": "COMPOSITION",
                "propagateTags": "NONE",
                "endDef1": {
                    "type": DATASET_TYPE,
                    "name": "columns",
                    "isContainer": True,
                    "cardinality": "SET",
                    "isLegacyAttribute": False,
                },
                "endDef2": {
                    "type": COLUMN_TYPE,
                    "name": "dataset",
                    "isContainer": False,
                    "cardinality": "SINGLE",
                    "isLegacyAttribute": False,
                },
            }
        ],
    }


def export_catalog(
    datasets: Iterable[Mapping[str, Any]], namespace: str = DEFAULT_NAMESPACE
) -> dict[str, Any]:
    """``{"typedefs": AtlasTypesDef, "entities": AtlasEntitiesWithExtInfo}`` for datasets in
    the catalog's JSON form (name, owner, columns with type and tags)."""
    entities: list[dict[str, Any]] = []
    used: set[str] = set()
    guid = 0
    for ds in datasets:
        guid -= 1
        ds_guid = str(guid)
        entities.append(
            {
                "typeName": DATASET_TYPE,
                "guid": ds_guid,
                "attributes": {
                    "qualifiedName": f"{ds['name']}@{namespace}",
                    "name": ds["name"],
                    "owner": ds["owner"],
                },
                "classifications": [],
            }
        )
        for col in ds["columns"]:
            guid -= 1
            tags = sorted({t["tag"] if isinstance(t, Mapping) else t for t in col["tags"]})
            used.update(tags)
            entities.append(
                {
                    "typeName": COLUMN_TYPE,
                    "guid": str(guid),
                    "attributes": {
                        "qualifiedName": f"{ds['name']}.{col['name']}@{namespace}",
                        "name": col["name"],
                        "type": col["type"],
                    },
                    "relationshipAttributes": {
                        "dataset": {"guid": ds_guid, "typeName": DATASET_TYPE}
                    },
                    "classifications": [
                        {"typeName": t, "entityGuid": str(guid), "propagate": False} for t in tags
                    ],
                }
            )
    return {"typedefs": typedefs(used), "entities": {"entities": entities, "referredEntities": {}}}


def _entities(document: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Every entity of an export, an ``AtlasEntitiesWithExtInfo`` or an
    ``AtlasEntityWithExtInfo`` (with its referred entities)."""
    body: Any = document.get("entities", document)
    out: list[Mapping[str, Any]] = []
    if isinstance(body, Mapping):
        if isinstance(body.get("entities"), list):
            out.extend(e for e in body["entities"] if isinstance(e, Mapping))
        if isinstance(body.get("entity"), Mapping):
            out.append(body["entity"])
        referred = body.get("referredEntities")
        if isinstance(referred, Mapping):
            out.extend(e for e in referred.values() if isinstance(e, Mapping))
    elif isinstance(body, list):
        out.extend(e for e in body if isinstance(e, Mapping))
    return out


def classifications_from(
    document: Mapping[str, Any], namespace: str = DEFAULT_NAMESPACE
) -> dict[str, dict[str, list[str]]]:
    """``{dataset: {column: [classification, ...]}}`` of the ``cape_column`` entities of
    ``namespace`` in an Atlas JSON document; other entities are ignored."""
    out: dict[str, dict[str, list[str]]] = {}
    suffix = f"@{namespace}"
    for entity in _entities(document):
        if entity.get("typeName") != COLUMN_TYPE:
            continue
        attrs = entity.get("attributes")
        qn = attrs.get("qualifiedName") if isinstance(attrs, Mapping) else None
        if not isinstance(qn, str) or not qn.endswith(suffix):
            continue
        name = attrs.get("name") if isinstance(attrs, Mapping) else None
        path = qn[: -len(suffix)]
        if not isinstance(name, str) or not path.endswith("." + name):
            raise AtlasError(f"entity {qn!r}: its qualifiedName does not end with its name")
        dataset = path[: -len(name) - 1]
        tags = sorted(
            {
                c["typeName"]
                for c in entity.get("classifications") or []
                if isinstance(c, Mapping) and isinstance(c.get("typeName"), str)
            }
        )
        if tags:
            out.setdefault(dataset, {})[name] = tags
    return out


def _requests() -> ModuleType:
    """``requests``, imported only for push/pull: export and import of files need no HTTP
    client, so the module imports where only the core is installed."""
    try:
        import requests
    except ImportError:  # pragma: no cover - the client extra brings it
        raise AtlasError(
            "pushing to or pulling from Atlas needs requests: pip install 'cape-pipelines[client]'"
        ) from None
    return requests


class AtlasClient:
    """Push an export to, and pull a dataset from, an Atlas server's REST API (v2)."""

    def __init__(
        self,
        url: str,
        user: str | None = None,
        password: str | None = None,
        *,
        timeout: float = 30.0,
        session: requests.Session | None = None,
    ):
        if not url.startswith(("http://", "https://")):
            raise AtlasError(f"Atlas URL must start with http:// or https://: {url}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = session or _requests().Session()
        if user is not None:
            self.session.auth = (user, password or "")

    def __repr__(self) -> str:
        return f"AtlasClient({self.url!r})"

    def _call(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kw: Any) -> Any:
        try:
            resp = self.session.request(method, self.url + path, timeout=self.timeout, **kw)
        except _requests().RequestException as exc:
            raise AtlasError(f"cannot reach Atlas at {self.url} ({type(exc).__name__})") from None
        if resp.status_code not in ok:
            raise AtlasError(f"Atlas answered {resp.status_code} to {method} {path}")
        try:
            return resp.json() if resp.content else None
        except ValueError:
            raise AtlasError(f"Atlas sent a non-JSON answer to {method} {path}") from None

    def push(self, export: Mapping[str, Any]) -> dict[str, Any]:
        """Create the types (update those Atlas already has), then the entities."""
        path = "/api/atlas/v2/types/typedefs"
        defs = export["typedefs"]
        try:
            self._call("POST", path, json=defs)
        except AtlasError as exc:
            if "answered 409" not in str(exc):  # other refusals are not "already there"
                raise
            self._call("PUT", path, json=defs)
        result = self._call("POST", "/api/atlas/v2/entity/bulk", json=export["entities"])
        return result if isinstance(result, dict) else {}

    def pull(self, dataset: str, namespace: str = DEFAULT_NAMESPACE) -> dict[str, Any]:
        """A dataset's entity with its columns (referred entities) and their classifications."""
        result = self._call(
            "GET",
            f"/api/atlas/v2/entity/uniqueAttribute/type/{DATASET_TYPE}",
            params={"attr:qualifiedName": f"{dataset}@{namespace}"},
        )
        if not isinstance(result, dict):
            raise AtlasError("Atlas sent no entity")
        return result
