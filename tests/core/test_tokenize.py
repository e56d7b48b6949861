"""tokenizer: published HMAC-SHA256 vectors, cape-python's formula, canonical text, batching.

Expected tokens are computed in the tests from the published definitions
(RFC 4231's vectors written out; ``hmac`` and ``hashlib`` from the standard
library for the formulas), never from the code under test.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import pickle
from decimal import Decimal
from itertools import pairwise

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import cape_pipelines as cape
from cape_pipelines.audit import MemorySink
from cape_pipelines.errors import KeyFormatError
from cape_pipelines.transforms.base import ColumnContext
from cape_pipelines.transforms.tokenize import Tokenizer

KEY = b"tokenizer-test-key-0123456789abc"


def hmac_hex(value: str | bytes, key: bytes = KEY) -> str:
    data = value.encode("utf-8") if isinstance(value, str) else value
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def cape_python_token(value: str, key: bytes) -> str:
    # cape-python's tokenizer: hashlib.sha256(x.encode() + key).hexdigest()
    return hashlib.sha256(value.encode() + key).hexdigest()


def policy(transform: dict, column: str = "x") -> dict:
    return {
        "label": "tok",
        "rules": [{"match": {"name": column}, "actions": [{"transform": transform}]}],
    }


def tokenize(array: pa.Array, key: bytes = KEY, **params) -> list[str | None]:
    """Run the tokenizer end to end through apply_policy on a one-column table."""
    t = {"type": "tokenizer", "key": {"secret": "k"}, **params}
    out = cape.apply_policy(policy(t), pa.table({"x": array}), keys={"k": key}, audit=MemorySink())
    col = out.column("x").combine_chunks()
    col.validate(full=True)
    assert col.type == pa.string()
    return col.to_pylist()


def direct(array: pa.Array, key: bytes = KEY, **params) -> pa.Array:
    """Call the class directly, without a policy."""
    out = Tokenizer(key={"secret": "k"}, **params).apply(array, ColumnContext("x", key=key))
    out.validate(full=True)
    return out


# -- RFC 4231: HMAC-SHA256 test cases 1-7 -------------------------------------------------

RFC4231 = [
    # (key hex, data, HMAC-SHA256 hex, max_token_len)
    pytest.param(
        "0b" * 20,
        b"Hi There",
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
        None,
        id="case-1",
    ),
    # Case 2: a key shorter than the digest.
    pytest.param(
        b"Jefe".hex(),
        b"what do ya want for nothing?",
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
        None,
        id="case-2",
    ),
    # Case 3: key and data together longer than a block; the data is not text.
    pytest.param(
        "aa" * 20,
        b"\xdd" * 50,
        "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
        None,
        id="case-3",
    ),
    # Case 4: a 25-byte key, binary data.
    pytest.param(
        "0102030405060708090a0b0c0d0e0f10111213141516171819",
        b"\xcd" * 50,
        "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
        None,
        id="case-4",
    ),
    # Case 5: output truncated to 128 bits = 32 hex characters.
    pytest.param(
        "0c" * 20,
        b"Test With Truncation",
        "a3b6167473100ee06e0c796c2955552b",
        32,
        id="case-5-truncated",
    ),
    # Case 6: a key longer than the block size (hashed first).
    pytest.param(
        "aa" * 131,
        b"Test Using Larger Than Block-Size Key - Hash Key First",
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
        None,
        id="case-6",
    ),
    # Case 7: key and data both longer than the block size.
    pytest.param(
        "aa" * 131,
        b"This is a test using a larger than block-size key and a larger than block-size data."
        b" The key needs to be hashed before being used by the HMAC algorithm.",
        "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
        None,
        id="case-7",
    ),
]


@pytest.mark.parametrize(("key_hex", "data", "expected", "max_len"), RFC4231)
def test_rfc4231_vectors(key_hex: str, data: bytes, expected: str, max_len: int | None) -> None:
    key = bytes.fromhex(key_hex)
    params = {"max_token_len": max_len} if max_len else {}
    if len(key) < 16:
        # Case 2's key ("Jefe") is below the 16-byte floor: a policy refuses it, the
        # HMAC itself is still checked through a direct call.
        with pytest.raises(KeyFormatError, match=r"4 byte\(s\); keys must be at least 16"):
            tokenize(pa.array([data], pa.binary()), key, **params)
        assert direct(pa.array([data], pa.binary()), key, **params).to_pylist() == [expected]
        return
    # Binary input is hashed as its raw bytes.
    assert tokenize(pa.array([data], pa.binary()), key, **params) == [expected]
    assert direct(pa.array([data], pa.binary()), key, **params).to_pylist() == [expected]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    # Text input is hashed as its UTF-8 bytes: the same token.
    assert tokenize(pa.array([text]), key, **params) == [expected]


# -- cape-python compatibility ------------------------------------------------------------

CAPE_VALUES = [
    "alice@example.com",  # ASCII
    "",  # empty string
    "Zoë Ñúñez",  # Latin-1 range
    "数据隐私",  # CJK
    "\U0001d518\U0001d52b\U0001d526 \U0001f389",  # astral plane (Fraktur letters, emoji)
]


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("my secret passphrase", id="cape-python-plain-string-key"),
        pytest.param(
            {"type": "secret", "value": "c2VjcmV0IGJ5dGVzLCAyNCBvZiB0aGVt"},
            id="cape-python-base64-key",
        ),
    ],
)
def test_cape_sha256_equals_cape_python(key: object) -> None:
    raw = b"my secret passphrase" if isinstance(key, str) else b"secret bytes, 24 of them"
    pol = policy({"type": "tokenizer", "key": key, "algorithm": "cape-sha256"})
    out = cape.apply_policy(pol, pd.DataFrame({"x": CAPE_VALUES}), audit=MemorySink())
    assert out["x"].tolist() == [cape_python_token(v, raw) for v in CAPE_VALUES]


def test_cape_sha256_with_max_token_len_is_a_prefix() -> None:
    got = tokenize(pa.array(CAPE_VALUES), algorithm="cape-sha256", max_token_len=10)
    assert got == [cape_python_token(v, KEY)[:10] for v in CAPE_VALUES]


# -- strings: nulls, empty, unicode, long values ------------------------------------------

MEGABYTE = "ab€" * (1 << 18)  # 1 MiB of UTF-8 (+ 256 KiB): a very long value


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(["a", None, "a", None], id="nulls-pass-through"),
        pytest.param([None, None], id="all-null"),
        pytest.param([], id="empty-array"),
        pytest.param(["", "", "x"], id="empty-strings-are-tokenized"),
        pytest.param(["é", "e\u0301"], id="no-unicode-normalisation"),
        pytest.param(["😀", "\U0001d518", "\U0010fffd"], id="astral-plane"),
        pytest.param(["\x00", "a\x00b"], id="nul-characters"),
        pytest.param([MEGABYTE, MEGABYTE[:-1], None], id="one-mebibyte-strings"),
    ],
)
def test_string_values(values: list[str | None]) -> None:
    expected = [None if v is None else hmac_hex(v) for v in values]
    assert tokenize(pa.array(values, pa.string())) == expected
    assert direct(pa.array(values, pa.large_string())).to_pylist() == expected


@pytest.mark.parametrize(
    ("max_len", "length"),
    [
        (1, 1),  # the smallest allowed
        (10, 10),  # an even cut
        (33, 33),  # an odd cut (half a byte)
        (64, 64),  # the whole digest
        (100, 64),  # longer than the digest: the whole digest
    ],
)
def test_max_token_len_cuts_the_hex(max_len: int, length: int) -> None:
    values = ["a", "b", None, "a"]
    got = tokenize(pa.array(values), max_token_len=max_len)
    assert got == [None if v is None else hmac_hex(v)[:length] for v in values]
    assert all(v is None or len(v) == length for v in got)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"max_token_len": 0}, r"max_token_len"),  # must be >= 1
        ({"max_token_len": "long"}, r"max_token_len"),  # not an int
        ({"algorithm": "md5"}, r"algorithm"),  # unknown algorithm
        ({"key_size": 3}, r"key_size"),  # unknown parameter
    ],
)
def test_bad_parameters_are_policy_errors(params: dict, match: str) -> None:
    with pytest.raises(cape.PolicyError, match=match):
        cape.load_policy(policy({"type": "tokenizer", "key": {"secret": "k"}, **params}))


def test_hmac_and_cape_sha256_differ() -> None:
    a = tokenize(pa.array(["x"]))
    b = tokenize(pa.array(["x"]), algorithm="cape-sha256")
    assert a == [hmac_hex("x")] and b == [cape_python_token("x", KEY)] and a != b


# -- canonical text of non-string values --------------------------------------------------

PARIS = dt.timezone(dt.timedelta(hours=1))

CANONICAL = [
    # (array, canonical texts)
    pytest.param(pa.array([1, -128, 127, None], pa.int8()), ["1", "-128", "127", None], id="int8"),
    pytest.param(
        pa.array([0, 2**64 - 1], pa.uint64()), ["0", "18446744073709551615"], id="uint64-max"
    ),
    pytest.param(
        pa.array([-(2**63), 42], pa.int64()), ["-9223372036854775808", "42"], id="int64-min"
    ),
    pytest.param(pa.array([True, False, None]), ["true", "false", None], id="bool"),
    # float64: Python's repr; -0.0 and 0.0 differ; every NaN is "nan".
    pytest.param(
        pa.array([1.0, 0.1, 1e20, 1e-7, -0.0, 0.0, float("nan"), float("inf"), -float("inf")]),
        ["1.0", "0.1", "1e+20", "1e-07", "-0.0", "0.0", "nan", "inf", "-inf"],
        id="float64-repr",
    ),
    # float32: the shortest decimal at float32 precision, in the same style.
    pytest.param(
        pa.array([0.1, 1e15, 16777216.0, None], pa.float32()),
        ["0.1", "1000000000000000.0", "16777216.0", None],
        id="float32-shortest",
    ),
    # float16 65504 is the nearest half float to 65500, the shortest decimal that round-trips.
    pytest.param(
        pa.array(np.array([0.1, 65504.0], dtype=np.float16), pa.float16()),
        ["0.1", "65500.0"],
        id="float16-shortest",
    ),
    # Decimals: exactly `scale` digits after the point.
    pytest.param(
        pa.array([Decimal("1.5"), Decimal("-0.0000001"), None], pa.decimal128(12, 7)),
        ["1.5000000", "-0.0000001", None],
        id="decimal128-fixed-point",
    ),
    pytest.param(
        pa.array([Decimal("12")], pa.decimal128(5, 0)).cast(pa.decimal32(5, 0)),
        ["12"],
        id="decimal32-scale-0",
    ),
    # Dates: ISO-8601, proleptic Gregorian, signed beyond 0000-9999.
    pytest.param(
        pa.array(
            [
                dt.date(2020, 1, 31),
                dt.date(1969, 12, 31),  # before the epoch
                dt.date(1, 1, 1),
                dt.date(2262, 4, 12),  # past the nanosecond timestamp range
                dt.date(9999, 12, 31),
                None,
            ],
            pa.date32(),
        ),
        ["2020-01-31", "1969-12-31", "0001-01-01", "2262-04-12", "9999-12-31", None],
        id="date32",
    ),
    pytest.param(
        pa.array([-719163, -719529, 2932897], pa.int32()).cast(pa.date32()),
        ["0000-12-31", "-0001-12-31", "+10000-01-01"],
        id="date32-years-outside-0000-9999",
    ),
    pytest.param(
        pa.array([dt.date(1900, 3, 1), dt.date(2000, 2, 29)], pa.date64()),
        ["1900-03-01", "2000-02-29"],
        id="date64",
    ),
    # Timestamps: ISO-8601 with "T"; the fraction only when not zero, trailing zeros removed.
    pytest.param(
        pa.array(
            [
                dt.datetime(2020, 1, 31, 12, 30, 5),
                dt.datetime(2020, 1, 31, 12, 30, 5, 120000),
                dt.datetime(1969, 12, 31, 23, 59, 59, 999999),
                None,
            ],
            pa.timestamp("us"),
        ),
        [
            "2020-01-31T12:30:05",
            "2020-01-31T12:30:05.12",
            "1969-12-31T23:59:59.999999",
            None,
        ],
        id="timestamp-us-naive",
    ),
    pytest.param(
        pa.array([1, -1, 1_500_000_000], pa.timestamp("ns")),
        ["1970-01-01T00:00:00.000000001", "1969-12-31T23:59:59.999999999", "1970-01-01T00:00:01.5"],
        id="timestamp-ns",
    ),
    pytest.param(
        pa.array([253402300800], pa.timestamp("s")),
        ["+10000-01-01T00:00:00"],
        id="timestamp-s-after-9999",
    ),
    # A time zone: written in UTC with "Z".
    pytest.param(
        pa.array([dt.datetime(2020, 1, 31, 13, 0, tzinfo=PARIS)], pa.timestamp("ms", tz="+01:00")),
        ["2020-01-31T12:00:00Z"],
        id="timestamp-tz-as-utc",
    ),
    pytest.param(
        pa.array([dt.time(23, 59, 59), dt.time(0, 0, 0, 500), None], pa.time64("us")),
        ["23:59:59", "00:00:00.0005", None],
        id="time64",
    ),
    pytest.param(pa.array([3_600_001], pa.time32("ms")), ["01:00:00.001"], id="time32"),
    pytest.param(pa.nulls(2), [None, None], id="all-null-column"),
    pytest.param(
        pa.array(["a", None, "b", "a"]).dictionary_encode(),
        ["a", None, "b", "a"],
        id="dictionary-of-strings",
    ),
    pytest.param(
        pa.array([5, 5, None, 7], pa.int16()).dictionary_encode(),
        ["5", "5", None, "7"],
        id="dictionary-of-ints",
    ),
    pytest.param(pa.array(["x", None], pa.string_view()), ["x", None], id="string-view"),
]


@pytest.mark.parametrize(("array", "texts"), CANONICAL)
def test_non_string_values_are_tokenized_from_their_canonical_text(
    array: pa.Array, texts: list[str | None]
) -> None:
    expected = [None if t is None else hmac_hex(t) for t in texts]
    assert direct(array).to_pylist() == expected
    assert tokenize(array) == expected


def test_one_instant_gives_one_token_in_every_unit() -> None:
    instant = dt.datetime(2021, 6, 1, 8, 15, 30, 250000)
    tokens = {
        unit: direct(pa.array([instant], pa.timestamp(unit))).to_pylist()[0]
        for unit in ("ms", "us", "ns")
    }
    assert set(tokens.values()) == {hmac_hex("2021-06-01T08:15:30.25")}


@pytest.mark.parametrize(
    "typ",
    [
        pa.binary(),  # raw bytes
        pa.large_binary(),
        pa.binary(3),  # fixed size
    ],
)
def test_binary_is_hashed_as_raw_bytes(typ: pa.DataType) -> None:
    values = [b"\xff\x00a", None, b"abc"]
    assert direct(pa.array(values, typ)).to_pylist() == [
        hmac_hex(b"\xff\x00a"),
        None,
        hmac_hex(b"abc"),
    ]


def test_dictionary_with_a_null_in_its_dictionary() -> None:
    dictionary = pa.array(["a", None, "b"])
    arr = pa.DictionaryArray.from_arrays(pa.array([0, 1, 2, None, 0], pa.int8()), dictionary)
    assert direct(arr).to_pylist() == [hmac_hex("a"), None, hmac_hex("b"), None, hmac_hex("a")]


def test_slice_of_a_large_dictionary() -> None:
    big = pa.array([f"v{i}" for i in range(1000)] * 2).dictionary_encode()
    piece = big.slice(1500, 3)
    assert direct(piece).to_pylist() == [hmac_hex(f"v{i}") for i in (500, 501, 502)]


@pytest.mark.parametrize(
    "typ",
    [
        pa.list_(pa.string()),  # lists
        pa.struct([("a", pa.string())]),  # structs
        pa.map_(pa.string(), pa.string()),  # maps
        pa.duration("s"),  # durations: no canonical text
    ],
)
def test_types_without_canonical_text_are_refused(typ: pa.DataType) -> None:
    schema = pa.schema([("x", typ)])
    with pytest.raises(cape.PlanError, match=r"column 'x': tokenizer needs strings"):
        cape.build_plan(
            policy({"type": "tokenizer", "key": {"secret": "k"}}), schema, keys={"k": KEY}
        )


# -- batching -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.one_of(st.none(), st.text(max_size=6), st.sampled_from(["a", "b"]))),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=4),
)
def test_output_is_independent_of_batch_split(values: list[str | None], cuts: list[int]) -> None:
    arr = pa.array(values, pa.string())
    whole = direct(arr).to_pylist()
    bounds = sorted({0, len(values), *(c for c in cuts if c <= len(values))})
    joined = [t for a, b in pairwise(bounds) for t in direct(arr.slice(a, b - a)).to_pylist()]
    assert joined == whole == [None if v is None else hmac_hex(v) for v in values]


def test_table_in_many_chunks_equals_one_chunk() -> None:
    values = ["x", "y", None, "x", "z", "y"] * 50
    chunked = pa.table({"x": pa.chunked_array([values[:7], values[7:100], values[100:]])})
    pol = policy({"type": "tokenizer", "key": {"secret": "k"}, "max_token_len": 20})
    out = cape.apply_policy(pol, chunked, keys={"k": KEY}, audit=MemorySink())
    assert out.column("x").to_pylist() == tokenize(pa.array(values), max_token_len=20)


def test_pandas_frame_keeps_its_index() -> None:
    df = pd.DataFrame({"x": ["a", None, "b"], "y": [1, 2, 3]}, index=[10, 20, 30])
    pol = policy({"type": "tokenizer", "key": {"secret": "k"}})
    out = cape.apply_policy(pol, df, keys={"k": KEY}, audit=MemorySink())
    assert list(out.index) == [10, 20, 30]
    assert out["x"].tolist()[0] == hmac_hex("a") and out["x"].isna().tolist() == [
        False,
        True,
        False,
    ]
    assert out["y"].tolist() == [1, 2, 3]


# -- keys ---------------------------------------------------------------------------------


def test_missing_key_in_a_direct_call_is_a_transform_error() -> None:
    with pytest.raises(cape.TransformError, match="tokenizer has no key"):
        Tokenizer(key={"secret": "k"}).apply(pa.array(["a"]), ColumnContext("x"))


def test_missing_named_key_is_an_error_naming_it() -> None:
    with pytest.raises(cape.KeyMissingError, match="nope"):
        cape.apply_policy(
            policy({"type": "tokenizer", "key": {"secret": "nope"}}),
            pa.table({"x": ["a"]}),
            keys={},
            audit=MemorySink(),
        )


SECRET = "inline-secret-do-not-show-1234"


def test_key_is_never_shown() -> None:
    t = Tokenizer(key=SECRET)
    plan = cape.build_plan(
        policy({"type": "tokenizer", "key": SECRET}), pa.schema([("x", pa.string())])
    )
    shown = [repr(t), str(t), repr(plan), str(plan), t.model_dump_json(), repr(plan.steps)]
    for text in shown:
        assert SECRET not in text
    assert SECRET.encode() not in pickle.dumps(repr(t))
    assert SECRET.encode() not in pickle.dumps(repr(plan))
    # The key does work: the token is HMAC under the string's UTF-8 bytes.
    out = t.apply(pa.array(["a"]), ColumnContext("x", key=plan.keys[plan.steps[0].key_id]))
    assert out.to_pylist() == [hmac_hex("a", SECRET.encode())]


def test_bad_parameter_error_does_not_show_the_key() -> None:
    with pytest.raises(ValidationError) as info:
        Tokenizer(key=SECRET, max_token_len=0)
    assert SECRET not in str(info.value)
