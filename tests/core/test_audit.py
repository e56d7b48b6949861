"""Audit records of apply_policy: the fields of one run, counts from the data written, sinks."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import _core_test_transforms  # noqa: F401  (registers test-suffix, plusN, test-keyed)
import pandas as pd
import pytest

from cape_pipelines import apply_policy, load_policy
from cape_pipelines.audit import (
    JsonlSink,
    LoggingSink,
    MemorySink,
    RunContext,
    error_info,
    resolve_sink,
)

POLICY = {
    "label": "audited",
    "version": 4,
    "rules": [
        {"match": {"name": "name"}, "actions": [{"transform": {"type": "test-suffix"}}]},
        {"match": {"name": "ssn"}, "actions": ["drop"]},
        {"actions": [{"transform": {"type": "row-redact", "condition": "age < 18"}}]},
    ],
}
RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "name": ["a", None, "c", "d", None],
            "age": [10, 20, 30, None, 40],
            "ssn": ["1", "2", "3", "4", "5"],
        }
    )


def test_one_run_two_records_with_every_field() -> None:
    sink = MemorySink()
    apply_policy(POLICY, frame(), audit=sink)
    started, completed = sink.records
    assert (started["event"], completed["event"]) == ("run.started", "run.completed")
    assert started["run_id"] == completed["run_id"]
    assert started["record_id"] != completed["record_id"]
    for rec in sink.records:
        assert RFC3339_UTC.fullmatch(rec["time"])
        assert rec["engine"] == "pandas" and rec["engine_version"] == pd.__version__
        assert rec["policy"] == {
            "label": "audited",
            "version": 4,
            "sha256": load_policy(POLICY).sha256,
        }
        assert rec["principal"]
    # rows 0 (age 10) and 3 (age null) are removed: counts are of the rows written
    assert (completed["rows_in"], completed["rows_out"], completed["rows_redacted"]) == (5, 3, 2)
    assert completed["columns"] == {"name": {"transform": "test-suffix", "values": 1, "nulls": 2}}
    assert "error" not in completed


def test_failed_run_records_the_error_without_values() -> None:
    sink = MemorySink()
    bad = {
        **POLICY,
        "rules": [
            *POLICY["rules"],
            {"match": {"name": "age"}, "actions": [{"transform": {"type": "test-suffix"}}]},
        ],
    }
    with pytest.raises(Exception, match="test-suffix needs a string column"):
        apply_policy(bad, frame(), audit=sink)
    assert [r["event"] for r in sink.records] == ["run.started", "run.failed"]
    assert sink.records[1]["error"]["type"] == "PlanError"
    assert "rules[3].actions[0].transform" in sink.records[1]["error"]["message"]


def test_arrow_engine_name() -> None:
    import pyarrow as pa

    sink = MemorySink()
    apply_policy(POLICY, pa.Table.from_pandas(frame(), preserve_index=False), audit=sink)
    assert {r["engine"] for r in sink.records} == {"pyarrow"}
    assert sink.records[-1]["rows_out"] == 3


def test_jsonl_sink_by_path(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "runs.jsonl"
    apply_policy(POLICY, frame(), audit=path)
    apply_policy(POLICY, frame(), audit=str(path))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in lines] == ["run.started", "run.completed"] * 2
    assert len({r["run_id"] for r in lines}) == 2


def test_default_sink_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPE_AUDIT_FILE", str(tmp_path / "env.jsonl"))
    assert isinstance(resolve_sink(None), JsonlSink)
    monkeypatch.delenv("CAPE_AUDIT_FILE")
    assert isinstance(resolve_sink(None), LoggingSink)


def test_logging_sink(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cape_pipelines.audit"):
        apply_policy(POLICY, frame(), audit=LoggingSink())
    events = [
        json.loads(r.getMessage())["event"]
        for r in caplog.records
        if r.name == "cape_pipelines.audit"
    ]
    assert events == ["run.started", "run.completed"]


def test_bad_audit_target() -> None:
    with pytest.raises(TypeError, match="audit must be a Sink, a path or None, not int"):
        resolve_sink(5)  # type: ignore[arg-type]


def test_unknown_event() -> None:
    with pytest.raises(ValueError, match=r"unknown audit event 'run\.exploded'"):
        RunContext(engine="pandas", sink=MemorySink()).record("run.exploded")


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ValueError("first line\nsecond line with a value"), "first line"),
        (KeyError("x"), "'x'"),
        (RuntimeError("y" * 900), "y" * 500),
    ],
)
def test_error_info_keeps_first_line_of_foreign_errors(exc: BaseException, expected: str) -> None:
    info = error_info(exc)
    assert info == {"type": type(exc).__name__, "message": expected}


def test_engine_version_is_read_once_per_engine(monkeypatch):
    import importlib.metadata

    from cape_pipelines.audit import engine_version

    clear = getattr(engine_version, "cache_clear", lambda: None)
    clear()
    calls = []
    real = importlib.metadata.version

    def counting(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", counting)
    for _ in range(3):
        RunContext(engine="pandas", sink=MemorySink())
    assert calls == ["pandas"]
    clear()
