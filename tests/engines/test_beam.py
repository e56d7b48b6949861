"""Tests of the Beam adapter: dicts, Rows and Arrow tables in; metrics; one audit run; bad input.

Each pipeline start costs about a second in-process and several seconds
multi-process, so each test runs one small pipeline and checks several things
about it; the multi-process variant runs once, on a few row groups.
"""

from __future__ import annotations

import datetime
import glob
import json
from typing import Any, ClassVar

import pytest

beam = pytest.importorskip("apache_beam")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from apache_beam.metrics.metric import MetricsFilter  # noqa: E402
from apache_beam.testing.util import assert_that, equal_to  # noqa: E402
from apache_beam.transforms.window import FixedWindows, TimestampedValue  # noqa: E402
from apache_beam.utils.timestamp import Timestamp  # noqa: E402
from runner_beam import MULTI_PROCESS, run_beam  # noqa: E402

from cape_pipelines.audit import LoggingSink, MemorySink  # noqa: E402
from cape_pipelines.beam import ApplyPolicy  # noqa: E402
from cape_pipelines.beam.coders import ArrowCoder  # noqa: E402
from cape_pipelines.errors import CapeError, PlanError  # noqa: E402
from cape_pipelines.transforms import (  # noqa: E402
    ColumnContext,
    ColumnTransformation,
    KeyedTransformation,
    known_types,
    register,
)

pytestmark = pytest.mark.beam


class _Length(ColumnTransformation):
    """String -> int32 length: a column whose type the plan changes."""

    type_name: ClassVar[str] = "beam-test-length"

    def output_type(self, input_type: pa.DataType, column: str) -> pa.DataType:
        if not pa.types.is_string(input_type):
            raise self.refuse(column, input_type, "a string column")
        return pa.int32()

    def apply(self, array: pa.Array, ctx: ColumnContext) -> pa.Array:
        return pc.utf8_length(array).cast(pa.int32())


class _KeyedUpper(KeyedTransformation):
    """Upper-cases strings; needs a key, so a missing key must fail at construction."""

    type_name: ClassVar[str] = "beam-test-keyed-upper"

    def output_type(self, input_type: pa.DataType, column: str) -> pa.DataType:
        if not pa.types.is_string(input_type):
            raise self.refuse(column, input_type, "a string column")
        return input_type

    def apply(self, array: pa.Array, ctx: ColumnContext) -> pa.Array:
        assert ctx.key == b"k" * 16
        return pc.utf8_upper(array)


for _cls in (_Length, _KeyedUpper):
    if _cls.type_name not in known_types():
        register(_cls)

KEYS = {"name-key": b"k" * 16}
SCHEMA = pa.schema([("name", pa.string()), ("ssn", pa.string()), ("age", pa.int64())])
POLICY: dict[str, Any] = {
    "label": "beam-test",
    "rules": [
        {"match": {"name": "ssn"}, "actions": ["drop"]},
        {
            "match": {"name": "name"},
            "actions": [
                {"transform": {"type": "beam-test-keyed-upper", "key": {"secret": "name-key"}}}
            ],
        },
        {"actions": [{"transform": {"type": "row-redact", "condition": "age < 18"}}]},
    ],
}
PEOPLE = [
    {"name": "ana", "ssn": "1", "age": 30},
    {"name": None, "ssn": "2", "age": 40},
    {"name": "bo", "ssn": "3", "age": 12},
    {"name": "cy", "ssn": None, "age": None},
]
# Row-redact removes the minor and the row whose age is null (fail closed).
EXPECTED = [{"name": "ANA", "age": 30}, {"name": None, "age": 40}]


def _records(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_dicts_in_dicts_out(tmp_path):
    with beam.Pipeline() as p:
        out = (
            p
            | beam.Create(PEOPLE)
            | ApplyPolicy(POLICY, keys=KEYS, schema=SCHEMA, audit=str(tmp_path / "a.jsonl"))
        )
        assert_that(out, equal_to(EXPECTED))


def test_rows_get_an_output_schema_with_dropped_columns_and_changed_types(tmp_path):
    policy = {
        "label": "rows",
        "rules": [
            {"match": {"name": "ssn"}, "actions": ["drop"]},
            {"match": {"name": "name"}, "actions": [{"transform": {"type": "beam-test-length"}}]},
            {"actions": [{"transform": {"type": "row-redact", "condition": "age < 18"}}]},
        ],
    }
    seen = Timestamp(micros=1_700_000_000_123_456)
    rows = [
        beam.Row(
            name="ana",
            ssn="1",
            age=30,
            small=np.int32(7),
            seen=seen,
            day=datetime.date(2020, 2, 29),
        ),
        beam.Row(
            name="bo", ssn="2", age=12, small=np.int32(8), seen=seen, day=datetime.date(2021, 1, 1)
        ),
    ]
    with beam.Pipeline() as p:
        out = p | beam.Create(rows) | ApplyPolicy(policy, audit=str(tmp_path / "a.jsonl"))
        assert [(n, str(t)) for n, t in out.element_type._fields] == [
            ("name", "typing.Optional[numpy.int32]"),
            ("age", "typing.Optional[int]"),
            ("small", "typing.Optional[numpy.int32]"),
            ("seen", "typing.Optional[apache_beam.utils.timestamp.Timestamp]"),
            ("day", "typing.Optional[datetime.date]"),
        ]
        as_tuples = out | beam.Map(lambda r: (r.name, r.age, int(r.small), r.seen, r.day))
        assert_that(as_tuples, equal_to([(3, 30, 7, seen, datetime.date(2020, 2, 29))]))


@pytest.mark.parametrize(
    ("make", "typed"),
    [
        pytest.param(lambda rows: pa.Table.from_pylist(rows, schema=SCHEMA), True, id="table"),
        pytest.param(
            lambda rows: pa.RecordBatch.from_pylist(rows, schema=SCHEMA), True, id="batch"
        ),
        # Tables in a PCollection typed Any go through BatchElements, one table a batch.
        pytest.param(
            lambda rows: pa.Table.from_pylist(rows, schema=SCHEMA), False, id="untyped-table"
        ),
    ],
)
def test_arrow_elements_in_arrow_elements_out(tmp_path, make, typed):
    # Two elements, one of which loses every row: only non-empty outputs are emitted.
    # batch_size=2 is smaller than the first element, which is transformed whole
    # all the same.
    elements = [make(PEOPLE), make(PEOPLE[2:3])]
    with beam.Pipeline() as p:
        source = p | beam.Create(elements)
        if not typed:
            source = source | beam.Map(lambda t: t).with_output_types(Any)
        out = source | ApplyPolicy(
            POLICY, keys=KEYS, schema=SCHEMA, audit=str(tmp_path / "a.jsonl"), batch_size=2
        )
        kinds = out | "Kind" >> beam.Map(lambda t: (type(t).__name__, t.schema.names))
        assert_that(kinds, equal_to([(type(elements[0]).__name__, ["name", "age"])]), "kinds")
        rows = out | "Rows" >> beam.FlatMap(lambda t: t.to_pylist())
        assert_that(rows, equal_to(EXPECTED), "rows")
    assert out.element_type == (type(elements[0]) if typed else beam.typehints.Any)


def test_metrics_count_rows_and_columns(tmp_path):
    p = beam.Pipeline()
    _ = (
        p
        | beam.Create(PEOPLE)
        | ApplyPolicy(POLICY, keys=KEYS, schema=SCHEMA, audit=str(tmp_path / "a.jsonl"))
    )
    result = p.run()
    result.wait_until_finish()
    found = result.metrics().query(MetricsFilter().with_namespace("cape_pipelines:beam-test"))
    counters = {c.key.metric.name: c.committed for c in found["counters"]}
    assert counters == {
        "rows_in": 4,
        "rows_out": 2,
        "rows_redacted": 2,
        "name.values": 1,
        "name.nulls": 1,
    }


def _check_one_run(records: list[dict[str, Any]], rows_in: int, rows_out: int) -> None:
    assert [r["event"] for r in records] == ["run.started", "run.completed"]
    started, completed = records
    assert started["run_id"] == completed["run_id"]
    assert completed["engine"] == "beam"
    assert (completed["rows_in"], completed["rows_out"]) == (rows_in, rows_out)
    assert completed["rows_redacted"] == rows_in - rows_out


def test_audit_once_per_run_in_process(tmp_path):
    audit = str(tmp_path / "audit.jsonl")
    with beam.Pipeline() as p:
        # Many batches, so a per-batch or per-bundle record would show up as a duplicate.
        _ = (
            p
            | beam.Create(PEOPLE * 50)
            | ApplyPolicy(POLICY, keys=KEYS, schema=SCHEMA, audit=audit, batch_size=7)
        )
    records = _records(audit)
    _check_one_run(records, rows_in=200, rows_out=100)
    assert records[1]["columns"] == {
        "name": {"transform": "beam-test-keyed-upper", "values": 50, "nulls": 50}
    }
    assert records[0]["policy"]["label"] == "beam-test"


def test_audit_once_per_run_multi_process(tmp_path):
    # Built-in transformations only: worker processes cannot import this test module.
    policy = {
        "label": "beam-mp",
        "rules": [
            {"match": {"name": "ssn"}, "actions": ["drop"]},
            {"actions": [{"transform": {"type": "row-redact", "condition": "age < 18"}}]},
        ],
    }
    table = pa.Table.from_pylist(PEOPLE * 30, schema=SCHEMA)
    audit = str(tmp_path / "audit.jsonl")
    out = run_beam(policy, table, options=MULTI_PROCESS, audit=audit)
    _check_one_run(_records(audit), rows_in=120, rows_out=60)
    assert out.to_pylist() == [
        {"name": p["name"], "age": p["age"]}
        for p in PEOPLE * 30
        if p["age"] is not None and p["age"] >= 18
    ]


def test_parquet_to_parquet_with_schema_from_the_file(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(PEOPLE, schema=SCHEMA), src, row_group_size=2)
    step = ApplyPolicy.from_parquet_schema(
        str(tmp_path / "*.parquet"), POLICY, keys=KEYS, audit=str(tmp_path / "a.jsonl")
    )
    assert step.output_schema.names == ["name", "age"]
    with beam.Pipeline() as p:
        _ = (
            p
            | beam.io.ReadFromParquetBatched(str(src))
            | step
            | beam.io.WriteToParquetBatched(str(tmp_path / "out"), schema=step.output_schema)
        )
    out = pa.concat_tables(pq.read_table(f) for f in glob.glob(str(tmp_path / "out*")))
    assert sorted(out.to_pylist(), key=lambda r: r["age"]) == EXPECTED


def _missing_key_policy() -> dict[str, Any]:
    return {**POLICY, "label": "no-key"}


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        # A Row type without a column the policy names: fails when applied.
        (
            lambda: (
                beam.Pipeline()
                | beam.Create([beam.Row(name="a", age=1)])
                | ApplyPolicy(POLICY, keys=KEYS, audit=LoggingSink())
            ),
            PlanError,
            r"'ssn'.*not in the data",
        ),
        # A Row type with a field the given schema= lacks: it would vanish unnoticed.
        (
            lambda: (
                beam.Pipeline()
                | beam.Create([beam.Row(name="a", ssn="1", age=1, email="x")])
                | ApplyPolicy(POLICY, keys=KEYS, schema=SCHEMA, audit=LoggingSink())
            ),
            PlanError,
            r"field\(s\) 'email' that are not in the schema",
        ),
        # A transformation that cannot take the column's type.
        (
            lambda: ApplyPolicy(
                {
                    "label": "t",
                    "rules": [
                        {
                            "match": {"name": "age"},
                            "actions": [{"transform": {"type": "beam-test-length"}}],
                        }
                    ],
                },
                schema=SCHEMA,
                audit=LoggingSink(),
            ),
            PlanError,
            r"column 'age': beam-test-length needs a string column, but the column is int64",
        ),
        # A key no provider has: at construction, naming the key.
        (
            lambda: ApplyPolicy(POLICY, keys={}, schema=SCHEMA, audit=LoggingSink()),
            CapeError,
            r"key 'name-key' not found",
        ),
        # The same for Row input, where the schema is only known when applied.
        (
            lambda: (
                beam.Pipeline()
                | beam.Create([beam.Row(name="a", ssn="1", age=1)])
                | ApplyPolicy(POLICY, audit=LoggingSink())
            ),
            CapeError,
            r"key 'name-key' not found",
        ),
        # A policy that drops every column.
        (
            lambda: ApplyPolicy(
                {
                    "label": "t",
                    "rules": [{"match": {"names": ["name", "ssn", "age"]}, "actions": ["drop"]}],
                },
                schema=SCHEMA,
                audit=LoggingSink(),
            ),
            PlanError,
            r"drops every column",
        ),
        # Input whose schema cannot be known.
        (
            lambda: (
                beam.Pipeline()
                | beam.Create(PEOPLE)
                | ApplyPolicy(POLICY, keys=KEYS, audit=LoggingSink())
            ),
            PlanError,
            r"needs the input's Arrow schema",
        ),
        # An audit sink whose records would stay in a worker's copy.
        (
            lambda: ApplyPolicy(POLICY, keys=KEYS, schema=SCHEMA, audit=MemorySink()),
            TypeError,
            r"MemorySink cannot audit a Beam pipeline",
        ),
    ],
    ids=[
        "row-missing-column",
        "row-extra-field",
        "bad-type",
        "missing-key",
        "row-missing-key",
        "drops-everything",
        "no-schema",
        "memory-sink",
    ],
)
def test_bad_input_fails_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    ("elements", "match"),
    [
        ([{"name": "a", "age": 1}], r"column\(s\) 'ssn' are missing from input element"),
        ([{"name": "a", "ssn": "1", "age": 1, "email": "x"}], r"column\(s\) 'email' are not in"),
        ([pa.table({"name": ["a"], "age": [1]})], r"column 'ssn' is missing from the batch"),
        (
            [{"name": "a", "ssn": "1", "age": "old"}],
            r"column 'age' holds values that are not int64",
        ),
    ],
    ids=["dict-missing-column", "dict-extra-column", "table-missing-column", "dict-bad-value"],
)
def test_bad_data_fails_at_the_first_batch_with_no_output_and_a_failed_run(
    tmp_path, elements, match
):
    audit = str(tmp_path / "audit.jsonl")
    with pytest.raises(Exception, match=match):
        with beam.Pipeline() as p:
            _ = (
                p
                | beam.Create(elements)
                | ApplyPolicy(POLICY, keys=KEYS, schema=SCHEMA, audit=audit)
                | beam.Map(json.dumps, default=str)
                | beam.io.WriteToText(str(tmp_path / "out" / "part"))
            )
    # Beam's file sinks write to a temporary directory and rename on success.
    assert not glob.glob(str(tmp_path / "out" / "part*"))
    records = _records(audit)
    events = [r["event"] for r in records]
    assert events[0] == "run.started"
    assert "run.completed" not in events
    assert set(events[1:]) == {"run.failed"}
    assert {r["run_id"] for r in records} == {records[0]["run_id"]}


def test_empty_input_still_completes_its_run(tmp_path):
    audit = str(tmp_path / "audit.jsonl")
    with beam.Pipeline() as p:
        out = (
            p
            | beam.Create([], reshuffle=False).with_output_types(dict)
            | ApplyPolicy(POLICY, keys=KEYS, schema=SCHEMA, audit=audit)
        )
        assert_that(out, equal_to([]))
    records = _records(audit)
    _check_one_run(records, rows_in=0, rows_out=0)
    assert records[1]["columns"] == {
        "name": {"transform": "beam-test-keyed-upper", "values": 0, "nulls": 0}
    }


def test_windowed_dicts_keep_their_windows_and_the_run_counts_every_window(tmp_path):
    # Windows 0-10 and 10-20; batch_size=3 flushes some dicts inside process()
    # and the rest at the end of the bundle, each in its own window.
    stamped = [
        (dict(p, name=f"{p['name'] or 'x'}{i}"), 5 + 10 * (i % 2)) for i, p in enumerate(PEOPLE * 4)
    ]
    audit = str(tmp_path / "audit.jsonl")
    with beam.Pipeline() as p:
        out = (
            p
            | beam.Create(stamped)
            | "Stamp" >> beam.Map(lambda e: TimestampedValue(*e))
            | beam.WindowInto(FixedWindows(10))
            | ApplyPolicy(POLICY, keys=KEYS, schema=SCHEMA, audit=audit, batch_size=3)
        )
        placed = out | beam.Map(
            lambda d, w=beam.DoFn.WindowParam: (d["name"], d["age"], int(w.start))
        )
        expected = [
            (d["name"].upper(), d["age"], ts - 5)
            for d, ts in stamped
            if d["age"] is not None and d["age"] >= 18
        ]
        assert_that(placed, equal_to(expected))
    _check_one_run(_records(audit), rows_in=16, rows_out=8)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(pa.Table.from_pylist(PEOPLE, schema=SCHEMA), id="table"),
        pytest.param(pa.RecordBatch.from_pylist(PEOPLE, schema=SCHEMA), id="batch"),
    ],
)
def test_arrow_coder_round_trips_and_sizes_by_nbytes(value):
    coder = beam.coders.registry.get_coder(type(value))
    assert isinstance(coder, ArrowCoder)
    impl = coder.get_impl()
    assert impl.decode(impl.encode(value)).equals(value)
    assert coder.decode(coder.encode(value)).equals(value)
    # Beam samples element sizes through the coder: no encoding, just nbytes.
    assert impl.estimate_size(value) == value.nbytes


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (lambda p, path: p | beam.io.ReadFromParquetBatched(path), pa.Table),
        (
            lambda p, _path: (
                p
                | beam.Create(
                    [pa.RecordBatch.from_pylist(PEOPLE, schema=SCHEMA)]
                ).with_output_types(pa.RecordBatch)
            ),
            pa.RecordBatch,
        ),
        (lambda p, _path: p | beam.Create(PEOPLE), beam.typehints.Any),
    ],
    ids=["parquet-batched", "typed-record-batches", "dicts"],
)
def test_output_element_type(tmp_path, source, expected):
    # Arrow output is typed, so it gets the ArrowCoder; dicts stay Any.
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.Table.from_pylist(PEOPLE, schema=SCHEMA), path)
    p = beam.Pipeline()
    out = source(p, path) | ApplyPolicy(
        POLICY, keys=KEYS, schema=SCHEMA, audit=str(tmp_path / "a.jsonl")
    )
    assert out.element_type == expected
