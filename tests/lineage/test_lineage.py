"""OpenLineage run events from Cape runs: file transport, an HTTP receiver on loopback,
``cape apply --lineage``, and failures to emit that never fail the run.

``openlineage-python`` ships no copy of the OpenLineage JSON schema, so the events are
checked against :data:`RUN_EVENT_SCHEMA` below, the spec's requirements for a run event
and the facets Cape sends, written out here (and against Cape's own facet schemas,
``cape_pipelines/data/lineage_facets.json``); the client's own attrs validators check
the run id and event time when each event is built.
"""

from __future__ import annotations

import http.server
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cape_pipelines.audit import MemorySink
from cape_pipelines.cli import main as cape_main
from cape_pipelines.io import apply_files
from cape_pipelines.lineage import (
    Lineage,
    LineageError,
    dataset_ref,
    lineage_option,
    openlineage_run_id,
)
from cape_pipelines.pandas import apply_policy

pytest.importorskip("openlineage.client")

KEY_HEX = "a1" * 32
POLICY: dict[str, Any] = {
    "label": "customers",
    "version": 4,
    "rules": [
        {
            "match": {"name": "email"},
            "actions": [{"transform": {"type": "tokenizer", "key": {"secret": "k"}}}],
        },
        {"match": {"name": "ssn"}, "actions": ["drop"]},
        {
            "match": {"name": "age"},
            "actions": [{"transform": {"type": "numeric-rounding", "precision": -1}}],
        },
        {"actions": [{"transform": {"type": "row-redact", "condition": "age < 18"}}]},
    ],
}
EMAILS = ["alice.secret@example.org", "bob.hidden@example.org", "carol.minor@example.org"]

_FACET = {
    "type": "object",
    "required": ["_producer", "_schemaURL"],
    "properties": {
        "_producer": {"type": "string", "pattern": "^[a-z][a-z0-9+.-]*:"},
        "_schemaURL": {"type": "string", "pattern": "^[a-z][a-z0-9+.-]*:"},
    },
}
_TRANSFORMATION = {
    "type": "object",
    "required": ["type"],
    "properties": {
        "type": {"enum": ["DIRECT", "INDIRECT"]},
        "subtype": {"type": "string"},
        "description": {"type": "string"},
        "masking": {"type": "boolean"},
    },
}
_INPUT_FIELD = {
    "type": "object",
    "required": ["namespace", "name", "field"],
    "properties": {
        "namespace": {"type": "string"},
        "name": {"type": "string"},
        "field": {"type": "string"},
        "transformations": {"type": "array", "items": _TRANSFORMATION},
    },
}
_DATASET = {
    "type": "object",
    "required": ["namespace", "name"],
    "properties": {
        "namespace": {"type": "string", "minLength": 1},
        "name": {"type": "string", "minLength": 1},
        "facets": {
            "type": "object",
            "additionalProperties": _FACET,
            "properties": {
                "schema": {
                    "allOf": [
                        _FACET,
                        {
                            "required": ["fields"],
                            "properties": {
                                "fields": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["name"],
                                        "properties": {
                                            "name": {"type": "string"},
                                            "type": {"type": "string"},
                                        },
                                    },
                                }
                            },
                        },
                    ]
                },
                "columnLineage": {
                    "allOf": [
                        _FACET,
                        {
                            "required": ["fields"],
                            "properties": {
                                "fields": {
                                    "type": "object",
                                    "additionalProperties": {
                                        "type": "object",
                                        "required": ["inputFields"],
                                        "properties": {
                                            "inputFields": {"type": "array", "items": _INPUT_FIELD}
                                        },
                                    },
                                },
                                "dataset": {"type": "array", "items": _INPUT_FIELD},
                            },
                        },
                    ]
                },
            },
        },
    },
}
# A run event as the OpenLineage spec (2-0-2) requires it.
RUN_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["eventTime", "producer", "schemaURL", "run", "job"],
    "properties": {
        "eventType": {"enum": ["START", "RUNNING", "COMPLETE", "ABORT", "FAIL", "OTHER"]},
        "eventTime": {"type": "string", "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d"},
        "producer": {"type": "string", "pattern": "^[a-z][a-z0-9+.-]*:"},
        "schemaURL": {"type": "string", "pattern": "^https://openlineage.io/spec/"},
        "run": {
            "type": "object",
            "required": ["runId"],
            "properties": {
                "runId": {
                    "type": "string",
                    "pattern": "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
                },
                "facets": {"type": "object", "additionalProperties": _FACET},
            },
        },
        "job": {
            "type": "object",
            "required": ["namespace", "name"],
            "properties": {
                "namespace": {"type": "string", "minLength": 1},
                "name": {"type": "string", "minLength": 1},
                "facets": {"type": "object", "additionalProperties": _FACET},
            },
        },
        "inputs": {"type": "array", "items": _DATASET},
        "outputs": {"type": "array", "items": _DATASET},
    },
}
_CAPE_FACETS = json.loads(
    (Path(__file__).resolve().parents[2] / "cape_pipelines/data/lineage_facets.json").read_text()
)


def check_event(event: dict[str, Any]) -> None:
    """The event against the spec's requirements and Cape's facets against their schemas."""
    jsonschema.validate(event, RUN_EVENT_SCHEMA)

    def cape(defn: str, value: Any) -> None:
        jsonschema.validate(value, {**_CAPE_FACETS, "$ref": f"#/$defs/{defn}"})

    cape("CapeRunFacet", event["run"]["facets"]["cape"])
    for out in event.get("outputs", []):
        if "capePrivacy" in out["facets"]:
            cape("CapePrivacyDatasetFacet", out["facets"]["capePrivacy"])


def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "email": EMAILS,
            "ssn": ["123-45-6789", "987-65-4321", "111-22-3333"],
            "age": [34, 57, 12],
            "city": ["Oslo", "Lima", "Pune"],
        }
    )


def file_config(path: Path) -> dict[str, Any]:
    return {"transport": {"type": "file", "log_file_path": str(path), "append": True}}


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_file_transport_start_and_complete_with_column_lineage(tmp_path: Path) -> None:
    events_file = tmp_path / "events.jsonl"
    sink = MemorySink()
    lin = Lineage(
        config=file_config(events_file),
        inputs=["s3://raw/customers/2026-11-30.parquet"],
        outputs=["catalog:customers_protected"],
        job_name="nightly.customers",
        namespace="analytics",
    )
    out = apply_policy(POLICY, frame(), keys={"k": KEY_HEX}, audit=sink, lineage=lin)
    assert list(out.columns) == ["email", "age", "city"] and len(out) == 2
    assert lin.failures == []
    start, complete = read_events(events_file)
    for e in (start, complete):
        check_event(e)
        assert e["job"] == {**e["job"], "namespace": "analytics", "name": "nightly.customers"}
    run_id = sink.records[0]["run_id"]
    assert start["run"]["runId"] == complete["run"]["runId"] == openlineage_run_id(run_id)
    assert complete["run"]["facets"]["cape"]["runId"] == run_id
    assert (start["eventType"], complete["eventType"]) == ("START", "COMPLETE")
    assert complete["run"]["facets"]["cape"]["policy"]["version"] == 4

    (inp,) = complete["inputs"]
    assert (inp["namespace"], inp["name"]) == ("s3://raw", "/customers/2026-11-30.parquet")
    assert [f["name"] for f in inp["facets"]["schema"]["fields"]] == [
        "email",
        "ssn",
        "age",
        "city",
    ]
    (output,) = complete["outputs"]
    assert (output["namespace"], output["name"]) == ("cape-catalog", "customers_protected")
    schema = {f["name"]: f["type"] for f in output["facets"]["schema"]["fields"]}
    assert schema == {"email": "string", "age": "int64", "city": "string"}
    assert output["outputFacets"]["outputStatistics"]["rowCount"] == 2

    fields = output["facets"]["columnLineage"]["fields"]
    assert set(fields) == {"email", "age", "city"}  # ssn was dropped: no output field
    (email_in,) = fields["email"]["inputFields"]
    assert (email_in["namespace"], email_in["name"], email_in["field"]) == (
        "s3://raw",
        "/customers/2026-11-30.parquet",
        "email",
    )
    (t,) = email_in["transformations"]
    assert t["type"] == "DIRECT" and t["masking"] is True
    assert "tokenizer" in t["description"] and "customers v4" in t["description"]
    assert fields["email"]["transformationType"] == "MASKED"
    assert (
        "numeric-rounding" in fields["age"]["inputFields"][0]["transformations"][0]["description"]
    )
    city = fields["city"]
    assert city["transformationType"] == "IDENTITY"
    assert city["inputFields"][0]["transformations"][0]["masking"] is False
    # The row filter is dataset-wide lineage from the column its condition reads.
    (flt,) = output["facets"]["columnLineage"]["dataset"]
    assert flt["field"] == "age"
    assert flt["transformations"][0]["type"] == "INDIRECT"
    assert flt["transformations"][0]["subtype"] == "FILTER"

    privacy = output["facets"]["capePrivacy"]
    assert privacy["columns"]["ssn"]["treatment"] == "dropped"
    assert privacy["columns"]["email"]["transformations"] == ["tokenizer"]
    assert privacy["columns"]["city"] == {"treatment": "untouched", "actions": []}
    assert privacy["rowFilters"][0]["condition"] == "age < 18"
    assert privacy["policy"]["label"] == "customers"

    # Names, types, counts and the policy's identity only: no value, token or key.
    text = events_file.read_text()
    for secret in [*EMAILS, "123-45-6789", "Oslo", KEY_HEX, *out["email"]]:
        assert secret not in text


class Receiver:
    """An OpenLineage HTTP endpoint on loopback that keeps what it is sent."""

    def __init__(self, status: int = 200):
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                outer.paths.append(self.path)
                if status == 200:
                    outer.bodies.append(json.loads(body))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.stop()


def http_config(url: str) -> dict[str, Any]:
    return {"transport": {"type": "http", "url": url, "timeout": 5, "retry": {"total": 0}}}


def test_http_transport_to_a_receiver_on_loopback(receiver: Receiver, tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pandas(frame(), preserve_index=False), src)
    dst = tmp_path / "out.parquet"
    result = apply_files(
        POLICY,
        src,
        dst,
        keys={"k": KEY_HEX},
        audit=MemorySink(),
        lineage=http_config(receiver.url),
    )
    assert result.counters.rows_out == 2
    assert receiver.paths == ["/api/v1/lineage", "/api/v1/lineage"]
    start, complete = receiver.bodies
    for e in (start, complete):
        check_event(e)
    assert complete["eventType"] == "COMPLETE"
    assert complete["job"]["name"] == "cape.customers"
    (inp,), (out,) = complete["inputs"], complete["outputs"]
    assert (inp["namespace"], inp["name"]) == ("file", str(src.resolve()))
    assert (out["namespace"], out["name"]) == ("file", str(dst.resolve()))
    assert complete["run"]["facets"]["cape"]["runId"] == result.run_id


def test_a_failed_run_sends_fail_with_the_error_type_only(receiver: Receiver) -> None:
    sink = MemorySink()
    bad = frame().drop(columns=["email"])  # the policy's first rule needs it
    with pytest.raises(Exception, match="email"):
        apply_policy(
            POLICY, bad, keys={"k": KEY_HEX}, audit=sink, lineage=http_config(receiver.url)
        )
    assert [r["event"] for r in sink.records] == ["run.started", "run.failed"]
    start, fail = receiver.bodies
    check_event(fail)
    assert (start["eventType"], fail["eventType"]) == ("START", "FAIL")
    message = fail["run"]["facets"]["errorMessage"]
    assert message["programmingLanguage"] == "python"
    assert message["message"].startswith("PlanError:")
    assert fail["outputs"] == [] and fail["inputs"] == []


@pytest.mark.parametrize("down", ["closed-port", "http-500"])
def test_a_lineage_backend_that_fails_never_fails_the_run(
    down: str, caplog: pytest.LogCaptureFixture
) -> None:
    if down == "http-500":
        broken = Receiver(status=500)
        url = broken.url
    else:
        r = Receiver()
        url = r.url
        r.stop()  # nothing listens there any more
    sink = MemorySink()
    lin = lineage_option(http_config(url))
    assert lin is not None
    try:
        with caplog.at_level(logging.WARNING, logger="cape_pipelines.lineage"):
            out = apply_policy(POLICY, frame(), keys={"k": KEY_HEX}, audit=sink, lineage=lin)
    finally:
        if down == "http-500":
            broken.stop()
    assert len(out) == 2
    assert [r["event"] for r in sink.records] == ["run.started", "run.completed"]
    run_id = sink.records[0]["run_id"]
    assert [(f[0], f[1]) for f in lin.failures] == [(run_id, "START"), (run_id, "COMPLETE")]
    warnings = [r.getMessage() for r in caplog.records if r.name == "cape_pipelines.lineage"]
    assert len(warnings) == 2 and all(run_id in w and "not sent" in w for w in warnings)
    assert KEY_HEX not in caplog.text


def test_cape_apply_lineage_uses_the_standard_openlineage_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "in.csv"
    frame().to_csv(src, index=False)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    events = tmp_path / "ol" / "events.jsonl"
    events.parent.mkdir()
    config = tmp_path / "openlineage.yml"
    config.write_text(f"transport:\n  type: file\n  log_file_path: {events}\n  append: true\n")
    monkeypatch.setenv("OPENLINEAGE_CONFIG", str(config))
    monkeypatch.setenv("CAPE_KEY_K", KEY_HEX)
    monkeypatch.setenv("CAPE_AUDIT_FILE", str(tmp_path / "audit.jsonl"))
    code = cape_main(
        [
            "apply",
            "--policy",
            str(policy),
            "--input",
            str(src),
            "--output",
            str(tmp_path / "out.parquet"),
            "--no-progress",
            "--lineage",
            "--lineage-job",
            "nightly",
            "--run-id",
            "nightly-2026-11-30",
        ]
    )
    assert code == 0
    _start, complete = read_events(events)
    check_event(complete)
    assert complete["job"]["name"] == "nightly"
    # A run id that is not a UUID maps to a stable one; the Cape id is kept in the facet.
    assert complete["run"]["runId"] == openlineage_run_id("nightly-2026-11-30")
    assert complete["run"]["facets"]["cape"]["runId"] == "nightly-2026-11-30"
    assert complete["inputs"][0]["name"] == str(src.resolve())


def test_lineage_flags_need_lineage(tmp_path: Path) -> None:
    code = cape_main(
        [
            "apply",
            "--policy",
            str(tmp_path / "p.json"),
            "--input",
            "x.csv",
            "--output",
            "y.parquet",
            "--lineage-job",
            "j",
        ]
    )
    assert code != 0


def test_dataset_names_follow_openlineage_naming() -> None:
    assert dataset_ref("s3://bucket/a/b.parquet") == dataset_ref("s3://bucket/a/b.parquet")
    ref = dataset_ref("s3://bucket/a/b.parquet")
    assert (ref.namespace, ref.name) == ("s3://bucket", "/a/b.parquet")
    ref = dataset_ref("file:///data/x.csv")
    assert (ref.namespace, ref.name) == ("file", "/data/x.csv")
    ref = dataset_ref("catalog:orders")
    assert (ref.namespace, ref.name) == ("cape-catalog", "orders")
    with pytest.raises(LineageError):
        dataset_ref("catalog:")
    with pytest.raises(LineageError):
        dataset_ref("s3:///no-bucket")
    with pytest.raises(LineageError, match="lineage= takes"):
        lineage_option("yes")  # type: ignore[arg-type]
    assert lineage_option(None) is None and lineage_option(False) is None


def test_catalog_dataset_is_named_as_a_symlink_of_the_inputs(tmp_path: Path) -> None:
    events_file = tmp_path / "e.jsonl"
    lin = Lineage(
        config=file_config(events_file),
        inputs=[tmp_path / "in.csv"],
        catalog_dataset="customers",
    )
    apply_policy(POLICY, frame(), keys={"k": KEY_HEX}, audit=MemorySink(), lineage=lin)
    complete = read_events(events_file)[-1]
    (inp,) = complete["inputs"]
    assert inp["facets"]["symlinks"]["identifiers"] == [
        {"namespace": "cape-catalog", "name": "customers", "type": "DATASET"}
    ]


@pytest.mark.dask
def test_a_dask_run_sends_its_events_from_the_driver(tmp_path: Path) -> None:
    dd = pytest.importorskip("dask.dataframe")
    from cape_pipelines.dask import apply_policy as dask_apply
    from cape_pipelines.dask import compute

    events_file = tmp_path / "e.jsonl"
    lin = Lineage(config=file_config(events_file), inputs=["s3://raw/c"], outputs=["s3://out/c"])
    ddf = dd.from_pandas(frame(), npartitions=2)
    out = compute(
        dask_apply(ddf, POLICY, keys={"k": KEY_HEX}, audit=MemorySink(), lineage=lin),
        scheduler="sync",
    )
    assert len(out) == 2 and lin.failures == []
    start, complete = read_events(events_file)
    assert start["eventType"] == "START"
    check_event(complete)
    assert complete["run"]["facets"]["cape"]["engine"] == "dask"
    assert complete["outputs"][0]["outputFacets"]["outputStatistics"]["rowCount"] == 2


def _beam_run(
    tmp_path: Path, lin: Any, rows: list[dict[str, Any]], options: list[str] | None = None
) -> list[dict[str, Any]]:
    """Run POLICY over ``rows`` on Beam's in-process DirectRunner (or ``options``); the audit
    records (a JSONL file: the workers write it)."""
    beam = pytest.importorskip("apache_beam")
    from apache_beam.options.pipeline_options import PipelineOptions

    from cape_pipelines.beam import ApplyPolicy

    audit = tmp_path / "audit.jsonl"
    schema = pa.Schema.from_pandas(frame(), preserve_index=False)
    with beam.Pipeline(options=PipelineOptions(options or [])) as p:
        _ = (
            p
            | beam.Create(rows)
            | ApplyPolicy(POLICY, keys={"k": KEY_HEX}, schema=schema, audit=str(audit), lineage=lin)
        )
    return [json.loads(line) for line in audit.read_text().splitlines()]


@pytest.mark.beam
@pytest.mark.parametrize(
    "options", [[], ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]]
)
def test_a_beam_run_sends_its_events_from_the_stages_that_audit_it(
    tmp_path: Path, options: list[str]
) -> None:
    events_file = tmp_path / "e.jsonl"
    lin = Lineage(
        config=file_config(events_file),
        inputs=["s3://raw/customers"],
        outputs=["s3://clean/customers"],
        job_name="beam.customers",
    )
    records = _beam_run(tmp_path, lin, frame().to_dict("records"), options)
    run_id = records[0]["run_id"]
    assert [r["event"] for r in records][-1] == "run.completed"
    start, complete = read_events(events_file)
    assert (start["eventType"], complete["eventType"]) == ("START", "COMPLETE")
    for e in (start, complete):
        check_event(e)
        assert e["run"]["runId"] == openlineage_run_id(run_id)
        assert e["run"]["facets"]["cape"]["runId"] == run_id
        assert e["run"]["facets"]["cape"]["engine"] == "beam"
        assert e["job"]["name"] == "beam.customers"
    (inp,) = complete["inputs"]
    assert (inp["namespace"], inp["name"]) == ("s3://raw", "/customers")
    assert [f["name"] for f in inp["facets"]["schema"]["fields"]] == list(frame().columns)
    (output,) = complete["outputs"]
    assert (output["namespace"], output["name"]) == ("s3://clean", "/customers")
    assert output["outputFacets"]["outputStatistics"]["rowCount"] == 2
    fields = output["facets"]["columnLineage"]["fields"]
    assert set(fields) == {"email", "age", "city"}
    assert fields["email"]["transformationType"] == "MASKED"
    assert fields["email"]["inputFields"][0]["name"] == "/customers"
    assert fields["city"]["transformationType"] == "IDENTITY"
    assert output["facets"]["capePrivacy"]["columns"]["ssn"]["treatment"] == "dropped"
    text = events_file.read_text()
    for secret in [*EMAILS, "123-45-6789", KEY_HEX]:
        assert secret not in text


@pytest.mark.beam
def test_a_failed_beam_run_sends_fail_with_the_plan(tmp_path: Path) -> None:
    events_file = tmp_path / "e.jsonl"
    rows = frame().to_dict("records")
    rows[1]["age"] = "old"  # not int64: the batch fails
    with pytest.raises(Exception, match="not int64"):
        _beam_run(tmp_path, file_config(events_file), rows)
    events = read_events(events_file)
    assert events[0]["eventType"] == "START"
    assert {e["eventType"] for e in events[1:]} == {"FAIL"}
    assert "COMPLETE" not in {e["eventType"] for e in events}
    fail = events[-1]
    check_event(fail)
    assert fail["run"]["runId"] == events[0]["run"]["runId"]
    assert fail["run"]["facets"]["errorMessage"]["message"].startswith("DataError")
    text = events_file.read_text()
    for secret in [*EMAILS, "123-45-6789", KEY_HEX]:
        assert secret not in text


@pytest.mark.beam
def test_beam_refuses_a_lineage_client_object_it_cannot_ship() -> None:
    pytest.importorskip("apache_beam")
    from cape_pipelines.beam import ApplyPolicy

    with pytest.raises(LineageError, match="not a Lineage with client="):
        ApplyPolicy(
            POLICY, keys={"k": KEY_HEX}, audit=str(Path("unused.jsonl")), lineage=Lineage(client=1)
        )


@pytest.mark.beam
def test_a_file_job_on_beam_sends_one_pair_of_events(tmp_path: Path) -> None:
    # The outer file job sends them; the Beam stages of its inner (silent) run do not.
    pytest.importorskip("apache_beam")
    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pandas(frame(), preserve_index=False), src)
    events_file = tmp_path / "e.jsonl"
    result = apply_files(
        POLICY,
        src,
        tmp_path / "out.parquet",
        keys={"k": KEY_HEX},
        audit=MemorySink(),
        engine="beam",
        lineage=file_config(events_file),
    )
    events = read_events(events_file)
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    assert events[1]["run"]["facets"]["cape"]["runId"] == result.run_id


@pytest.mark.dask
def test_a_file_job_on_another_engine_sends_one_pair_of_events(tmp_path: Path) -> None:
    pytest.importorskip("dask.dataframe")
    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pandas(frame(), preserve_index=False), src)
    events_file = tmp_path / "e.jsonl"
    result = apply_files(
        POLICY,
        src,
        tmp_path / "out.parquet",
        keys={"k": KEY_HEX},
        audit=MemorySink(),
        engine="dask",
        lineage=file_config(events_file),
    )
    events = read_events(events_file)
    # The outer file job's run only: the engine's inner run is silent.
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    assert events[1]["run"]["facets"]["cape"]["runId"] == result.run_id


def test_the_client_made_from_config_is_closed_after_each_run_a_given_one_is_not(
    tmp_path: Path,
) -> None:
    class Given:
        def __init__(self) -> None:
            self.events: list[Any] = []
            self.closed = False

        def emit(self, event: Any) -> None:
            self.events.append(event)

        def close(self, timeout: float = -1) -> bool:
            self.closed = True
            return True

    given = Given()
    lin = Lineage(client=given)
    apply_policy(POLICY, frame(), keys={"k": KEY_HEX}, audit=MemorySink(), lineage=lin)
    assert [e.eventType.value for e in given.events] == ["START", "COMPLETE"]
    assert not given.closed

    made = Lineage(config=file_config(tmp_path / "e.jsonl"))
    for _ in range(2):
        apply_policy(POLICY, frame(), keys={"k": KEY_HEX}, audit=MemorySink(), lineage=made)
        assert "client" not in made._made  # closed once the run ended
    assert len(read_events(tmp_path / "e.jsonl")) == 4
