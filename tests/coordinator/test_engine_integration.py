"""Every engine applies a policy by label through a client, against the real coordinator.

One published policy per test (its own label, key and pipeline token). The
output is compared with the same policy applied locally with the same key
material, and the run's records are counted in the coordinator. A client
pinning the wrong key is refused before any data is read: no output, no
record, and for ``cape apply`` not even the input file is opened.
"""

from __future__ import annotations

import base64
import glob
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from _coord_support import Server, new_label
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import cape_pipelines as cape
from cape_pipelines.audit import MemorySink
from cape_pipelines.cli import main as cape_main
from coordinator_client import Client, SignatureError

FRAME = pd.DataFrame(
    {
        "id": [1, 2, 3, 4, 5],
        "email": ["a@x.org", "b@x.org", None, "a@x.org", "e@x.org"],
        "ssn": ["111", "222", "333", "444", "555"],
    }
)
SCHEMA = pa.schema([("id", pa.int64()), ("email", pa.string()), ("ssn", pa.string())])


class Published:
    """An active policy on the coordinator, with its pipeline token and key."""

    def __init__(self, server: Server, tokens: dict[str, str], prefix: str):
        self.server = server
        self.label = new_label(prefix)
        self.key_name = f"{self.label}-email"
        admin = server.client(tokens["admin"])
        admin.create_key(self.key_name, [self.label])
        self.token = admin.create_token(self.label, "pipeline", labels=[self.label])["token"]
        self.document = {
            "label": self.label,
            "rules": [
                {"match": {"name": "ssn"}, "actions": ["drop"]},
                {
                    "match": {"name": "email"},
                    "actions": [
                        {"transform": {"type": "tokenizer", "key": {"secret": self.key_name}}}
                    ],
                },
            ],
        }
        author = server.client(tokens["author"])
        version = author.push_policy(self.document)["version"]
        author.submit_policy(self.label, version)
        server.client(tokens["reviewer"]).approve_policy(self.label, version)
        self.auditor = server.client(tokens["auditor"])

    def client(self, spool: Path, public_key: str | None = None) -> Client:
        return Client(
            self.server.url,
            self.token,
            public_key=public_key or self.server.public_key,
            spool_dir=spool,
        )

    def expected(self, client: Client) -> pd.DataFrame:
        """The same policy applied here, with the coordinator's key material given explicitly."""
        keys = client.get_keys(self.label)
        doc = {**self.document, "version": 1}
        return cape.apply_policy(doc, FRAME, keys=keys, audit=MemorySink())

    def records(self) -> list[dict[str, Any]]:
        """The run records (not the coordinator's own) stored for this label."""
        entries = self.auditor.list_audit(label=self.label, limit=1000)
        return [e["record"] for e in entries if e["kind"] == "run"]


@pytest.fixture
def published(server: Server, tokens: dict[str, str]) -> Callable[[str], Published]:
    return lambda prefix: Published(server, tokens, prefix)


def _pandas(label: str, client: Client, spark: Any) -> pd.DataFrame:
    return cape.apply_policy(label, FRAME, client=client)


def _dask(label: str, client: Client, spark: Any) -> pd.DataFrame:
    import dask.dataframe as dd

    import cape_pipelines.dask as cdask

    out = cdask.apply_policy(dd.from_pandas(FRAME, npartitions=2), label, client=client)
    return cdask.compute(out, scheduler="threads")


def _spark(label: str, client: Client, spark: Any) -> pd.DataFrame:
    import cape_pipelines.spark as cspark

    out = cspark.apply_policy(spark.createDataFrame(FRAME), label, client=client)
    return cspark.collect(out).to_pandas()


def _beam(label: str, client: Client, spark: Any, out_dir: Path | None = None) -> pd.DataFrame:
    import tempfile

    import apache_beam as beam

    from cape_pipelines.beam import ApplyPolicy

    step = ApplyPolicy(label, client=client, schema=SCHEMA)
    with tempfile.TemporaryDirectory(prefix="cape-beam-coord-") as tmp:
        prefix = os.path.join(tmp, "out")
        with beam.Pipeline() as p:
            _ = (
                p
                | beam.Create(FRAME.astype(object).where(FRAME.notna(), None).to_dict("records"))
                | step
                | beam.Map(json.dumps)
                | beam.io.WriteToText(prefix)
            )
        rows = [
            json.loads(line)
            for shard in sorted(glob.glob(prefix + "*"))
            for line in Path(shard).read_text().splitlines()
        ]
    return pd.DataFrame(rows)


ENGINES: dict[str, Callable[..., pd.DataFrame]] = {
    "pandas": _pandas,
    "dask": _dask,
    "spark": _spark,
    "beam": _beam,
}


def _needs(engine: str) -> None:
    module = {"dask": "dask.dataframe", "spark": "pyspark", "beam": "apache_beam"}.get(engine)
    if module:
        pytest.importorskip(module)


def _spark_for(engine: str, request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("spark") if engine == "spark" else None


def _values(column: pd.Series) -> list[Any]:
    """A column's values with every engine's null (None, NaN, pd.NA) as None."""
    return [None if pd.isna(v) else v for v in column.tolist()]


@pytest.mark.parametrize("engine", list(ENGINES))
def test_engine_applies_policy_by_label(engine, published, tmp_path, request):
    _needs(engine)
    pub = published(engine)
    client = pub.client(tmp_path / "spool")
    out = ENGINES[engine](pub.label, client, _spark_for(engine, request))
    assert client.default_audit_sink().flush(60)
    expected = pub.expected(client)
    client.close()

    got = out.sort_values("id").reset_index(drop=True)[list(expected.columns)]
    assert list(expected.columns) == ["id", "email"]
    assert _values(got["email"]) == _values(expected["email"])
    assert got["id"].astype("int64").tolist() == FRAME["id"].tolist()

    records = pub.records()
    assert sorted(r["event"] for r in records) == sorted(
        ["run.started", "policy.fetched", "run.completed"]
    )
    assert {r["engine"] for r in records} == {engine}
    assert len({r["run_id"] for r in records}) == 1
    assert all(r["policy"]["label"] == pub.label and r["policy"]["version"] == 1 for r in records)
    fetched = next(r for r in records if r["event"] == "policy.fetched")
    assert fetched["source"] == f"coordinator {pub.server.url} label {pub.label} version 1"
    completed = next(r for r in records if r["event"] == "run.completed")
    assert (completed["rows_in"], completed["rows_out"]) == (5, 5)
    assert completed["columns"]["email"]["values"] == 4
    (run,) = pub.auditor.list_runs(label=pub.label)
    assert (run["status"], run["engine"], run["version"]) == ("succeeded", engine, 1)


def test_explicit_audit_wins_over_the_client_sink(published, tmp_path):
    pub = published("explicit")
    client = pub.client(tmp_path / "spool")
    sink = MemorySink()
    cape.apply_policy(pub.label, FRAME, client=client, audit=sink)
    client.close()
    assert [r["event"] for r in sink.records] == ["run.started", "policy.fetched", "run.completed"]
    assert pub.records() == []


@pytest.mark.parametrize("engine", ["pandas", "dask"])
def test_cli_apply_by_label(engine, published, tmp_path, monkeypatch, capsys):
    _needs(engine)
    pub = published(f"cli-{engine}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("CAPE_COORDINATOR_URL", pub.server.url)
    monkeypatch.setenv("CAPE_TOKEN", pub.token)
    monkeypatch.setenv("CAPE_COORDINATOR_PUBLIC_KEY", pub.server.public_key)
    source = tmp_path / "in.csv"
    FRAME.to_csv(source, index=False)
    output = tmp_path / "out.parquet"
    code = cape_main(
        [
            "apply",
            "--policy-label",
            pub.label,
            "--engine",
            engine,
            "--input",
            str(source),
            "--output",
            str(output),
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    written = pd.read_parquet(output)
    assert list(written.columns) == ["id", "email"]
    run_id = err.strip().rsplit(" ", 1)[-1]
    records = pub.records()
    assert [r["event"] for r in records] == ["run.started", "policy.fetched", "run.completed"]
    assert {(r["run_id"], r["engine"]) for r in records} == {(run_id, engine)}
    assert records[-1]["rows_out"] == len(FRAME)


def _wrong_key() -> str:
    raw = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize("engine", [*ENGINES, "cli"])
def test_wrong_pinned_key_refused_before_any_data(
    engine, published, tmp_path, request, capsys, monkeypatch
):
    if engine != "cli":
        _needs(engine)
    pub = published(f"tamper-{engine}")
    client = pub.client(tmp_path / "spool", public_key=_wrong_key())
    if engine == "cli":
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "spool"))
        # The input does not exist: had it been opened first, the error would say so.
        output = tmp_path / "out.parquet"
        code = cape_main(
            [
                "apply",
                "--policy-label",
                pub.label,
                "--coordinator",
                pub.server.url,
                "--token",
                pub.token,
                "--public-key",
                _wrong_key(),
                "--input",
                str(tmp_path / "missing.csv"),
                "--output",
                str(output),
            ]
        )
        err = capsys.readouterr().err
        assert code == 1
        assert "signature does not verify" in err and "missing.csv" not in err
        assert not output.exists()
    else:
        with pytest.raises(SignatureError, match="does not verify against the pinned key"):
            ENGINES[engine](pub.label, client, _spark_for(engine, request))
    client.close()
    assert pub.records() == []
    assert pub.auditor.list_runs(label=pub.label) == []
    assert not list((tmp_path / "spool").rglob("*.json"))


def test_sink_copy_delivers_from_a_worker(published, tmp_path):
    """A pickled spool sink (what Beam ships to workers) delivers without a thread of its own."""
    import pickle

    from cape_pipelines.audit import RunContext

    pub = published("pickled")
    client = pub.client(tmp_path / "spool")
    copy = pickle.loads(pickle.dumps(client.audit_sink()))
    assert "cape_" not in repr(copy)
    run = RunContext(
        engine="pandas", sink=copy, policy={"label": pub.label, "version": 1, "sha256": "x"}
    )
    run.started()
    assert copy.pending_count() == 0
    assert [r["event"] for r in pub.records()] == ["run.started"]
    copy.close()
    client.close()


def test_dask_run_while_coordinator_down_is_delivered_once_after(fresh_server, tmp_path):
    """The plan (policy, keys) is made while the coordinator is up; the run itself happens while
    it is down: the run completes, its records wait in the spool and arrive once after restart."""
    pytest.importorskip("dask.dataframe")
    import dask.dataframe as dd

    import cape_pipelines.dask as cdask

    srv = fresh_server
    admin = srv.client(srv.admin_token)
    roles = {"admin": srv.admin_token}
    for role in ("author", "reviewer", "auditor"):
        roles[role] = admin.create_token(f"{role}-person", role)["token"]
    pub = Published(srv, roles, "down")
    client = pub.client(tmp_path / "spool")
    lazy = cdask.apply_policy(dd.from_pandas(FRAME, npartitions=2), pub.label, client=client)

    srv.stop()
    out = cdask.compute(lazy, scheduler="threads")
    assert len(out) == len(FRAME)
    sink = client.default_audit_sink()
    assert sink.pending_count() == 3
    assert not sink.flush(1.0)
    sink.close(timeout=0.5)  # the process ends with its records still spooled
    client.close()

    srv.start()
    again = pub.client(tmp_path / "spool")
    assert again.default_audit_sink().flush(60)
    again.close()
    records = pub.records()
    assert sorted(r["event"] for r in records) == sorted(
        ["run.started", "policy.fetched", "run.completed"]
    )
    assert len({r["record_id"] for r in records}) == 3
    (run,) = pub.auditor.list_runs(label=pub.label)
    assert run["status"] == "succeeded"
