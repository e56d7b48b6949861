"""The engine seam: one binding, one audited run, counters built one way, engines by entry point."""

from __future__ import annotations

import gc
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest

import cape_pipelines
from cape_pipelines import Counters, MemorySink, PlanError
from cape_pipelines.io import ENGINE_GROUP, get_engine
from cape_pipelines.seam import Binding, Tracked, bind

POLICY: dict[str, Any] = {
    "label": "seam",
    "rules": [
        {"match": {"name": "ssn"}, "actions": ["drop"]},
        {"actions": [{"transform": {"type": "row-redact", "condition": "age < 18"}}]},
    ],
}
SCHEMA = pa.schema([("name", pa.string()), ("age", pa.int64()), ("ssn", pa.string())])


def _events(sink: MemorySink) -> list[str]:
    return [r["event"] for r in sink.records]


def test_a_run_records_started_then_completed_with_the_merged_counters() -> None:
    sink = MemorySink()
    binding = bind(POLICY, engine="test", audit=sink)
    plan = binding.plan(SCHEMA)
    batch = pa.record_batch([["a", "b"], [30, 40]], names=["name", "age"])
    with binding.run(plan) as run:
        run.add(Counters.of_batch(plan, batch, rows_in=3))
        run.add(Counters.of_batch(plan, batch, rows_in=2))
    assert _events(sink) == ["run.started", "run.completed"]
    done = sink.records[-1]
    assert (done["rows_in"], done["rows_out"], done["rows_redacted"]) == (5, 4, 1)
    assert {r["run_id"] for r in sink.records} == {run.run_id}
    assert done["policy"]["label"] == "seam"


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt()])
def test_any_exception_inside_a_run_is_recorded_and_propagates(error: BaseException) -> None:
    sink = MemorySink()
    binding = bind(POLICY, engine="test", audit=sink)
    with pytest.raises(type(error)), binding.run():
        raise error
    assert _events(sink) == ["run.started", "run.failed"]
    assert sink.records[-1]["error"]["type"] == type(error).__name__


def test_a_plan_that_cannot_be_built_is_a_failed_run() -> None:
    sink = MemorySink()
    binding = bind(POLICY, engine="test", audit=sink)
    with pytest.raises(PlanError, match="ssn"):
        binding.plan(pa.schema([("name", pa.string()), ("age", pa.int64())]))
    assert _events(sink) == ["run.started", "run.failed"]


class _DownCoordinator:
    """A coordinator client whose policy fetch fails (the coordinator refused or is down)."""

    url = "https://coordinator.invalid"

    def get_policy(self, label: str) -> Any:
        raise ConnectionError("coordinator unreachable")

    def key_provider(self, label: str) -> Any:
        raise AssertionError("no keys without a policy")

    def default_audit_sink(self) -> Any:
        raise AssertionError("the caller's sink is used")


def test_a_policy_that_does_not_resolve_names_the_label_asked_for() -> None:
    # A coordinator takes no record without a label (issue 9.1): the failed run of a
    # label that could not be fetched names that label.
    sink = MemorySink()
    with pytest.raises(ConnectionError):
        bind(
            "orders",
            engine="test",
            client=_DownCoordinator(),
            audit=sink,
            record_failure=True,
            run_id="r-1",
        )
    assert _events(sink) == ["run.started", "run.failed"]
    assert [r["policy"] for r in sink.records] == [{"label": "orders"}] * 2
    assert {r["run_id"] for r in sink.records} == {"r-1"}


def test_a_policy_source_names_where_the_policy_came_from() -> None:
    sink = MemorySink()
    binding = bind(POLICY, engine="test", audit=sink, source="policy.yaml")
    with binding.run(binding.plan(SCHEMA)):
        pass
    assert _events(sink) == ["run.started", "policy.fetched", "run.completed"]
    assert sink.records[1]["source"] == "policy.yaml"


def test_a_silent_binding_records_nothing_and_keeps_the_resolver() -> None:
    sink = MemorySink()
    binding = bind(POLICY, engine="test", audit=sink)
    quiet = binding.silent()
    assert isinstance(quiet, Binding) and quiet.resolver is binding.resolver
    with quiet.run(quiet.plan(SCHEMA)):
        pass
    assert sink.records == []
    assert bind(quiet, engine="other") is quiet
    with pytest.raises(TypeError, match="keys"):
        bind(quiet, engine="other", keys={"k": b"0" * 16})


def test_counters_of_batch_count_values_and_nulls_of_transformed_columns() -> None:
    pol = {
        "label": "c",
        "rules": [
            {
                "match": {"name": "n"},
                "actions": [{"transform": {"type": "numeric-rounding", "precision": 0}}],
            }
        ],
    }
    plan = bind(pol, engine="test", audit=MemorySink()).build(pa.schema([("n", pa.float64())]))
    counters = Counters.of_batch(plan, pa.record_batch([[1.5, None, 2.0]], names=["n"]))
    assert counters.to_dict()["columns"] == {
        "n": {"transform": "numeric-rounding", "values": 2, "nulls": 1}
    }


def test_tracked_forgets_an_object_with_the_object() -> None:
    class Frame:
        pass

    tracked: Tracked[str] = Tracked("unknown frame")
    frame = Frame()
    tracked.remember(frame, "plan")
    assert tracked[frame] == "plan"
    with pytest.raises(TypeError, match="unknown frame"):
        tracked[Frame()]
    del frame
    gc.collect()
    assert tracked._items == {}


def test_every_cli_engine_is_an_entry_point() -> None:
    names = {ep.name for ep in entry_points(group=ENGINE_GROUP)}
    assert {"pandas", "beam", "dask", "spark"} <= names
    assert get_engine("pandas").__module__ == "cape_pipelines.pandas.files"


def test_import_cape_pipelines_registers_the_pandas_accessor() -> None:
    df = pd.DataFrame({"name": ["a", "b"], "age": [10, 40], "ssn": ["1", "2"]})
    out = df.cape.apply(POLICY, audit=MemorySink())
    assert list(out.columns) == ["name", "age"] and list(out.index) == [1]
    assert cape_pipelines.__version__ != "0+unknown"


ADAPTERS = ("pandas", "beam", "dask", "spark")
PACKAGE = Path(cape_pipelines.__file__).parent


def test_adapters_mirror_each_other_and_leave_audit_to_the_seam() -> None:
    for name in ADAPTERS:
        files = {p.name for p in (PACKAGE / name).glob("*.py")}
        assert {"__init__.py", "apply.py", "convert.py", "files.py"} <= files, name
        for path in (PACKAGE / name).glob("*.py"):
            text = path.read_text()
            assert "except BaseException" not in text, path
            assert "RunContext(" not in text, path
