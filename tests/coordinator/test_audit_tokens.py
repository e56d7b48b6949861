"""Audit-writer tokens, tried as an attacker would: the credential Beam's workers hold to post
a run's records, instead of the pipeline token (which can read the label's keys).

Beam has no driver at run time, so its workers post the run's records
themselves and a credential must travel in the pipeline (which Dataflow, for
one, stores with the job). Anyone who can read the job may hold it. The tests
read exactly what Beam ships for a by-label run and look for the key bytes and
the pipeline token; then try, with the token found there, what such a person
would: read keys or policies, post for another label, write into the
pipeline's own runs, use it after it expired or after its pipeline token was
revoked. The run itself must still land its records with exact counts.
"""

from __future__ import annotations

import base64
import bz2
import glob
import json
import re
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from _coord_support import Server
from _db_snapshot import row_counts
from test_coord_authz import MATRIX
from test_engine_integration import FRAME, SCHEMA, Published, _values

from cape_pipelines.audit import MemorySink, RunContext
from coordinator_client import AuthError, Client

TOKEN_RE = re.compile(rb"cape_[0-9a-f]{16}\.[A-Za-z0-9_-]{43}")


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _post_records(server: Server, token: str, records: list[dict[str, Any]]) -> requests.Response:
    return requests.post(
        server.url + "/v1/audit", json={"records": records}, headers=_auth(token), timeout=30
    )


def _token_id(token: str) -> str:
    return token.split(".")[0].removeprefix("cape_")


def _record(label: str, run_id: str, event: str = "run.started") -> dict[str, Any]:
    """A well-formed run record (as an engine makes it) of ``label``'s run ``run_id``."""
    ctx = RunContext(
        engine="beam",
        sink=MemorySink(),
        policy={"label": label, "version": 1, "sha256": "0" * 64},
        run_id=run_id,
    )
    return ctx.record(event, record_id=f"{run_id}-{event}")


def _shipped(pipeline: Any) -> bytes:
    """What a runner receives: the pipeline proto, and every DoFn payload undone to its pickle
    (Beam compresses and may base64 it)."""
    from apache_beam.portability import common_urns
    from apache_beam.portability.api import beam_runner_api_pb2

    proto = pipeline.to_runner_api()
    parts = [proto.SerializeToString()]
    for transform in proto.components.transforms.values():
        if transform.spec.urn != common_urns.primitives.PAR_DO.urn:
            continue
        raw = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload).do_fn.payload
        try:
            raw = base64.b64decode(raw, validate=True)
        except ValueError:
            pass
        for decompress in (bz2.decompress, zlib.decompress):
            try:
                raw = decompress(raw)
                break
            except (OSError, ValueError, zlib.error):
                continue
        parts.append(raw)
    assert len(parts) > 1, "no ParDo payload found"
    return b"".join(parts)


@pytest.fixture
def published(server: Server, tokens: dict[str, str]) -> Callable[[str], Published]:
    return lambda prefix: Published(server, tokens, prefix)


@pytest.fixture
def audit_token(server: Server, published: Callable[[str], Published]) -> tuple[Published, str]:
    pub = published("aw")
    minted = server.client(pub.token).mint_audit_token(pub.label)
    assert minted["role"] == "audit-writer" and minted["labels"] == [pub.label]
    assert minted["name"].startswith("audit-of:")
    return pub, minted["token"]


def test_a_beam_run_by_label_ships_neither_keys_nor_the_pipeline_token(
    server: Server, published: Callable[[str], Published], tmp_path: Path
) -> None:
    pytest.importorskip("apache_beam")
    import apache_beam as beam

    from cape_pipelines.beam import ApplyPolicy

    pub = published("beamtok")
    client = pub.client(tmp_path / "spool")
    key = client.get_keys(pub.label)[pub.key_name]
    out = tmp_path / "out"
    p = beam.Pipeline()
    _ = (
        p
        | beam.Create(FRAME.astype(object).where(FRAME.notna(), None).to_dict("records"))
        | ApplyPolicy(pub.label, client=client, schema=SCHEMA)
        | beam.Map(json.dumps)
        | beam.io.WriteToText(str(out))
    )
    blob = _shipped(p)
    for form in (
        key,
        key.hex().encode(),
        key.hex().upper().encode(),
        base64.b64encode(key),
        base64.urlsafe_b64encode(key),
    ):
        assert form not in blob
    assert pub.token.encode() not in blob, "the pipeline token must not ship"
    # What does ship: the tokens an attacker finds in the job. None is a pipeline token,
    # and the one the audit sink holds reads no keys.
    found = {m.decode() for m in TOKEN_RE.findall(blob)}
    assert found, "the workers need a credential to post the run's records"
    listed = {t["id"]: t["role"] for t in server.client(server.admin_token).list_tokens()}
    roles = {t: listed[_token_id(t)] for t in found}
    assert set(roles.values()) == {"worker", "audit-writer"}, roles
    for token, role in roles.items():
        resp = requests.get(
            server.url + f"/v1/labels/{pub.label}/keys", headers=_auth(token), timeout=30
        )
        assert resp.status_code == (403 if role == "audit-writer" else 200)

    p.run().wait_until_finish()
    client.close()
    rows = [
        json.loads(line)
        for shard in sorted(glob.glob(str(out) + "*"))
        for line in Path(shard).read_text().splitlines()
    ]
    assert sorted(r["id"] for r in rows) == FRAME["id"].tolist()
    expected = pub.expected(pub.client(tmp_path / "spool2"))
    got = sorted(rows, key=lambda r: r["id"])
    assert [r["email"] for r in got] == _values(expected["email"])
    # The run's records landed, each once, with exact counts, sent by the audit-writer.
    entries = [e for e in pub.auditor.list_audit(label=pub.label, limit=1000) if e["kind"] == "run"]
    records = [e["record"] for e in entries]
    assert sorted(r["event"] for r in records) == ["policy.fetched", "run.completed", "run.started"]
    assert len({r["run_id"] for r in records}) == 1
    assert {e["source"].split(":")[0] for e in entries} == {"audit-of"}
    completed = next(r for r in records if r["event"] == "run.completed")
    assert (completed["rows_in"], completed["rows_out"]) == (5, 5)
    assert completed["columns"]["email"]["values"] == 4
    (run,) = pub.auditor.list_runs(label=pub.label)
    assert (run["status"], run["engine"]) == ("succeeded", "beam")
    assert not list((tmp_path / "spool").rglob("pending/*.json")), "records left undelivered"


def test_an_audit_writer_posts_its_labels_records(
    server: Server, audit_token: tuple[Published, str]
) -> None:
    pub, token = audit_token
    resp = _post_records(server, token, [_record(pub.label, "aw-run-1")])
    assert resp.status_code == 200, resp.text
    assert [r["event"] for r in pub.records()] == ["run.started"]


def test_an_audit_writer_reads_no_keys_and_no_policies(
    server: Server, audit_token: tuple[Published, str], tmp_path: Path
) -> None:
    pub, token = audit_token
    for path in (
        f"/v1/labels/{pub.label}/keys",
        f"/v1/policies/{pub.label}/active",
        "/v1/policies",
        f"/v1/policies/{pub.label}/versions",
        "/v1/audit",
    ):
        resp = requests.get(server.url + path, headers=_auth(token), timeout=30)
        assert resp.status_code == 403, (path, resp.text)
    # Through the client's key provider, too: a refusal, no bytes.
    with pytest.raises(AuthError) as refused:
        Client(server.url, token, spool_dir=tmp_path).get_keys(pub.label)
    assert refused.value.status == 403


def test_an_audit_writer_cannot_post_for_another_label(
    server: Server, audit_token: tuple[Published, str], published: Callable[[str], Published]
) -> None:
    pub, token = audit_token
    other = published("aw-other")
    before = row_counts(server.db)
    resp = _post_records(server, token, [_record(other.label, "aw-run-2")])
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "label_not_allowed"
    # Hidden in a batch with a record of its own label: the whole batch is refused.
    resp = _post_records(
        server, token, [_record(pub.label, "aw-run-3"), _record(other.label, "aw-run-3b")]
    )
    assert resp.status_code == 403
    assert row_counts(server.db) == before
    assert other.records() == [] and pub.records() == []


def test_an_audit_writer_cannot_write_into_its_pipelines_runs(
    server: Server, audit_token: tuple[Published, str]
) -> None:
    """A run is bound to the token that sent its first record: one stolen from a job cannot
    complete (or fail) a run its pipeline token started."""
    pub, token = audit_token
    resp = _post_records(server, pub.token, [_record(pub.label, "aw-run-4")])
    assert resp.status_code == 200, resp.text
    resp = _post_records(server, token, [_record(pub.label, "aw-run-4", "run.failed")])
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "run_not_yours"


def test_an_audit_writer_cannot_mint_or_do_anything_else(
    server: Server, audit_token: tuple[Published, str]
) -> None:
    pub, token = audit_token
    for kind in ("worker-tokens", "audit-tokens"):
        resp = requests.post(
            server.url + f"/v1/labels/{pub.label}/{kind}",
            json={"expires_in": 60},
            headers=_auth(token),
            timeout=30,
        )
        assert resp.status_code == 403, kind


@pytest.mark.parametrize(
    "method,path,body",
    [(m, p, b) for m, p, b, _ in MATRIX if (m, p) != ("POST", "/v1/audit")],
    ids=[f"{m} {p}" for m, p, _, _ in MATRIX if (m, p) != ("POST", "/v1/audit")],
)
def test_an_audit_writer_is_refused_everywhere_else(
    server: Server, audit_token: tuple[Published, str], method: str, path: str, body: Any
) -> None:
    _, token = audit_token
    before = row_counts(server.db)
    resp = requests.request(method, server.url + path, json=body, headers=_auth(token), timeout=30)
    assert resp.status_code == 403, resp.text
    assert row_counts(server.db) == before, "a refused request changed the database"


def test_an_audit_writer_token_expires(
    server: Server, published: Callable[[str], Published]
) -> None:
    pub = published("aw-exp")
    token = server.client(pub.token).mint_audit_token(pub.label, expires_in=1)["token"]
    assert _post_records(server, token, [_record(pub.label, "aw-run-5")]).status_code == 200
    time.sleep(1.6)
    resp = _post_records(server, token, [_record(pub.label, "aw-run-5", "run.completed")])
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "token_expired"


def test_revoking_the_pipeline_token_revokes_its_audit_writers(
    server: Server, audit_token: tuple[Published, str]
) -> None:
    pub, token = audit_token
    admin = server.client(server.admin_token)
    pipeline_id = _token_id(pub.token)
    admin.revoke_token(pipeline_id)
    time.sleep(1.1)  # past the token cache of any other serving process
    resp = _post_records(server, token, [_record(pub.label, "aw-run-6")])
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "token_revoked"


def test_only_a_pipeline_token_of_the_label_mints_audit_writers(
    server: Server, tokens: dict[str, str], published: Callable[[str], Published]
) -> None:
    mine, other = published("aw-mint"), published("aw-mint-other")
    path = server.url + f"/v1/labels/{mine.label}/audit-tokens"
    resp = requests.post(path, json={"expires_in": 60}, headers=_auth(other.token), timeout=30)
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "label_forbidden"
    for role in ("admin", "author", "reviewer", "auditor", "requester"):
        resp = requests.post(path, json={"expires_in": 60}, headers=_auth(tokens[role]), timeout=30)
        assert resp.status_code == 403, role
    for bad in (0, -1, 24 * 3600 + 1):
        resp = requests.post(path, json={"expires_in": bad}, headers=_auth(mine.token), timeout=30)
        assert resp.status_code == 422, bad
