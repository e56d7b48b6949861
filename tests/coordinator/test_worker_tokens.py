"""Worker tokens, tried as an attacker would: a pipeline token mints one for its label; a
worker process reads that label's keys with it and can do nothing else.

The worker token travels in job graphs (Spark closures, Dask graphs, Beam's
pipeline), so anyone who can read a job may hold it. Each test here makes a
request such a person would try and checks the coordinator refuses it: another
label's keys, an expired or revoked token, minting from the wrong label or
from a worker token, and every other endpoint (policies, audit, tokens).
"""

from __future__ import annotations

import base64
import pickle
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from _coord_support import ROOT, Server, new_label
from _db_snapshot import row_counts
from test_coord_authz import MATRIX

from cape_pipelines.keys import CoordinatorKeys, worker_key
from coordinator_client import Client


@dataclass
class Label:
    """A label with one key on the coordinator, and a pipeline token of that label."""

    name: str
    key_name: str
    token: str
    client: Client

    def key(self) -> bytes:
        return self.client.get_keys(self.name)[self.key_name]


@pytest.fixture
def make_label(server: Server, tokens: dict[str, str]) -> Callable[..., Label]:
    admin = server.client(tokens["admin"])

    def make(prefix: str = "wk", expires_in: int | None = None) -> Label:
        label = new_label(prefix)
        admin.create_key(f"{label}-k", [label])
        token = admin.create_token(label, "pipeline", labels=[label], expires_in=expires_in)
        return Label(label, f"{label}-k", token["token"], server.client(token["token"]))

    return make


def _get(server: Server, token: str, path: str) -> requests.Response:
    return requests.get(server.url + path, headers=_auth(token), timeout=30)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


WORKER = textwrap.dedent(
    """
    import pickle, sys
    sys.path.insert(0, sys.argv[1])
    from cape_pipelines.keys import worker_key
    provider = pickle.loads(sys.stdin.buffer.read())
    try:
        print(worker_key(provider, sys.argv[2]).hex())
    except Exception as exc:
        print(f"ERROR {type(exc).__name__}: {exc}")
    """
)


def _in_a_worker(provider: CoordinatorKeys, name: str) -> str:
    """What a separate worker process prints after resolving ``name`` through ``provider``."""
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(ROOT), name],
        input=pickle.dumps(provider),
        capture_output=True,
        timeout=120,
        check=True,
    )
    return proc.stdout.decode().strip()


def test_a_worker_process_resolves_the_labels_keys_with_a_minted_token(
    server: Server, make_label: Callable[..., Label]
) -> None:
    lab = make_label()
    provider = lab.client.worker_keys(lab.name)
    shipped = pickle.dumps(provider)
    key = lab.key()
    assert key not in shipped and key.hex().encode() not in shipped
    assert lab.token.encode() not in shipped, "the pipeline token itself must not ship"
    assert "token=<hidden>" in repr(provider)
    assert _in_a_worker(provider, lab.key_name) == key.hex()
    # A name the label does not have: the error names the key and the provider, nothing else.
    out = _in_a_worker(provider, "not-a-key")
    assert out.startswith("ERROR KeyMissingError") and "'not-a-key'" in out
    assert lab.name in out and key.hex() not in out


def test_a_worker_token_reads_no_other_labels_keys(
    server: Server, make_label: Callable[..., Label]
) -> None:
    mine, other = make_label(), make_label("other")
    worker = mine.client.mint_worker_token(mine.name)
    assert worker["role"] == "worker" and worker["labels"] == [mine.name]
    assert _get(server, worker["token"], f"/v1/labels/{mine.name}/keys").status_code == 200
    refused = _get(server, worker["token"], f"/v1/labels/{other.name}/keys")
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "label_forbidden"
    # Through the provider in a worker process, too: a refusal, no bytes.
    stolen = CoordinatorKeys(server.url, worker["token"], other.name)
    out = _in_a_worker(stolen, other.key_name)
    assert out.startswith("ERROR") and other.key().hex() not in out


def test_an_expired_worker_token_is_refused(
    server: Server, make_label: Callable[..., Label]
) -> None:
    lab = make_label()
    worker = lab.client.mint_worker_token(lab.name, expires_in=1)
    assert _get(server, worker["token"], f"/v1/labels/{lab.name}/keys").status_code == 200
    time.sleep(1.6)
    resp = _get(server, worker["token"], f"/v1/labels/{lab.name}/keys")
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "token_expired"


def test_a_worker_token_never_outlives_its_pipeline_token(
    server: Server, make_label: Callable[..., Label]
) -> None:
    lab = make_label(expires_in=120)
    worker = lab.client.mint_worker_token(lab.name, expires_in=24 * 3600)
    me = lab.client.whoami()
    assert me["role"] == "pipeline"
    listed = {t["id"]: t for t in server.client(_admin(server)).list_tokens()}
    pipeline_expiry = next(
        t["expires_at"]
        for t in listed.values()
        if t["name"] == lab.name and t["role"] == "pipeline"
    )
    assert listed[worker["id"]]["expires_at"] <= pipeline_expiry


def _admin(server: Server) -> str:
    return server.admin_token


def test_revoking_the_pipeline_token_revokes_its_worker_tokens(
    server: Server, make_label: Callable[..., Label]
) -> None:
    lab = make_label()
    worker = lab.client.mint_worker_token(lab.name)
    assert _get(server, worker["token"], f"/v1/labels/{lab.name}/keys").status_code == 200
    admin = server.client(_admin(server))
    pipeline_id = next(
        t["id"] for t in admin.list_tokens() if t["name"] == lab.name and t["role"] == "pipeline"
    )
    admin.revoke_token(pipeline_id)
    time.sleep(1.1)  # past the token cache of any other serving process
    resp = _get(server, worker["token"], f"/v1/labels/{lab.name}/keys")
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "token_revoked"


def test_only_a_pipeline_token_of_the_label_can_mint(
    server: Server, tokens: dict[str, str], make_label: Callable[..., Label]
) -> None:
    mine, other = make_label(), make_label("other")
    path = f"/v1/labels/{mine.name}/worker-tokens"

    def mint(token: str) -> requests.Response:
        return requests.post(
            server.url + path, json={"expires_in": 60}, headers=_auth(token), timeout=30
        )

    before = row_counts(server.db)
    resp = mint(other.token)
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "label_forbidden"
    worker = mine.client.mint_worker_token(mine.name)
    after_mint = row_counts(server.db)
    resp = mint(worker["token"])  # a worker token cannot mint more (or longer-lived) ones
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden"
    for role in ("admin", "author", "reviewer", "auditor", "requester"):
        resp = mint(tokens[role])
        assert resp.status_code == 403, role
    assert row_counts(server.db) == after_mint != before
    for bad in (0, -1, 24 * 3600 + 1):
        resp = requests.post(
            server.url + path, json={"expires_in": bad}, headers=_auth(mine.token), timeout=30
        )
        assert resp.status_code == 422, bad


@pytest.mark.parametrize(
    "method,path,body",
    [(m, p, b) for m, p, b, _ in MATRIX],
    ids=[f"{m} {p}" for m, p, _, _ in MATRIX],
)
def test_a_worker_token_can_do_nothing_else(
    server: Server, make_label: Callable[..., Label], method: str, path: str, body: Any
) -> None:
    """Every other endpoint: policies, audit, tokens, keys of the matrix label, the catalog."""
    lab = make_label()
    worker = lab.client.mint_worker_token(lab.name)
    before = row_counts(server.db)
    resp = requests.request(
        method, server.url + path, json=body, headers=_auth(worker["token"]), timeout=30
    )
    assert resp.status_code == 403, resp.text
    assert row_counts(server.db) == before, "a refused request changed the database"


def test_a_worker_token_cannot_post_audit_records_or_push_policies(
    server: Server, make_label: Callable[..., Label]
) -> None:
    lab = make_label()
    worker = lab.client.mint_worker_token(lab.name)
    record = {"event": "run.started", "run_id": "r", "policy": {"label": lab.name}}
    resp = requests.post(
        server.url + "/v1/audit", json=[record], headers=_auth(worker["token"]), timeout=30
    )
    assert resp.status_code == 403
    resp = requests.post(
        server.url + "/v1/policies",
        json={"document": {"label": lab.name, "rules": []}},
        headers=_auth(worker["token"]),
        timeout=30,
    )
    assert resp.status_code == 403


def test_worker_key_reads_are_audited_under_the_worker(
    server: Server, tokens: dict[str, str], make_label: Callable[..., Label]
) -> None:
    lab = make_label()
    provider = lab.client.worker_keys(lab.name)
    assert worker_key(provider, lab.key_name) == lab.key()
    auditor = server.client(tokens["auditor"])
    reads = [e["record"] for e in auditor.list_audit(label=lab.name, event="key.read")]
    by_workers = [r for r in reads if r["role"] == "worker"]
    assert len(by_workers) == 1 and by_workers[0]["principal"].startswith("worker-of:"), reads
    minted = auditor.list_audit(label=lab.name, event="token.created")
    assert minted, "minting a worker token is on the audit trail"


def test_an_engine_run_by_label_ships_a_worker_token_not_keys(
    server: Server, tokens: dict[str, str], make_label: Callable[..., Label], tmp_path: Any
) -> None:
    """Dask with worker processes (the ``processes`` scheduler pickles every task): the graph
    holds a CoordinatorKeys with a worker token; each worker process fetches the key."""
    pytest.importorskip("dask.dataframe")
    import cloudpickle
    import dask.dataframe as dd
    import pandas as pd

    import cape_pipelines as cape
    import cape_pipelines.dask as cdask
    from cape_pipelines.audit import MemorySink

    lab = make_label()
    policy = {
        "label": lab.name,
        "rules": [
            {
                "match": {"name": "email"},
                "actions": [{"transform": {"type": "tokenizer", "key": {"secret": lab.key_name}}}],
            }
        ],
    }
    author = server.client(tokens["author"])
    reviewer = server.client(tokens["reviewer"])
    version = author.push_policy(policy)["version"]
    author.submit_policy(lab.name, version)
    reviewer.approve_policy(lab.name, version)
    frame = pd.DataFrame({"id": [1, 2, 3], "email": ["a@x.org", None, "c@x.org"]})
    client = server.client(lab.token, spool_dir=tmp_path / "spool")
    out = cdask.apply_policy(dd.from_pandas(frame, npartitions=2), lab.name, client=client)
    blob = cloudpickle.dumps(dict(out.__dask_graph__()))
    key = lab.key()
    for form in (key, key.hex().encode(), base64.b64encode(key), base64.urlsafe_b64encode(key)):
        assert form not in blob
    assert lab.token.encode() not in blob, "the pipeline token must not ship either"
    assert b"CoordinatorKeys" in blob
    got = cdask.compute(out, scheduler="processes", num_workers=2)
    client.close()
    want = cape.apply_policy(policy, frame, keys={lab.key_name: key}, audit=MemorySink())

    def values(df: Any) -> list[Any]:
        return [None if pd.isna(v) else v for v in df.sort_values("id")["email"].tolist()]

    assert values(got) == values(want)
