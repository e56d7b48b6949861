"""The pandas path's conversions: types read from dtypes, each column converted once, string dtypes.

``apply_policy(policy, df)`` learns a frame's Arrow types from its dtypes and
converts only ``object`` columns (whose dtype says nothing) to learn theirs,
keeping that conversion for the apply itself; these tests pin that the
schema is the one pyarrow's own inference gives, that an object column goes
through Arrow once, and what ``string_dtype`` hands back.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import hmac
from typing import Any

import numpy as np
import pandas as pd
import pandas.testing as pdt
import pyarrow as pa
import pytest

from cape_pipelines.audit import MemorySink
from cape_pipelines.pandas import apply_policy, pandas_schema

KEY = bytes(range(1, 33))
TOKENIZE = {
    "label": "t",
    "rules": [
        {
            "match": {"name": "email"},
            "actions": [{"transform": {"type": "tokenizer", "key": {"secret": "k"}}}],
        }
    ],
}


def token(value: str) -> str:
    return hmac.new(KEY, value.encode(), hashlib.sha256).hexdigest()


def every_dtype() -> pd.DataFrame:
    n = 4
    return pd.DataFrame(
        {
            "i8": np.arange(n, dtype="int8"),
            "u64": np.arange(n, dtype="uint64"),
            "f16": np.arange(n, dtype="float16"),
            "f64": np.linspace(0, 1, n),
            "flag": np.array([True, False, True, False]),
            "ts": pd.date_range("2020-01-01", periods=n, freq="D"),
            "ts_s": pd.date_range("2020-01-01", periods=n, freq="D").astype("datetime64[s]"),
            "tz": pd.date_range("2020-01-01", periods=n, freq="h", tz="Europe/Paris"),
            "span": pd.to_timedelta(np.arange(n), unit="s"),
            "nullable": pd.array([1, None, 3, 4], "Int64"),
            "bools": pd.array([True, None, False, True], "boolean"),
            "floats": pd.array([1.5, None, 2.5, 3.5], "Float32"),
            "cat": pd.Categorical(list("abca")),
            "ordered": pd.Categorical(list("abca"), ordered=True),
            "text": pd.array(["a", None, "c", "d"], "string[pyarrow]"),
            "arrow": pd.array([1, 2, None, 4], pd.ArrowDtype(pa.int16())),
            "arrow_date": pd.array(
                [dt.date(2020, 1, d) for d in range(1, n + 1)], pd.ArrowDtype(pa.date32())
            ),
            "obj_str": ["x", None, "z", "w"],
            "obj_none": [None] * n,
            "obj_bytes": [b"a", b"b", None, b"d"],
            "obj_dec": [decimal.Decimal("1.5"), None, decimal.Decimal("2.25"), None],
            "obj_date": [dt.date(2020, 1, d) for d in range(1, n + 1)],
        }
    )


def reference_schema(df: pd.DataFrame) -> pa.Schema:
    """The schema as pyarrow infers it column by column (the former implementation)."""
    fields = []
    for name in df.columns:
        field = pa.Schema.from_pandas(df[[name]], preserve_index=False).field(name)
        if isinstance(df[name].dtype, pd.StringDtype):
            field = field.with_type(pa.string())
        elif pa.types.is_null(field.type) and df[name].dtype == np.dtype(object):
            field = field.with_type(pa.string())
        fields.append(field)
    return pa.schema(fields)


def test_schema_from_dtypes_equals_pyarrow_inference() -> None:
    df = every_dtype()
    assert pandas_schema(df) == reference_schema(df)
    empty = df.iloc[:0]
    assert pandas_schema(empty) == reference_schema(empty)


def test_object_column_is_converted_to_arrow_once(monkeypatch: pytest.MonkeyPatch) -> None:
    df = pd.DataFrame({"email": [f"u{i}@x.org" for i in range(50)], "n": np.arange(50)})
    real = pa.array
    seen: list[Any] = []

    def counting(obj: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(obj, pd.Series | np.ndarray) and len(obj) == 50 and obj.dtype == object:
            seen.append(obj)
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(pa, "array", counting)
    out = apply_policy(TOKENIZE, df, keys={"k": KEY}, audit=MemorySink())
    monkeypatch.undo()
    assert len(seen) == 1
    assert list(out["email"]) == [token(v) for v in df["email"]]


@pytest.mark.parametrize("distinct", [1.0, 0.05])
def test_object_strings_come_back_as_object_whatever_the_cardinality(distinct: float) -> None:
    n = 10_000
    values = [f"user{i % max(1, int(n * distinct))}@example.org" for i in range(n)]
    df = pd.DataFrame({"email": values}, index=np.arange(n) * 3)
    before = df.copy(deep=True)
    out = apply_policy(TOKENIZE, df, keys={"k": KEY}, audit=MemorySink())
    assert out["email"].dtype == np.dtype(object)
    pdt.assert_index_equal(out.index, df.index)
    pdt.assert_frame_equal(df, before)
    assert list(out["email"]) == [token(v) for v in values]
    if distinct < 0.5:
        # Few distinct tokens: equal tokens share one Python object (memory).
        first = out["email"].iloc[0]
        again = out["email"].iloc[int(n * distinct)]
        assert first == again and first is again


def test_string_dtype_pyarrow_hands_back_arrow_backed_strings() -> None:
    df = pd.DataFrame({"email": ["a@x", None, "b@x"], "n": [1, 2, 3]}, index=[5, 6, 7])
    out = apply_policy(
        TOKENIZE, df, keys={"k": KEY}, audit=MemorySink(), string_dtype="string[pyarrow]"
    )
    assert out["email"].dtype == pd.StringDtype("pyarrow")
    assert out["n"].dtype == np.dtype("int64")
    assert out["email"].tolist() == [token("a@x"), pd.NA, token("b@x")]
    pdt.assert_index_equal(out.index, df.index)
    # Same values as the default object column.
    default = apply_policy(TOKENIZE, df, keys={"k": KEY}, audit=MemorySink())
    assert default["email"].dtype == np.dtype(object)
    pdt.assert_series_equal(
        out["email"].astype(object).fillna(np.nan), default["email"].fillna(np.nan)
    )


def test_string_dtype_object_turns_arrow_strings_into_objects() -> None:
    df = pd.DataFrame({"email": pd.array(["a@x", "b@x"], "string[pyarrow]")})
    kept = apply_policy(TOKENIZE, df, keys={"k": KEY}, audit=MemorySink())
    assert kept["email"].dtype == pd.StringDtype("pyarrow")
    out = apply_policy(TOKENIZE, df, keys={"k": KEY}, audit=MemorySink(), string_dtype="object")
    assert out["email"].dtype == np.dtype(object)
    assert list(out["email"]) == [token("a@x"), token("b@x")]


def test_string_dtype_rejects_other_names() -> None:
    df = pd.DataFrame({"email": ["a"]})
    with pytest.raises(ValueError, match="string_dtype must be"):
        apply_policy(TOKENIZE, df, keys={"k": KEY}, audit=MemorySink(), string_dtype="str")
