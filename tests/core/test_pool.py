"""The forked worker pool (``cape_pipelines.pool``) and ``apply_policy(df, workers=N)``.

Order, the bounded window (the memory bound: never more than ``window``
items read ahead of what was handed back), errors raised again in the parent,
and the pandas frame cut into slices giving exactly the ``workers=1`` frame,
index and audit counts.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import signal
import socket
import sys
import threading
import time

import numpy as np
import pandas as pd
import pandas.testing as pdt
import pyarrow as pa
import pytest

from cape_pipelines.audit import MemorySink
from cape_pipelines.errors import TransformError
from cape_pipelines.pandas import apply_policy
from cape_pipelines.pool import _HAVE_MEMFD, _pack, _unpack_shared, ordered_map

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fork")


def _square_with_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def test_results_in_order_from_several_processes() -> None:
    got = list(ordered_map(_square_with_pid, range(40), 3))
    assert [v for v, _ in got] == [x * x for x in range(40)]
    pids = {p for _, p in got}
    assert os.getpid() not in pids and len(pids) == 3


def test_one_item_or_one_worker_runs_here() -> None:
    assert list(ordered_map(_square_with_pid, [3], 4)) == [(9, os.getpid())]
    assert {p for _, p in ordered_map(_square_with_pid, range(5), 1)} == {os.getpid()}
    assert list(ordered_map(_square_with_pid, [], 4)) == []


def test_no_more_than_the_window_is_read_ahead() -> None:
    pulled = 0

    def items():
        nonlocal pulled
        for i in range(30):
            pulled += 1
            yield i

    ahead = []
    for k, _ in enumerate(ordered_map(_square_with_pid, items(), 2, window=3)):
        ahead.append(pulled - k)
    assert max(ahead) <= 3 + 1  # the window, plus the item just read


def _fail_on_seven(x: int) -> int:
    if x == 7:
        raise TransformError("bad value at row 7")
    return x


def test_a_worker_error_is_raised_in_the_parent_after_the_results_before_it() -> None:
    seen = []
    with pytest.raises(TransformError, match="bad value at row 7"):
        for v in ordered_map(_fail_on_seven, range(20), 2):
            seen.append(v)
    assert seen == list(range(7))


@pytest.mark.parametrize("good", [1, 2, 5, 9])
def test_items_read_before_a_read_error_come_back_first(good: int) -> None:
    def items():
        yield from range(good)
        raise OSError("input file truncated")

    seen = []
    with pytest.raises(OSError, match="truncated"):
        for v, _ in ordered_map(_square_with_pid, items(), 2):
            seen.append(v)
    assert seen == [x * x for x in range(good)]


class _Unpicklable(Exception):
    def __init__(self, a: int, b: int):
        super().__init__(f"{a}/{b}")
        # A lock cannot be pickled, whatever pickling support for exceptions is installed
        # (dask's tblib makes plain exceptions picklable).
        self.lock = threading.Lock()


def _raise_unpicklable(x: int) -> int:
    raise _Unpicklable(x, 2)


def test_an_error_that_cannot_be_pickled_still_arrives() -> None:
    with pytest.raises(Exception, match="_Unpicklable: 0/2"):
        list(ordered_map(_raise_unpicklable, range(4), 2))


_CTRL_C_AT_FORK = {"on": False}


def _ctrl_c_in_the_parent_after_fork() -> None:
    if _CTRL_C_AT_FORK["on"]:
        _CTRL_C_AT_FORK["on"] = False
        os.kill(os.getpid(), signal.SIGINT)


# Registered once for the whole test process; it acts only when a test switches it on.
os.register_at_fork(after_in_parent=_ctrl_c_in_the_parent_after_fork)


def _slow(x: int) -> int:
    time.sleep(0.05)
    return x


def test_ctrl_c_landing_while_a_worker_is_forked_is_not_lost() -> None:
    # Python ignores exceptions raised in its at-fork handlers (logging has one): a
    # Ctrl-C delivered there used to vanish and the run went on to the end.
    before = set(mp.active_children())
    # Ctrl-C raising KeyboardInterrupt, as in a cape command (another test may have changed it).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    _CTRL_C_AT_FORK["on"] = True
    got = []
    try:
        with pytest.raises(KeyboardInterrupt):
            for v in ordered_map(_slow, range(200), 2):
                got.append(v)
    finally:
        _CTRL_C_AT_FORK["on"] = False
        signal.signal(signal.SIGINT, previous)
    assert len(got) < 200
    assert set(mp.active_children()) <= before  # the workers were stopped


def _big_batch(x: int) -> tuple[int, pa.RecordBatch]:
    # 2 MiB of values per result: above the size that goes through the pipe.
    return x, pa.record_batch({"v": pa.array(np.full(1 << 18, x, dtype=np.int64))})


def _memfd_mappings() -> int:
    with open("/proc/self/maps") as fh:
        return sum("memfd:cape-result" in line for line in fh)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not _HAVE_MEMFD, reason="memfd_create (Linux)")
def test_large_results_are_read_in_place_from_shared_memory_and_leave_nothing() -> None:
    gc.collect()  # pools of earlier tests may still hold descriptors until collected
    fds = _open_fds()
    got = list(ordered_map(_big_batch, range(6), 2))
    assert [x for x, _ in got] == list(range(6))
    for x, batch in got:
        assert batch.column(0).to_numpy().tolist() == [x] * (1 << 18)
    # Not copied out of a pipe: the values sit in the workers' memfds, mapped here.
    assert _memfd_mappings() == 6
    del got, batch
    gc.collect()
    # The memory, and the descriptor each mapping keeps, go with the last buffer using it.
    assert _memfd_mappings() == 0
    assert _open_fds() == fds


@pytest.mark.skipif(not _HAVE_MEMFD, reason="memfd_create (Linux)")
def test_small_results_and_odd_objects_still_go_through_the_pipe() -> None:
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with here, there:
        assert _pack((1, "a"), there) == ("ok", (1, "a"))
        assert _pack(pa.array([1, 2, 3]), there)[0] == "ok"  # below the threshold
        status, value = _pack(_big_batch(3), there)
        assert status == "shared"
        x, batch = _unpack_shared(value, here)
        assert x == 3 and batch.equals(_big_batch(3)[1])
        del batch
    assert _pack(_big_batch(3), None)[0] == "ok"  # no channel: the pipe, as before


KEY = bytes(range(1, 33))
POLICY = {
    "label": "workers",
    "rules": [
        {
            "match": {"name": "email"},
            "actions": [{"transform": {"type": "tokenizer", "key": {"secret": "k"}}}],
        },
        {
            "match": {"name": "score"},
            "actions": [{"transform": {"type": "numeric-rounding", "precision": 1}}],
        },
        {"match": {"name": "ssn"}, "actions": ["drop"]},
        {"actions": [{"transform": {"type": "row-redact", "condition": "age < 18"}}]},
    ],
}


def _frame(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    return pd.DataFrame(
        {
            "email": [f"u{i % 7919}@x.org" if i % 13 else None for i in range(n)],
            "age": rng.integers(0, 90, n),
            "ssn": [f"{i:09d}" for i in range(n)],
            "score": rng.normal(0, 10, n),
            "note": pd.Categorical(rng.choice(["a", "b"], n)),
        },
        index=pd.Index(np.arange(n)[::-1] * 2, name="row"),
    )


@pytest.mark.parametrize("string_dtype", [None, "string[pyarrow]"])
def test_pandas_workers_give_the_one_process_frame(string_dtype: str | None) -> None:
    df = _frame(100_000)
    before = df.copy(deep=True)
    sinks = [MemorySink(), MemorySink()]
    one = apply_policy(
        POLICY, df, keys={"k": KEY}, audit=sinks[0], workers=1, string_dtype=string_dtype
    )
    two = apply_policy(
        POLICY, df, keys={"k": KEY}, audit=sinks[1], workers=2, string_dtype=string_dtype
    )
    pdt.assert_frame_equal(two, one)
    pdt.assert_frame_equal(df, before)
    assert two.index.name == "row" and len(two) == int((df["age"] >= 18).sum())
    done = [s.records[-1] for s in sinks]
    for key in ("rows_in", "rows_out", "rows_redacted", "columns"):
        assert done[0][key] == done[1][key]
    assert done[1]["rows_in"] == 100_000


def test_pandas_workers_give_the_one_process_dtypes_for_every_kind_of_column() -> None:
    # Each slice's columns are converted as the slice arrives and joined at the end:
    # the joined columns must have the very dtypes (and values) of one conversion.
    n = 70_000
    rng = np.random.default_rng(5)
    emails = [f"u{i % 50_000}@x.org" if i % 11 else None for i in range(n)]
    df = pd.DataFrame(
        {
            "email": emails,
            "email_py": pd.array(emails, dtype="string[python]"),
            "email_arrow": pd.array(emails, dtype=pd.ArrowDtype(pa.large_string())),
            "score": pd.array([None if i % 7 == 0 else i for i in range(n)], dtype="Int64"),
            "when": pd.date_range("2024-01-01", periods=n, freq="min", tz="UTC"),
            "age": rng.integers(0, 90, n),
        }
    )
    tokenize = {"type": "tokenizer", "key": {"secret": "k"}}
    policy = {
        "label": "kinds",
        "rules": [
            *(
                {"match": {"name": c}, "actions": [{"transform": tokenize}]}
                for c in ("email", "email_py", "email_arrow")
            ),
            {
                "match": {"name": "score"},
                "actions": [{"transform": {"type": "numeric-rounding", "precision": -1}}],
            },
            {"actions": [{"transform": {"type": "row-redact", "condition": "age < 18"}}]},
        ],
    }
    one = apply_policy(policy, df, keys={"k": KEY}, audit=MemorySink(), workers=1)
    two = apply_policy(policy, df, keys={"k": KEY}, audit=MemorySink(), workers=2)
    pdt.assert_frame_equal(two, one)
    assert list(two.dtypes) == list(one.dtypes)


def test_pandas_workers_share_string_objects_as_one_process_does() -> None:
    # Equal tokens of a few-distinct column share one Python object (the conversion
    # deduplicates them over the whole column): the frame pickles to the same bytes.
    n = 70_000
    df = pd.DataFrame(
        {
            "email": [f"u{i % 300}@x.org" for i in range(n)],
            "email_py": pd.array([f"u{i % 300}@x.org" for i in range(n)], dtype="string[python]"),
        }
    )
    tokenize = {"type": "tokenizer", "key": {"secret": "k"}}
    policy = {
        "label": "shared",
        "rules": [{"match": {"name": c}, "actions": [{"transform": tokenize}]} for c in df.columns],
    }
    one = apply_policy(policy, df, keys={"k": KEY}, audit=MemorySink(), workers=1)
    two = apply_policy(policy, df, keys={"k": KEY}, audit=MemorySink(), workers=2)
    assert pickle.dumps(two) == pickle.dumps(one)


def test_pandas_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="workers must be at least 1"):
        apply_policy(POLICY, _frame(3), keys={"k": KEY}, audit=MemorySink(), workers=0)
