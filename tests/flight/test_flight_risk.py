"""Arrow Flight and a policy's risk: section: streams report the figure; suppression, which
needs every row counted before the first leaves, is refused and recorded as a failed run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

flight = pytest.importorskip("pyarrow.flight")

from cape_pipelines import apply_policy  # noqa: E402
from cape_pipelines.audit import MemorySink  # noqa: E402
from cape_pipelines.flight import CapeFlightServer, Dataset, StaticAccess  # noqa: E402


def policy(label: str, action: str) -> dict[str, Any]:
    return {
        "label": label,
        "rules": [
            {
                "match": {"name": "zip"},
                "actions": [{"transform": {"type": "generalize", "prefix": 2}}],
            }
        ],
        "risk": {"quasi_identifiers": ["zip"], "sensitive": "dx", "k": 48, "action": action},
    }


REPORT, SUPPRESS = policy("report", "report"), policy("suppress", "suppress")
TOKENS = {"reader-token-0001": ["report", "suppress"]}
READER = flight.FlightCallOptions(headers=[(b"authorization", b"Bearer reader-token-0001")])


def people(n: int) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            "zip": pa.array([f"{i % 7}{i % 3}{i}" for i in range(n)]),
            "dx": pa.array([["a", "b", "c"][i % 3] for i in range(n)]),
        }
    )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Any, MemorySink]]:
    folder = tmp_path / "people"
    folder.mkdir()
    pq.write_table(people(1000), folder / "part-0.parquet", row_group_size=300)
    sink = MemorySink()
    access = StaticAccess([REPORT, SUPPRESS], tokens=TOKENS, keys={}, audit=sink)
    datasets = [Dataset("report", folder, "report"), Dataset("suppress", folder, "suppress")]
    server = CapeFlightServer("grpc://127.0.0.1:0", datasets, access, batch_rows=250)
    try:
        yield server, sink
    finally:
        server.shutdown()


def test_a_stream_reports_the_same_figure_as_pandas(served: Any) -> None:
    server, sink = served
    client = flight.connect(f"grpc://127.0.0.1:{server.port}")
    info = client.get_flight_info(flight.FlightDescriptor.for_path("report"), READER)
    got = client.do_get(info.endpoints[0].ticket, READER).read_all()
    local = MemorySink()
    assert got.num_rows == 1000
    apply_policy(REPORT, people(1000), audit=local)
    done = sink.records[-1]
    assert done["event"] == "run.completed"
    assert done["risk"] == local.records[-1]["risk"]
    assert done["risk"]["rows_below_k"] > 0


def test_suppression_is_refused_on_a_stream_and_recorded(served: Any) -> None:
    server, sink = served
    client = flight.connect(f"grpc://127.0.0.1:{server.port}")
    source = people(100)
    writer, reader = client.do_exchange(flight.FlightDescriptor.for_path("suppress"), READER)
    with pytest.raises(flight.FlightServerError, match="suppress cannot run on an Arrow Flight"):
        writer.begin(source.schema)
        writer.write_table(source)
        writer.done_writing()
        reader.read_all()
    events = [r["event"] for r in sink.records]
    assert events[-2:] == ["run.started", "run.failed"]
