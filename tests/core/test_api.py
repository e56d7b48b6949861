"""apply_policy on pandas and pyarrow: same type back, index kept, input untouched, clear errors."""

from __future__ import annotations

import hashlib
import hmac
import json

import _core_test_transforms  # noqa: F401  (registers test-suffix, plusN, test-keyed)
import numpy as np
import pandas as pd
import pandas.testing as pdt
import pyarrow as pa
import pytest

from cape_pipelines import KeyMissingError, PlanError, apply_policy
from cape_pipelines.audit import MemorySink
from cape_pipelines.errors import DataError

KEY = bytes(range(1, 33))


def digest(value: str, key: bytes = KEY) -> str:
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


def frame(n: int = 10) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "name": [f"n{i}" for i in range(n)],
            "email": [f"u{i}@x.org" for i in range(n)],
            "age": np.arange(n, dtype="int64") * 7 % 60,
            "ssn": [f"{i:03d}" for i in range(n)],
            "score": np.linspace(0, 1, n),
            "when": pd.date_range("2020-01-01", periods=n, freq="D"),
        }
    )


POLICY = {
    "label": "api",
    "rules": [
        {
            "match": {"name": "email"},
            "actions": [{"transform": {"type": "test-keyed", "key": {"secret": "k"}}}],
        },
        {"match": {"name": "ssn"}, "actions": ["drop"]},
        {"actions": [{"transform": {"type": "row-redact", "condition": "age < 18"}}]},
        {
            "match": {"name": "name"},
            "actions": [{"transform": {"type": "test-suffix", "suffix": "*"}}],
        },
    ],
}


def expected_pandas(df: pd.DataFrame) -> pd.DataFrame:
    kept = df[~(df["age"] < 18)]
    out = kept.drop(columns=["ssn"]).copy()
    out["email"] = [digest(v) for v in kept["email"]]
    out["name"] = [v + "*" for v in kept["name"]]
    return out


def test_pandas_result_and_input_untouched() -> None:
    df = frame(20)
    before = df.copy(deep=True)
    dtypes = df.dtypes.copy()
    out = apply_policy(POLICY, df, keys={"k": KEY}, audit=MemorySink())
    assert isinstance(out, pd.DataFrame)
    pdt.assert_frame_equal(out, expected_pandas(before))
    pdt.assert_frame_equal(df, before)  # not mutated, values or dtypes
    pdt.assert_series_equal(df.dtypes, dtypes)


def test_pandas_keeps_a_sliced_index() -> None:
    df = frame(12_000)
    part = df.iloc[5000:10000]
    out = apply_policy(POLICY, part, keys={"k": KEY}, audit=MemorySink())
    assert out.index.min() >= 5000 and out.index.max() < 10000
    pdt.assert_frame_equal(out, expected_pandas(part))
    assert out["email"].notna().all()  # cape-dataframes gave all-NaN columns here


def test_pandas_duplicate_and_string_index() -> None:
    df = frame(6)
    df.index = ["a", "a", "b", "b", "c", "c"]
    out = apply_policy(POLICY, df, keys={"k": KEY}, audit=MemorySink())
    pdt.assert_frame_equal(out, expected_pandas(df))


def test_untouched_columns_keep_dtypes_exactly() -> None:
    df = frame(5).assign(
        cat=pd.Categorical(list("abcab")), nullable=pd.array([1, None, 3, 4, 5], "Int64")
    )
    out = apply_policy(
        {"label": "x", "rules": [{"match": {"name": "ssn"}, "actions": ["drop"]}]},
        df,
        audit=MemorySink(),
    )
    pdt.assert_series_equal(out.dtypes, df.drop(columns=["ssn"]).dtypes)
    pdt.assert_frame_equal(out, df.drop(columns=["ssn"]))


@pytest.mark.parametrize("kind", ["table", "batch", "chunked"])
def test_pyarrow_same_type_back(kind: str) -> None:
    df = frame(30)
    table = pa.Table.from_pandas(df, preserve_index=False)
    if kind == "batch":
        data = table.combine_chunks().to_batches()[0]
    elif kind == "chunked":
        data = pa.concat_tables([table.slice(0, 7), table.slice(7, 13), table.slice(20)])
    else:
        data = table
    out = apply_policy(POLICY, data, keys={"k": KEY}, audit=MemorySink())
    assert type(out) is type(data)
    got = (pa.Table.from_batches([out]) if kind == "batch" else out).to_pandas()
    want = expected_pandas(df).reset_index(drop=True)
    pdt.assert_frame_equal(got, want, check_dtype=False)
    assert out.schema.names == ["name", "email", "age", "score", "when"]


def test_table_input_untouched() -> None:
    table = pa.Table.from_pandas(frame(10), preserve_index=False)
    copy = pa.Table.from_batches(table.to_batches())
    apply_policy(POLICY, table, keys={"k": KEY}, audit=MemorySink())
    assert table.equals(copy)


def test_row_redact_removing_every_row() -> None:
    doc = {
        "label": "x",
        "rules": [{"actions": [{"transform": {"type": "row-redact", "condition": "age >= 0"}}]}],
    }
    df = frame(8)
    out = apply_policy(doc, df, audit=MemorySink())
    assert len(out) == 0 and list(out.columns) == list(df.columns)
    pdt.assert_series_equal(out.dtypes, df.dtypes)
    table_out = apply_policy(
        doc, pa.Table.from_pandas(df, preserve_index=False), audit=MemorySink()
    )
    assert table_out.num_rows == 0 and table_out.schema.names == list(df.columns)


def test_null_condition_removes_the_row() -> None:
    df = pd.DataFrame({"age": [10.0, None, 30.0], "x": ["a", "b", "c"]})
    doc = {
        "label": "x",
        "rules": [{"actions": [{"transform": {"type": "row-redact", "condition": "age < 18"}}]}],
    }
    out = apply_policy(doc, df, audit=MemorySink())
    assert out["x"].tolist() == ["c"]
    assert out.index.tolist() == [2]


@pytest.mark.parametrize(
    "make",
    [lambda df: df, lambda df: pa.Table.from_pandas(frame(3), preserve_index=False).slice(0, 0)],
)
def test_empty_input(make) -> None:  # type: ignore[no-untyped-def]
    df = frame(3).iloc[:0]
    out = apply_policy(POLICY, make(df), keys={"k": KEY}, audit=MemorySink())
    assert len(out) == 0
    names = out.columns if isinstance(out, pd.DataFrame) else out.schema.names
    assert list(names) == ["name", "email", "age", "score", "when"]


def test_missing_column_error_and_skip() -> None:
    doc = {"label": "x", "rules": [{"match": {"name": "phone"}, "actions": ["drop"]}]}
    with pytest.raises(PlanError, match=r"rules\[0\]\.match: column\(s\) 'phone' not in the data"):
        apply_policy(doc, frame(3), audit=MemorySink())
    out = apply_policy({**doc, "on_missing_column": "skip"}, frame(3), audit=MemorySink())
    pdt.assert_frame_equal(out, frame(3))


@pytest.mark.parametrize(
    ("mode", "columns"),
    [
        ("keep", ["name", "email", "age", "score", "when"]),
        ("drop", ["name", "email"]),  # 'age' is only read by a row condition: not covered
    ],
)
def test_unmatched_columns(mode: str, columns: list[str]) -> None:
    out = apply_policy(
        {**POLICY, "unmatched_columns": mode}, frame(20), keys={"k": KEY}, audit=MemorySink()
    )
    assert list(out.columns) == columns


def test_unmatched_columns_error() -> None:
    with pytest.raises(PlanError, match=r"no rule covers column\(s\) 'age', 'score', 'when'"):
        apply_policy(
            {**POLICY, "unmatched_columns": "error"}, frame(3), keys={"k": KEY}, audit=MemorySink()
        )


def test_missing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAPE_KEY_K", raising=False)
    sink = MemorySink()
    with pytest.raises(
        KeyMissingError, match=r"key 'k' not found \(tried: keys=, CAPE_KEY_K\)"
    ) as info:
        apply_policy(POLICY, frame(3), audit=sink)
    assert info.value.key_name == "k"
    assert [r["event"] for r in sink.records] == ["run.started", "run.failed"]
    assert sink.records[-1]["error"]["type"] == "KeyMissingError"


@pytest.mark.parametrize("form", ["hex", "base64"])
def test_key_from_environment(monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    import base64

    text = KEY.hex() if form == "hex" else "base64:" + base64.b64encode(KEY).decode()
    monkeypatch.setenv("CAPE_KEY_K", text)
    out = apply_policy(POLICY, frame(20), audit=MemorySink())
    pdt.assert_frame_equal(out, expected_pandas(frame(20)))


def test_explicit_keys_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPE_KEY_K", (b"\x01" * 32).hex())
    out = apply_policy(POLICY, frame(20), keys={"k": KEY}, audit=MemorySink())
    pdt.assert_frame_equal(out, expected_pandas(frame(20)))


def test_wrong_data_type() -> None:
    with pytest.raises(
        TypeError, match="takes a pandas DataFrame or a pyarrow Table/RecordBatch, not list"
    ):
        apply_policy(POLICY, [1, 2], audit=MemorySink())  # type: ignore[type-var]


def test_unconvertible_pandas_column_names_the_column() -> None:
    df = pd.DataFrame({"mixed": [1, "a", 2.5], "ok": [1, 2, 3]})
    with pytest.raises(DataError, match=r"column 'mixed' \(object\) cannot be converted to Arrow"):
        apply_policy(
            {"label": "x", "rules": [{"match": {"name": "ok"}, "actions": ["drop"]}]},
            df,
            audit=MemorySink(),
        )


def test_keys_never_in_audit_records_or_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = b"a-very-secret-inline-passphrase!"
    doc = {
        "label": "x",
        "rules": [
            {
                "match": {"name": "email"},
                "actions": [{"transform": {"type": "test-keyed", "key": secret.decode()}}],
            },
            {
                "match": {"name": "name"},
                "actions": [{"transform": {"type": "test-keyed", "key": {"secret": "k"}}}],
            },
        ],
    }
    sink = MemorySink()
    apply_policy(doc, frame(5), keys={"k": KEY}, audit=sink)
    monkeypatch.delenv("CAPE_KEY_K", raising=False)
    with pytest.raises(KeyMissingError) as info:
        apply_policy(doc, frame(5), audit=sink)
    serialized = json.dumps(sink.records) + str(info.value) + repr(info.value)
    for needle in (secret.decode(), secret.hex(), KEY.hex(), repr(KEY), "YS12ZXJ5"):
        assert needle not in serialized
    completed = [r for r in sink.records if r["event"] == "run.completed"]
    assert completed[0]["rows_in"] == 5 and completed[0]["columns"]["email"]["values"] == 5
