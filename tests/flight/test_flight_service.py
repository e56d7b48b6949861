"""The Flight service with local policies: datasets out through a policy, batches exchanged.

The server runs in this process on loopback (a free port); clients are
pyarrow's Flight client. Outputs are compared with the core applied to the
same data; audit records are counted; the attacker's view is checked too
(missing, wrong and other-label tokens; key bytes in anything sent back).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from cape_pipelines import apply_policy
from cape_pipelines.audit import MemorySink
from cape_pipelines.flight import CapeFlightServer, Dataset, StaticAccess, ticket_for

KEY = b"cape-flight-test-tokenizer-key-1"
LABEL = "people"
POLICY = {
    "label": LABEL,
    "rules": [
        {"match": {"name": "ssn"}, "actions": ["drop"]},
        {
            "match": {"name": "email"},
            "actions": [{"transform": {"type": "tokenizer", "key": {"secret": "tok"}}}],
        },
        {"actions": [{"transform": {"type": "row-redact", "condition": "age < 18"}}]},
    ],
}
OTHER = {"label": "other", "rules": [{"match": {"name": "ssn"}, "actions": ["drop"]}]}
TOKENS = {"reader-token-0001": [LABEL], "other-token-0002": ["other"]}


def people(n: int, start: int = 0) -> pa.Table:
    ids = list(range(start, start + n))
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "email": pa.array([None if i % 11 == 0 else f"user{i}@example.org" for i in ids]),
            "ssn": pa.array([f"{i:09d}" for i in ids]),
            "age": pa.array([i % 90 for i in ids], pa.int64()),
        }
    )


def token_of(value: str) -> str:
    return hmac.new(KEY, value.encode(), hashlib.sha256).hexdigest()


def bearer(token: str) -> flight.FlightCallOptions:
    return flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])


READER = bearer("reader-token-0001")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "people"
    folder.mkdir()
    pq.write_table(people(3000), folder / "part-0.parquet", row_group_size=700)
    pq.write_table(people(2000, start=3000), folder / "part-1.parquet", row_group_size=700)
    return folder


@pytest.fixture
def served(data: Path) -> Iterator[tuple[CapeFlightServer, MemorySink]]:
    sink = MemorySink()
    access = StaticAccess([POLICY, OTHER], tokens=TOKENS, keys={"tok": KEY}, audit=sink)
    server = CapeFlightServer(
        "grpc://127.0.0.1:0", [Dataset("people", data, LABEL)], access, batch_rows=1000
    )
    try:
        yield server, sink
    finally:
        server.shutdown()


def connect(server: CapeFlightServer) -> flight.FlightClient:
    return flight.connect(f"grpc://127.0.0.1:{server.port}")


def expected(table: pa.Table) -> pa.Table:
    return apply_policy(POLICY, table, keys={"tok": KEY}, audit=MemorySink())


def test_do_get_serves_the_dataset_through_its_policy(served: Any) -> None:
    server, sink = served
    client = connect(server)
    info = client.get_flight_info(flight.FlightDescriptor.for_path("people"), READER)
    assert info.schema.names == ["id", "email", "age"]
    got = client.do_get(info.endpoints[0].ticket, READER).read_all()
    source = pa.concat_tables([people(3000), people(2000, start=3000)])
    want = expected(source)
    assert got.equals(want.cast(got.schema))
    assert got.num_rows == sum(1 for a in range(5000) if a % 90 >= 18)
    first = got.slice(0, 1).to_pylist()[0]
    assert first["email"] == token_of(f"user{first['id']}@example.org")
    records = sink.records
    assert [r["event"] for r in records] == ["run.started", "run.completed"]
    done = records[-1]
    assert done["engine"] == "flight"
    assert (done["rows_in"], done["rows_out"]) == (5000, got.num_rows)
    assert done["columns"]["email"]["values"] + done["columns"]["email"]["nulls"] == got.num_rows


def test_list_flights_shows_only_what_the_token_may_read(served: Any) -> None:
    server, _ = served
    client = connect(server)
    infos = list(client.list_flights(options=READER))
    assert [i.descriptor.path for i in infos] == [[b"people"]]
    assert infos[0].schema.names == ["id", "email", "age"]
    assert list(client.list_flights(options=bearer("other-token-0002"))) == []


def test_do_exchange_protects_the_callers_batches(served: Any) -> None:
    server, sink = served
    client = connect(server)
    source = people(2500)
    writer, reader = client.do_exchange(flight.FlightDescriptor.for_path(LABEL), READER)
    out: list[pa.RecordBatch] = []
    with writer:
        writer.begin(source.schema)
        for batch in source.to_batches(max_chunksize=600):
            writer.write_batch(batch)
            # Read what has come back so far as we go: the service answers batch by batch.
        writer.done_writing()
        for chunk in reader:
            out.append(chunk.data)
    got = pa.Table.from_batches(out)
    assert got.equals(expected(source).cast(got.schema))
    done = sink.records[-1]
    assert done["event"] == "run.completed"
    assert (done["rows_in"], done["rows_out"]) == (2500, got.num_rows)


def _refusal(call: Any) -> flight.FlightError:
    with pytest.raises(flight.FlightError) as info:
        call()
    return info.value


def test_refusals_are_clear_flight_errors(served: Any) -> None:
    server, sink = served
    client = connect(server)
    people_info = flight.FlightDescriptor.for_path("people")
    cases = [
        (lambda: client.get_flight_info(people_info), flight.FlightUnauthenticatedError, "token"),
        (
            lambda: client.get_flight_info(people_info, bearer("reader-token-0001x")),
            flight.FlightUnauthenticatedError,
            "token",
        ),
        (
            lambda: client.do_get(ticket_for("people"), bearer("other-token-0002")).read_all(),
            flight.FlightUnauthorizedError,
            "may not read label 'people'",
        ),
        (
            lambda: client.get_flight_info(flight.FlightDescriptor.for_path("nope"), READER),
            flight.FlightServerError,
            "unknown dataset 'nope'",
        ),
        (
            lambda: client.do_get(flight.Ticket(b"not json"), READER).read_all(),
            flight.FlightServerError,
            "ticket",
        ),
    ]
    for call, kind, words in cases:
        err = _refusal(call)
        assert isinstance(err, kind), (type(err), err)
        assert words in str(err)
    # Nothing was run, so nothing was audited.
    assert sink.records == []


def test_exchange_with_columns_the_policy_cannot_bind_is_refused(served: Any) -> None:
    server, sink = served
    client = connect(server)
    table = pa.table({"id": [1], "email": [5]})  # email is not a string: tokenizer refuses
    writer, reader = client.do_exchange(flight.FlightDescriptor.for_path(LABEL), READER)
    with pytest.raises(flight.FlightServerError, match="email"):
        writer.begin(table.schema)
        writer.write_table(table)
        writer.done_writing()
        reader.read_all()
    assert sink.records == []


def test_no_key_material_in_anything_the_service_sends(served: Any) -> None:
    server, _ = served
    client = connect(server)
    blobs = []
    infos = list(client.list_flights(options=READER))
    blobs += [i.serialize() for i in infos]
    blobs.append(
        client.get_schema(flight.FlightDescriptor.for_path("people"), READER)
        .schema.serialize()
        .to_pybytes()
    )
    table = client.do_get(ticket_for("people"), READER).read_all()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    blobs.append(sink.getvalue().to_pybytes())
    try:
        client.do_get(ticket_for("people"), bearer("other-token-0002")).read_all()
    except flight.FlightError as exc:
        blobs.append(str(exc).encode())
    forms = [KEY, KEY.hex().encode(), base64.b64encode(KEY), base64.urlsafe_b64encode(KEY)]
    for blob in blobs:
        for form in forms:
            assert form not in blob


def test_a_slow_reader_holds_the_server_to_a_few_batches(tmp_path: Path) -> None:
    """Backpressure: the server reads its files only as fast as the client takes batches.

    What it may read ahead is what gRPC's flow-control windows hold (a few MiB),
    whatever the dataset's size.
    """
    path = tmp_path / "big.parquet"
    pq.write_table(people(600_000), path, row_group_size=1000)
    pulled = []

    class Counting(Dataset):
        def inputs(self) -> Any:
            inputs = super().inputs()
            original = inputs.file_batches

            def counted(p: Path, batch_size: int = 1000) -> Iterator[pa.RecordBatch]:
                for b in original(p, batch_size):
                    pulled.append(b.num_rows)
                    yield b

            inputs.file_batches = counted  # type: ignore[method-assign]
            return inputs

    access = StaticAccess([POLICY], keys={"tok": KEY}, audit=MemorySink())
    server = CapeFlightServer(
        "grpc://127.0.0.1:0", [Counting("big", path, LABEL)], access, batch_rows=1000
    )
    client = connect(server)
    try:
        reader = client.do_get(ticket_for("big"))
        reader.read_chunk()
        time.sleep(1.5)
        held = len(pulled)
        rest = reader.read_all()
    finally:
        # A stream still open would keep shutdown() waiting: close the client first.
        client.close()
        server.shutdown()
    per_batch = rest.nbytes / (rest.num_rows / 1000)
    ahead = held * per_batch
    assert held < 200 and ahead < 16 * 2**20, (
        f"the server read {held} of 600 batches ({ahead / 2**20:.1f} MiB) ahead of a stalled client"
    )
    assert len(pulled) == 600


def _self_signed(tmp_path: Path) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, key_pem


def test_tls_when_configured(data: Path, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    access = StaticAccess([POLICY], tokens=TOKENS, keys={"tok": KEY}, audit=MemorySink())
    server = CapeFlightServer(
        "grpc+tls://127.0.0.1:0",
        [Dataset("people", data, LABEL)],
        access,
        tls_certificates=[(cert, key)],
    )
    try:
        url = f"grpc+tls://127.0.0.1:{server.port}"
        client = flight.connect(url, tls_root_certs=cert)
        got = client.do_get(ticket_for("people"), READER).read_all()
        assert got.num_rows == sum(1 for a in range(5000) if a % 90 >= 18)
        # A client that does not trust the certificate gets nothing.
        untrusting = flight.connect(url)
        with pytest.raises(flight.FlightError):
            untrusting.do_get(ticket_for("people"), READER).read_all()
        # Nor does a plaintext client.
        plain = flight.connect(f"grpc://127.0.0.1:{server.port}")
        with pytest.raises(flight.FlightError):
            plain.do_get(ticket_for("people"), READER).read_all()
    finally:
        server.shutdown()


def test_concurrent_streams_each_get_their_own_audited_run(served: Any) -> None:
    server, sink = served
    results: list[int] = []

    def fetch() -> None:
        results.append(connect(server).do_get(ticket_for("people"), READER).read_all().num_rows)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 3 and len(set(results)) == 1
    done = [r for r in sink.records if r["event"] == "run.completed"]
    assert len(done) == 3 and len({r["run_id"] for r in done}) == 3
    assert all(r["rows_out"] == results[0] for r in done)


def test_each_stream_sends_its_lineage_events(data: Path, tmp_path: Path) -> None:
    pytest.importorskip("openlineage.client")
    events_file = tmp_path / "lineage.jsonl"
    sink = MemorySink()
    access = StaticAccess([POLICY, OTHER], tokens=TOKENS, keys={"tok": KEY}, audit=sink)
    server = CapeFlightServer(
        "grpc://127.0.0.1:0",
        [Dataset("people", data, LABEL)],
        access,
        batch_rows=1000,
        lineage={"transport": {"type": "file", "log_file_path": str(events_file), "append": True}},
    )
    try:
        client = connect(server)
        got = client.do_get(ticket_for("people"), READER).read_all()
        writer, reader = client.do_exchange(flight.FlightDescriptor.for_path(LABEL), READER)
        with writer:
            writer.begin(people(50).schema)
            writer.write_batch(people(50).to_batches()[0])
            writer.done_writing()
            exchanged = reader.read_all()
    finally:
        server.shutdown()
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    assert [e["eventType"] for e in events] == ["START", "COMPLETE", "START", "COMPLETE"]
    runs = [r["run_id"] for r in sink.records if r["event"] == "run.completed"]
    assert [e["run"]["facets"]["cape"]["runId"] for e in events[1::2]] == runs
    assert all(e["run"]["facets"]["cape"]["engine"] == "flight" for e in events)
    stream = f"grpc+tcp://127.0.0.1:{server.port}"

    served = events[1]
    (inp,) = served["inputs"]
    assert (inp["namespace"], inp["name"]) == ("file", str(data.resolve()))
    (out,) = served["outputs"]
    assert (out["namespace"], out["name"]) == (stream, "people")
    assert out["outputFacets"]["outputStatistics"]["rowCount"] == got.num_rows
    fields = out["facets"]["columnLineage"]["fields"]
    assert set(fields) == {"id", "email", "age"}
    assert fields["email"]["transformationType"] == "MASKED"
    assert out["facets"]["capePrivacy"]["columns"]["ssn"]["treatment"] == "dropped"

    exchange = events[3]
    assert [(d["namespace"], d["name"]) for d in exchange["inputs"]] == [
        (stream, f"exchange/{LABEL}/input")
    ]
    (out,) = exchange["outputs"]
    assert (out["namespace"], out["name"]) == (stream, f"exchange/{LABEL}/output")
    assert out["outputFacets"]["outputStatistics"]["rowCount"] == exchanged.num_rows
    text = events_file.read_text()
    assert "user1@example.org" not in text and KEY.decode() not in text
