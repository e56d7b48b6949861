"""``cape flight serve`` against a real coordinator, with clients in two processes.

The coordinator runs in a subprocess (as in tests/coordinator), the Flight
service is started with the ``cape`` CLI in another, one client reads a
dataset from this process while a second client, in a process of its own,
exchanges its batches. Policies and keys come from the coordinator through
each caller's pipeline token; the runs' records arrive at the coordinator.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "coordinator"))
from _coord_support import Server, new_label

from cape_pipelines import apply_policy
from cape_pipelines.audit import MemorySink
from cape_pipelines.flight import CapeFlightServer, CoordinatorAccess, Dataset, ticket_for

pytestmark = pytest.mark.coordinator
ROWS = 4000


def bearer(token: str) -> flight.FlightCallOptions:
    return flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])


class Setup:
    def __init__(self, root: Path) -> None:
        self.server = Server(root / "coord")
        self.server.start()
        admin = self.server.client(self.server.admin_token)
        author = admin.create_token("author", "author")["token"]
        reviewer = admin.create_token("reviewer", "reviewer")["token"]
        self.label = new_label("flight")
        self.other_label = new_label("flight-other")
        self.key_name = f"{self.label}-email"
        admin.create_key(self.key_name, [self.label])
        self.token = admin.create_token("flight-pipe", "pipeline", labels=[self.label])["token"]
        self.other_token = admin.create_token("other-pipe", "pipeline", labels=[self.other_label])[
            "token"
        ]
        self.auditor = self.server.client(admin.create_token("aud", "auditor")["token"])
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
        a, r = self.server.client(author), self.server.client(reviewer)
        for doc in (
            self.document,
            {"label": self.other_label, "rules": self.document["rules"][:1]},
        ):
            version = a.push_policy(doc)["version"]
            a.submit_policy(doc["label"], version)
            r.approve_policy(doc["label"], version)
        self.keys = self.server.client(self.token, spool_dir=root / "keys-spool").get_keys(
            self.label
        )
        self.data = root / "people.parquet"
        self.table = pa.table(
            {
                "id": pa.array(range(ROWS), pa.int64()),
                "email": [f"u{i}@example.org" for i in range(ROWS)],
                "ssn": [f"{i:09d}" for i in range(ROWS)],
            }
        )
        pq.write_table(self.table, self.data)

    def expected(self, table: pa.Table) -> pa.Table:
        doc = {**self.document, "version": 1}
        return apply_policy(doc, table, keys=self.keys, audit=MemorySink())


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    s = Setup(tmp_path_factory.mktemp("flight-coord"))
    try:
        yield s
    finally:
        s.server.stop()


@pytest.fixture(scope="module")
def service(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``cape flight serve`` in a subprocess; yields its URI."""
    state = tmp_path_factory.mktemp("flight-state")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cape_pipelines.cli",
            "flight",
            "serve",
            "--port",
            "0",
            "--coordinator",
            setup.server.url,
            "--public-key",
            setup.server.public_key,
            "--state-dir",
            str(state),
            "--dataset",
            f"people={setup.data}",
            "--label",
            f"people={setup.label}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("cape flight: serving on "), (
            line,
            proc.stderr.read() if proc.stderr else "",
        )
        yield line.rsplit(" ", 1)[1].strip()
    finally:
        proc.terminate()
        try:
            # SIGTERM stops the service cleanly (exit 0), without a kill.
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


OTHER_PROCESS_CLIENT = textwrap.dedent(
    """
    import json, sys
    import pyarrow as pa, pyarrow.flight as flight
    uri, label, token, rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    table = pa.table({"id": pa.array(range(rows), pa.int64()),
                      "email": [f"x{i}@example.org" for i in range(rows)],
                      "ssn": [f"{i:09d}" for i in range(rows)]})
    opts = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])
    client = flight.connect(uri)
    writer, reader = client.do_exchange(flight.FlightDescriptor.for_path(label), opts)
    writer.begin(table.schema)
    for batch in table.to_batches(max_chunksize=700):
        writer.write_batch(batch)
    writer.done_writing()
    out = reader.read_all()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, out.schema) as w:
        w.write_table(out)
    sys.stdout.write(sink.getvalue().to_pybytes().hex())
    """
)


def test_two_clients_in_two_processes(setup: Setup, service: str) -> None:
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_PROCESS_CLIENT, service, setup.label, setup.token, "3000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = flight.connect(service)
    info = client.get_flight_info(flight.FlightDescriptor.for_path("people"), bearer(setup.token))
    got = client.do_get(info.endpoints[0].ticket, bearer(setup.token)).read_all()
    stdout, stderr = other.communicate(timeout=120)
    assert other.returncode == 0, stderr
    assert got.equals(setup.expected(setup.table).cast(got.schema))
    exchanged = pa.ipc.open_stream(bytes.fromhex(stdout)).read_all()
    sent = pa.table(
        {
            "id": pa.array(range(3000), pa.int64()),
            "email": [f"x{i}@example.org" for i in range(3000)],
            "ssn": [f"{i:09d}" for i in range(3000)],
        }
    )
    assert exchanged.equals(setup.expected(sent).cast(exchanged.schema))
    # Key material never left the service.
    key = setup.keys[setup.key_name]
    blob = bytes.fromhex(stdout)
    for form in (key, key.hex().encode(), base64.b64encode(key)):
        assert form not in blob
    # Each stream is one run at the coordinator, with exact counts.
    deadline = time.monotonic() + 30
    done: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        records = _records(setup)
        done = [
            r for r in records if r.get("event") == "run.completed" and r.get("engine") == "flight"
        ]
        if len(done) >= 2:
            break
        time.sleep(0.5)
    assert sorted((r["rows_in"], r["rows_out"]) for r in done) == [(3000, 3000), (ROWS, ROWS)]
    fetched = [r for r in _records(setup) if r["event"] == "policy.fetched"]
    assert len(fetched) >= 2


def test_refused_tokens_and_labels(setup: Setup, service: str) -> None:
    client = flight.connect(service)
    people = flight.FlightDescriptor.for_path("people")
    with pytest.raises(flight.FlightUnauthenticatedError, match="token"):
        client.get_flight_info(people)
    with pytest.raises(flight.FlightUnauthenticatedError, match="refused the token"):
        client.get_flight_info(people, bearer("cape_not_a_real_token"))
    with pytest.raises((flight.FlightUnauthorizedError, flight.FlightServerError), match="refused"):
        client.do_get(ticket_for("people"), bearer(setup.other_token)).read_all()
    table = pa.table({"id": [1]})
    writer, reader = client.do_exchange(
        flight.FlightDescriptor.for_path("no-such-label"), bearer(setup.token)
    )
    with pytest.raises(flight.FlightError, match="no-such-label"):
        writer.begin(table.schema)
        writer.write_table(table)
        writer.done_writing()
        reader.read_all()


def test_a_policy_that_fails_verification_is_refused(setup: Setup, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    wrong = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    before = _flight_runs(setup)
    access = CoordinatorAccess(
        setup.server.url, public_key=base64.b64encode(wrong).decode(), state_dir=tmp_path
    )
    server = CapeFlightServer(
        "grpc://127.0.0.1:0", [Dataset("people", setup.data, setup.label)], access
    )
    try:
        client = flight.connect(f"grpc://127.0.0.1:{server.port}")
        with pytest.raises(flight.FlightServerError, match="failed verification"):
            client.do_get(ticket_for("people"), bearer(setup.token)).read_all()
        client.close()
    finally:
        server.shutdown()
    # Refused before any data was read: no run was started.
    access.close()
    assert _flight_runs(setup) == before


def _flight_runs(setup: Setup) -> int:
    records = _records(setup)
    return sum(1 for r in records if r.get("engine") == "flight" and r["event"] == "run.started")


def _records(setup: Setup) -> list[dict[str, Any]]:
    """The label's records stored at the coordinator (each entry holds its record)."""
    return [e["record"] for e in setup.auditor.list_audit(label=setup.label, limit=1000)]
