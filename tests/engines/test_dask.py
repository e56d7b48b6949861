"""Dask adapter: laziness, meta, tokens, the audited run, accessors, and bad input.

Output values are checked by the parity suite (test_parity.py); this module
checks what is particular to Dask.
"""

from __future__ import annotations

import pickle
import threading
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

dd = pytest.importorskip("dask.dataframe")

import cape_pipelines  # noqa: E402
import cape_pipelines.dask as cape_dask  # noqa: E402
from cape_pipelines import KeyMissingError, PlanError  # noqa: E402
from cape_pipelines.audit import MemorySink  # noqa: E402
from cape_pipelines.dask import apply as dask_apply  # noqa: E402

pytestmark = pytest.mark.dask

NOISE = {"noise": b"n" * 32}
DROP_SSN = {"label": "t", "rules": [{"match": {"name": "ssn"}, "actions": ["drop"]}]}
ADULTS = {
    "label": "t",
    "rules": [
        {"actions": [{"transform": {"type": "row-redact", "condition": "age < 18"}}]},
        {"match": {"name": "ssn"}, "actions": ["drop"]},
    ],
}


def people(n: int = 8) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "name": [f"p{i}" for i in range(n)],
            "age": pd.array([10 + 5 * i if i != 3 else None for i in range(n)], dtype="Int32"),
            "ssn": [f"{i:03d}" for i in range(n)],
            "score": [i / 4 for i in range(n)],
        },
        index=pd.Index([100 + i for i in range(n)], name="row"),
    )


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every partition the adapter transforms (the meta included)."""
    seen: list[int] = []
    lock = threading.Lock()
    real = dask_apply.apply_frame

    def counting(plan: Any, df: pd.DataFrame, new_strings: Any) -> Any:
        with lock:
            seen.append(len(df))
        return real(plan, df, new_strings)

    monkeypatch.setattr(dask_apply, "apply_frame", counting)
    return seen


def test_lazy_until_computed_and_each_partition_transformed_once(calls: list[int]) -> None:
    ddf = dd.from_pandas(people(), npartitions=4)
    out = cape_dask.apply_policy(ddf, ADULTS, audit=MemorySink())
    assert calls == [0]  # only the (empty) meta so far
    result = cape_dask.compute(out, scheduler="threads")
    # Data and audit counters come from the same tasks: four partitions, once each.
    assert sorted(calls[1:]) == [2, 2, 2, 2]
    assert list(result.index) == [102, 104, 105, 106, 107]


def test_meta_matches_partitions_with_dropped_columns_and_new_dtypes() -> None:
    pol = {
        "label": "t",
        "rules": [
            {"match": {"name": "ssn"}, "actions": ["drop"]},
            {
                "match": {"name": "age"},
                "actions": [
                    {
                        "transform": {
                            "type": "numeric-perturbation",
                            "min": -1,
                            "max": 1,
                            "seed": 1,
                            "dtype": "Double",
                        }
                    }
                ],
            },
        ],
    }
    out = cape_dask.apply_policy(dd.from_pandas(people(), npartitions=3), pol)
    assert list(out.columns) == ["name", "age", "score"]
    assert str(out.dtypes["age"]) == "float64"
    result = out.compute(scheduler="threads")
    assert dict(result.dtypes) == dict(out.dtypes)


def test_audited_run_counts_the_data_produced() -> None:
    sink = MemorySink()
    out = cape_dask.apply_policy(dd.from_pandas(people(), npartitions=3), ADULTS, audit=sink)
    assert sink.records == []  # building the lazy frame is not a run
    cape_dask.compute(out, scheduler="threads")
    cape_dask.compute(out, scheduler="threads")
    events = [r["event"] for r in sink.records]
    assert events == ["run.started", "run.completed"] * 2
    first, second = sink.records[1], sink.records[3]
    assert first["run_id"] != second["run_id"]
    for done in (first, second):  # each run its own totals, never accumulated
        assert (done["rows_in"], done["rows_out"], done["rows_redacted"]) == (8, 5, 3)
        assert done["engine"] == "dask"
        assert done["policy"]["label"] == "t"


def test_run_writes_parquet_in_the_same_pass(tmp_path: Any, calls: list[int]) -> None:
    sink = MemorySink()
    out = cape_dask.apply_policy(dd.from_pandas(people(), npartitions=2), ADULTS, audit=sink)
    cape_dask.run(out, out.to_parquet(str(tmp_path / "o"), compute=False), scheduler="threads")
    assert sorted(calls[1:]) == [4, 4]
    written = pd.read_parquet(tmp_path / "o")
    assert len(written) == sink.records[-1]["rows_out"] == 5
    assert "ssn" not in written.columns


def test_failed_compute_emits_run_failed() -> None:
    import dask

    good = pd.DataFrame({"ssn": ["1", "2"], "name": ["a", "b"]})
    bad = pd.DataFrame({"ssn": ["3", "4"], "name": [1.5, 2.5]})  # object column, not strings
    pol = {
        "label": "t",
        "rules": [{"actions": [{"transform": {"type": "row-redact", "condition": "name == 'x'"}}]}],
    }
    sink = MemorySink()
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.concat(
            [
                dd.from_pandas(good, npartitions=1),
                dd.from_pandas(bad.astype({"name": object}), npartitions=1),
            ]
        )
        out = cape_dask.apply_policy(ddf, pol, audit=sink)
        with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
            cape_dask.compute(out, scheduler="threads")
    assert [r["event"] for r in sink.records] == ["run.started", "run.failed"]
    assert sink.records[-1]["error"]["type"] in {"ArrowInvalid", "ArrowTypeError"}
    assert "1.5" not in sink.records[-1]["error"]["message"]


def test_run_refuses_a_frame_not_from_apply_policy() -> None:
    out = cape_dask.apply_policy(dd.from_pandas(people(), npartitions=2), DROP_SSN)
    with pytest.raises(TypeError, match=r"frame returned by cape_pipelines\.dask\.apply_policy"):
        cape_dask.compute(out[["name"]])


def test_token_is_stable_and_follows_keys_without_showing_them() -> None:
    ddf = dd.from_pandas(people(), npartitions=2)
    pol = {
        "label": "t",
        "rules": [
            {
                "match": {"name": "score"},
                "actions": [
                    {
                        "transform": {
                            "type": "numeric-perturbation",
                            "min": -1,
                            "max": 1,
                            "key": {"secret": "noise"},
                        }
                    }
                ],
            }
        ],
    }
    a = cape_dask.apply_policy(ddf, pol, keys=NOISE)
    b = cape_dask.apply_policy(ddf, pol, keys=NOISE)
    c = cape_dask.apply_policy(ddf, pol, keys={"noise": b"m" * 32})
    assert a._name == b._name
    assert a._name != c._name  # different key, different output: never the same task
    assert b"n" * 4 not in a._name.encode()
    assert cape_dask.apply_policy(ddf, DROP_SSN)._name != a._name


def test_plan_task_pickles_with_its_keys_and_hides_them_in_repr() -> None:
    plan = cape_pipelines.build_plan(
        {
            "label": "t",
            "rules": [
                {
                    "match": {"name": "x"},
                    "actions": [
                        {
                            "transform": {
                                "type": "numeric-perturbation",
                                "min": -1,
                                "max": 1,
                                "key": {"secret": "noise"},
                            }
                        }
                    ],
                }
            ],
        },
        pa.schema([("x", pa.float64())]),
        keys=NOISE,
    )
    task = dask_apply.PlanTask(plan, object)
    again = pickle.loads(pickle.dumps(task))
    assert again.fingerprint == task.fingerprint
    assert "nnnn" not in repr(task)


def test_empty_partitions_and_all_rows_removed() -> None:
    ddf = dd.from_pandas(people(), npartitions=4)
    ddf = ddf[ddf.score > 100]  # every partition empty
    pol = {
        "label": "t",
        "rules": [{"actions": [{"transform": {"type": "row-redact", "condition": "age > 0"}}]}],
    }
    sink = MemorySink()
    result = cape_dask.compute(cape_dask.apply_policy(ddf, pol, audit=sink))
    assert len(result) == 0
    assert list(result.columns) == ["name", "age", "ssn", "score"]
    assert sink.records[-1]["rows_in"] == 0


def test_object_string_columns_without_pyarrow_strings() -> None:
    import dask

    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(people(), npartitions=2)
        assert ddf.dtypes["name"] == np.dtype(object)
        pol = {
            "label": "t",
            "rules": [
                {"actions": [{"transform": {"type": "row-redact", "condition": "name == 'p1'"}}]}
            ],
        }
        result = cape_dask.compute(cape_dask.apply_policy(ddf, pol), scheduler="threads")
    assert "p1" not in set(result["name"]) and len(result) == 7


def test_accessors_delegate() -> None:
    df = people()
    ddf = dd.from_pandas(df, npartitions=2)
    lazy = ddf.cape.apply(ADULTS, audit=MemorySink())
    assert isinstance(lazy, dd.DataFrame)
    assert lazy._name == cape_dask.apply_policy(ddf, ADULTS)._name
    # The same rows as Dask holds them (its strings are string[pyarrow]).
    eager = ddf.compute().cape.apply(ADULTS, audit=MemorySink())
    pd.testing.assert_frame_equal(eager, cape_dask.compute(lazy, scheduler="threads"))
    pd.testing.assert_frame_equal(df, people())  # the input is untouched


def test_distributed_run_is_audited(dask_client: Any) -> None:
    sink = MemorySink()
    out = cape_dask.apply_policy(dd.from_pandas(people(), npartitions=3), ADULTS, audit=sink)
    result = cape_dask.compute(out, scheduler=dask_client)
    assert list(result.index) == [102, 104, 105, 106, 107]
    assert (sink.records[-1]["rows_in"], sink.records[-1]["rows_out"]) == (8, 5)


# -- bad input: every error at apply_policy, before anything is computed ----------------------

BAD: list[tuple[str, dict[str, Any], dict[str, bytes] | None, type[Exception], str]] = [
    (
        # A rule names a column the frame does not have.
        "missing-column",
        {"label": "t", "rules": [{"match": {"name": "email"}, "actions": ["drop"]}]},
        None,
        PlanError,
        "'email'.*not in the data",
    ),
    (
        # Perturbing a string column.
        "wrong-type",
        {
            "label": "t",
            "rules": [
                {
                    "match": {"name": "name"},
                    "actions": [
                        {
                            "transform": {
                                "type": "numeric-perturbation",
                                "min": -1,
                                "max": 1,
                                "seed": 1,
                            }
                        }
                    ],
                }
            ],
        },
        None,
        PlanError,
        "column 'name'.*numeric-perturbation",
    ),
    (
        # A key no provider has: named in the error, found at construction, not in a worker.
        "missing-key",
        {
            "label": "t",
            "rules": [
                {
                    "match": {"name": "score"},
                    "actions": [
                        {
                            "transform": {
                                "type": "numeric-perturbation",
                                "min": -1,
                                "max": 1,
                                "key": {"secret": "nobody-has-this"},
                            }
                        }
                    ],
                }
            ],
        },
        {},
        KeyMissingError,
        "'nobody-has-this' not found",
    ),
    (
        "drops-every-column",
        {"label": "t", "rules": [{"match": {"regex": ".*"}, "actions": ["drop"]}]},
        None,
        PlanError,
        "drops every column",
    ),
]


@pytest.mark.parametrize(
    ("policy", "keys", "error", "match"), [pytest.param(*b[1:], id=b[0]) for b in BAD]
)
def test_bad_input_fails_at_apply_policy(
    policy: dict[str, Any], keys: Any, error: type[Exception], match: str, calls: list[int]
) -> None:
    ddf = dd.from_pandas(people(), npartitions=2)
    with pytest.raises(error, match=match):
        cape_dask.apply_policy(ddf, policy, keys=keys)
    assert calls == []  # nothing ran, not even the meta


def test_apply_policy_takes_only_dask_frames() -> None:
    with pytest.raises(TypeError, match=r"for pandas use cape_pipelines\.apply_policy"):
        cape_dask.apply_policy(people(), DROP_SSN)  # type: ignore[arg-type]
