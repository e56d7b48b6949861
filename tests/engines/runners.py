"""Every engine as one function: ``(policy dict, input table, keys) -> output table``.

``RUNNERS`` holds pyarrow, pandas and Dask (threaded scheduler, and a
``distributed.LocalCluster`` with two worker processes), plus the Beam and
Spark runners from ``runner_beam.py`` / ``runner_spark.py`` when those modules
exist and their engine is installed.

Row order is kept by every engine here (pandas and Dask keep the partition
order and each partition's row order) and is compared as is: no runner sorts.
An engine whose runner cannot restore the input order lists its names in
``UNORDERED``; the parity test then compares rows as a multiset. Engines that
hand their result over as pandas list their names in ``VIA_PANDAS``; their
output and the expectation both go through the one dtype round trip
:func:`normalise`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest

import cape_pipelines
from cape_pipelines.audit import MemorySink

Runner = Callable[[Mapping[str, Any], pa.Table, Mapping[str, bytes] | None], pa.Table]

DASK_PARTITIONS = 3


# -- the pandas dtype round trip, defined once ----------------------------------------------


def to_pandas(table: pa.Table) -> pd.DataFrame:
    """An Arrow table as the pandas frame a user would have, keeping every Arrow type.

    Strings: ``string[pyarrow]`` (Dask's default; keeps its type when empty or
    all null). Integers and booleans: numpy without nulls, pandas' nullable
    dtypes with nulls. Floats and timestamps: numpy (unit and zone kept).
    Dates and decimals, which pandas has no exact native dtype for: ``ArrowDtype``.
    """
    columns = {}
    for name, col in zip(table.column_names, table.columns, strict=True):
        t = col.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            dtype: Any = pd.StringDtype("pyarrow")
        elif pa.types.is_boolean(t) and col.null_count:
            dtype = pd.BooleanDtype()
        elif pa.types.is_integer(t) and col.null_count:
            dtype = pd.api.types.pandas_dtype(str(t).replace("uint", "UInt").replace("int", "Int"))
        elif pa.types.is_date(t) or pa.types.is_decimal(t):
            dtype = pd.ArrowDtype(t)
        else:
            dtype = None
        if dtype is None:
            columns[name] = col.to_pandas()
        else:
            columns[name] = pd.Series(dtype.__from_arrow__(col), copy=False)
    return pd.DataFrame(columns, index=pd.RangeIndex(table.num_rows))


def from_pandas(df: pd.DataFrame) -> pa.Table:
    """A pandas result as Arrow; ``large_string`` read as ``string`` (pandas cannot tell them)."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    fields = [
        f.with_type(pa.string()) if pa.types.is_large_string(f.type) else f for f in table.schema
    ]
    return table.cast(pa.schema(fields).remove_metadata()).replace_schema_metadata(None)


def normalise(table: pa.Table) -> pa.Table:
    """The expectation as a pandas-based engine can give it: one round trip through pandas."""
    return from_pandas(to_pandas(table))


# -- runners ---------------------------------------------------------------------------------


def run_pyarrow(policy: Mapping[str, Any], table: pa.Table, keys: Any = None) -> pa.Table:
    """``cape_pipelines.apply_policy`` on a pyarrow Table."""
    return cape_pipelines.apply_policy(dict(policy), table, keys=keys, audit=MemorySink())


def run_pandas(policy: Mapping[str, Any], table: pa.Table, keys: Any = None) -> pa.Table:
    """``cape_pipelines.apply_policy`` on a pandas DataFrame; the index must follow the rows."""
    df = to_pandas(table)
    out = cape_pipelines.apply_policy(dict(policy), df, keys=keys, audit=MemorySink())
    _check_index(df, out)
    return from_pandas(out)


def dask_frame(df: pd.DataFrame, npartitions: int = DASK_PARTITIONS) -> Any:
    """``df`` split into ``npartitions`` partitions, with an empty partition in the middle."""
    import dask.dataframe as dd

    half = len(df) // 2
    return dd.concat(
        [
            dd.from_pandas(df.iloc[:half], npartitions=max(1, npartitions // 2), sort=False),
            dd.from_pandas(df.iloc[:0], npartitions=1, sort=False),
            dd.from_pandas(
                df.iloc[half:], npartitions=max(1, npartitions - npartitions // 2), sort=False
            ),
        ]
    )


def _run_dask(policy: Mapping[str, Any], table: pa.Table, keys: Any, scheduler: Any) -> pa.Table:
    import cape_pipelines.dask as cape_dask

    df = to_pandas(table)
    sink = MemorySink()
    out = cape_dask.apply_policy(dask_frame(df), dict(policy), keys=keys, audit=sink)
    result = cape_dask.compute(out, scheduler=scheduler)
    # The lazy frame's meta must describe what the partitions really are.
    assert list(result.columns) == list(out.columns)
    assert dict(result.dtypes) == dict(out.dtypes), (dict(result.dtypes), dict(out.dtypes))
    _check_index(df, result)
    done = sink.records[-1]
    assert done["event"] == "run.completed"
    assert (done["rows_in"], done["rows_out"]) == (len(df), len(result))
    return from_pandas(result)


def run_dask_threads(policy: Mapping[str, Any], table: pa.Table, keys: Any = None) -> pa.Table:
    """Dask, threaded scheduler."""
    return _run_dask(policy, table, keys, "threads")


_CLUSTER: dict[str, Any] = {}


def distributed_client() -> Any:
    """The session's ``LocalCluster`` (2 worker processes) client; closed by conftest."""
    if "client" not in _CLUSTER:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        )
        _CLUSTER["cluster"] = cluster
        _CLUSTER["client"] = Client(cluster, set_as_default=False)
    return _CLUSTER["client"]


def close_distributed() -> None:
    """Close the cluster if this session started one."""
    client = _CLUSTER.pop("client", None)
    cluster = _CLUSTER.pop("cluster", None)
    if client is not None:
        client.close()
    if cluster is not None:
        cluster.close()


def run_dask_distributed(policy: Mapping[str, Any], table: pa.Table, keys: Any = None) -> pa.Table:
    """Dask on ``distributed.LocalCluster`` with two worker processes (the plan is pickled)."""
    return _run_dask(policy, table, keys, distributed_client())


def _check_index(df: pd.DataFrame, out: pd.DataFrame) -> None:
    """Kept rows keep their index labels, in input order."""
    labels = list(out.index)
    assert labels == sorted(labels) and set(labels) <= set(df.index), labels


RUNNERS: dict[str, Runner] = {"pyarrow": run_pyarrow, "pandas": run_pandas}
# Engines whose extra is not installed, with why: each still gets a runner, which
# skips visibly (a SKIPPED line per test) instead of the parity suite shrinking
# in silence. CI installs every extra and sets CAPE_REQUIRE_ALL_ENGINES=1, which
# turns a missing engine into a failure.
MISSING: dict[str, str] = {}
REQUIRE_ALL_ENGINES = os.environ.get("CAPE_REQUIRE_ALL_ENGINES", "") not in ("", "0")


def _missing_runner(name: str, reason: str) -> Runner:
    def run(policy: Mapping[str, Any], table: pa.Table, keys: Any = None) -> pa.Table:
        if REQUIRE_ALL_ENGINES:
            pytest.fail(f"engine {name}: {reason}, and CAPE_REQUIRE_ALL_ENGINES is set")
        pytest.skip(f"engine {name}: {reason}")

    return run


def _register_missing(names: Sequence[str], package: str, extra: str) -> None:
    reason = f"{package} is not installed (pip install 'cape-pipelines[{extra}]')"
    for name in names:
        MISSING[name] = reason
        RUNNERS[name] = _missing_runner(name, reason)


VIA_PANDAS: set[str] = {"pandas"}
UNORDERED: set[str] = set()
# Engines that hold timestamps in microseconds (Spark): their expectation is the
# case's expectation for the input floored to the microsecond at the boundary.
MICROS_ONLY: set[str] = set()
MARKS: dict[str, str] = {}

VIA_PANDAS |= {"dask-threads", "dask-distributed"}
MARKS.update({"dask-threads": "dask", "dask-distributed": "dask"})
if importlib.util.find_spec("dask") is not None:
    RUNNERS["dask-threads"] = run_dask_threads
    RUNNERS["dask-distributed"] = run_dask_distributed
else:
    _register_missing(["dask-threads", "dask-distributed"], "dask", "dask")


def _load_engine_runners(
    module: str, engine_package: str, marker: str, names: Sequence[str]
) -> None:
    """Add another engine's runners; ``names`` skip (or fail in CI) if it is not installed."""
    here = pathlib.Path(__file__).parent
    if importlib.util.find_spec(engine_package) is None:
        _register_missing(names, engine_package, marker)
        MARKS.update(dict.fromkeys(names, marker))
        return
    if str(here) not in sys.path:
        sys.path.insert(0, str(here))
    mod = importlib.import_module(module)
    for name, runner in mod.RUNNERS.items():
        RUNNERS[name] = runner
        MARKS[name] = marker
    VIA_PANDAS.update(getattr(mod, "VIA_PANDAS", ()))
    UNORDERED.update(getattr(mod, "UNORDERED", ()))
    MICROS_ONLY.update(getattr(mod, "MICROS_ONLY", ()))


_load_engine_runners("runner_beam", "apache_beam", "beam", ["beam-inprocess", "beam-multiprocess"])
_load_engine_runners("runner_spark", "pyspark", "spark", ["spark"])
