"""numeric-perturbation and date-perturbation, and the bulk AES PRF under them.

Most rows use a one-value noise range (``min: k, max: k + 1`` gives the integer
noise ``k`` exactly) so the expected output is written out by hand; the
properties check the real ranges, determinism across batching and ordering,
and how keys, seeds, columns and context change the noise.
"""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cape_pipelines as cape
from cape_pipelines.keys import KeyResolver
from cape_pipelines.transforms import _prf
from cape_pipelines.transforms.base import ColumnContext, seed_key
from cape_pipelines.transforms.perturb import DatePerturbation, NumericPerturbation

I64 = (-(1 << 63), (1 << 63) - 1)
KEY = b"\x01" * 32


def policy(column: str, transform: dict) -> dict:
    return {
        "label": "t",
        "rules": [{"match": {"name": column}, "actions": [{"transform": transform}]}],
    }


def run(transform: dict, table: pa.Table, column: str = "x", **kw) -> pa.Table:
    return cape.apply_policy(policy(column, transform), table, **kw)


def ts(values: list[int | None], unit: str = "us", tz: str | None = None) -> pa.Array:
    return pa.array(values, pa.int64()).view(pa.timestamp(unit, tz))


# ---------------------------------------------------------------- the PRF helper


@pytest.mark.parametrize(
    ("key", "plaintext", "ciphertext"),
    [
        # FIPS-197 appendix C.1, AES-128
        (
            "000102030405060708090a0b0c0d0e0f",
            "00112233445566778899aabbccddeeff",
            "69c4e0d86a7b0430d8cdb78070b4c55a",
        ),
        # FIPS-197 appendix C.3, AES-256
        (
            "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
            "00112233445566778899aabbccddeeff",
            "8ea2b7ca516745bfeafc49904b496089",
        ),
        # SP 800-38A F.1.1 ECB-AES128.Encrypt, blocks 1 and 2 in one call
        (
            "2b7e151628aed2a6abf7158809cf4f3c",
            "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51",
            "3ad77bb40d7a3660a89ecaf32466ef97f5d3d58503b9699de785895a96fdbaaf",
        ),
        # SP 800-38A F.1.5 ECB-AES256.Encrypt, blocks 1 and 2 in one call
        (
            "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4",
            "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51",
            "f3eed1bdb5d2a03c064b5a7e3db181f8591ccb10d410ed26dc5ba74a31362870",
        ),
    ],
)
def test_encrypt_blocks_matches_published_vectors(key: str, plaintext: str, ciphertext: str):
    blocks = np.frombuffer(bytes.fromhex(plaintext), dtype="<u8").reshape(-1, 2)
    out = _prf.encrypt_blocks(bytes.fromhex(key), blocks)
    assert out.tobytes().hex() == ciphertext


def test_encrypt_blocks_spans_slices():
    # More than one 1 MiB slice: every block must equal its own one-block encryption.
    rng = np.random.default_rng(5)
    blocks = rng.integers(0, 2**63, size=(70_000, 2), dtype=np.uint64).astype("<u8")
    whole = _prf.encrypt_blocks(KEY, blocks)
    for i in (0, 65_535, 65_536, 69_999):
        assert (whole[i] == _prf.encrypt_blocks(KEY, blocks[i : i + 1])[0]).all()


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("k", "col", "p"), ("k", "col2", "p")),  # another column
        (("k", "col", "p"), ("k", "col", "q")),  # another purpose
        (("k", "ab", "c"), ("k", "a", "bc")),  # labels are length-prefixed, not concatenated
        (("k", "col", "p"), ("k2", "col", "p")),  # another key
    ],
)
def test_derive_key_separates_inputs(a, b):
    ka = _prf.derive_key(a[0].encode(), a[1], a[2])
    kb = _prf.derive_key(b[0].encode(), b[1], b[2])
    assert len(ka) == 32 and ka != kb


@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=50), st.integers(1, 2**64 - 1))
def test_below_is_multiply_shift(words, bound):
    got = _prf.below(np.array(words, dtype=np.uint64), bound)
    if bound <= 2**32:
        want = [((w >> 32) * bound) >> 32 for w in words]
    else:
        want = [(w * bound) >> 64 for w in words]
    assert got.tolist() == want
    assert all(0 <= g < bound for g in want)


@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=50))
def test_unit_floats_in_unit_interval(words):
    u = _prf.unit_floats(np.array([*words, 0, 2**64 - 1], dtype=np.uint64))
    assert ((u >= 0.0) & (u < 1.0)).all()


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (pa.array([5], pa.int8()), pa.array([5], pa.int64())),  # integer width does not matter
        (pa.array([5], pa.uint32()), pa.array([5], pa.int64())),  # nor signedness
        (pa.array([-0.0]), pa.array([0.0])),  # the two zeros
        (pa.array([1.5], pa.float32()), pa.array([1.5])),  # float width
        (ts([1], "s"), ts([1_000_000_000], "ns")),  # timestamp unit
        (ts([1], "s", "UTC"), ts([1], "s", "Asia/Tokyo")),  # time zone (same instant)
        (pa.array([dt.date(2000, 1, 2)]), pa.array([dt.datetime(2000, 1, 2)], pa.timestamp("ms"))),
        # far from 1970 the 128-bit path is taken; it must agree with the fast one
        (pa.array([3_000_000], pa.int32()).view(pa.date32()), ts([3_000_000 * 86_400], "s")),
        (ts([-(10**15)], "s"), ts([-(10**15) * 1000], "ms").cast(pa.timestamp("ms"))),
        (pa.array(["abc"]), pa.array(["abc"], pa.large_string())),  # string width
        (pa.array(["abc"]).dictionary_encode(), pa.array(["abc"])),  # dictionary encoding
    ],
)
def test_encode_is_canonical(a, b):
    assert (_prf.encode(a) == _prf.encode(b)).all()


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (pa.array([1]), pa.array([1.0])),  # an int and a float are different values
        (pa.array([1]), pa.array(["1"])),  # so are an int and its text
        (ts([1], "s"), ts([1], "ms")),  # one second is not one millisecond
        (pa.array([None], pa.int64()), pa.array([0])),  # null is not zero
        (pa.array(["a"]), pa.array(["b"])),
    ],
)
def test_encode_separates_values(a, b):
    assert not (_prf.encode(a) == _prf.encode(b)).all()


@given(st.integers(-(2**63), 2**63 - 1), st.sampled_from([1_000, 1_000_000, 1_000_000_000]))
def test_times_unit_is_exact(value, per):
    high, low = _prf._times_unit(np.array([value], dtype=np.int64), per)
    assert (int(high[0]) << 64) + int(low[0]) == value * per


def test_encode_refuses_nested_types():
    with pytest.raises(cape.TransformError, match="cannot derive noise from values of type list"):
        _prf.encode(pa.array([[1]]))


# ---------------------------------------------------------------- numeric-perturbation


def numeric(values, typ, lo, hi, **extra):
    table = pa.table({"x": pa.array(values, typ)})
    t = {"type": "numeric-perturbation", "min": lo, "max": hi, "seed": 1, **extra}
    return run(t, table).column("x")


@pytest.mark.parametrize(
    ("typ", "values", "lo", "hi", "expected"),
    [
        # one-value range: the noise is exactly 3
        (pa.int64(), [1, None, -5], 3, 4, [4, None, -2]),
        # every integer type keeps its type and saturates at its ends
        (pa.int8(), [127, -128, 0], 1, 2, [127, -127, 1]),
        (pa.int8(), [127, -128, 0], -1, 0, [126, -128, -1]),
        (pa.int16(), [32767, -32768], 5, 6, [32767, -32763]),
        (pa.int32(), [2**31 - 1, -(2**31)], -7, -6, [2**31 - 8, -(2**31)]),
        (pa.int64(), [I64[1], I64[0], 0], 1, 2, [I64[1], I64[0] + 1, 1]),
        (pa.int64(), [I64[1], I64[0]], -1, 0, [I64[1] - 1, I64[0]]),
        (pa.uint8(), [255, 0], 1, 2, [255, 1]),
        (pa.uint8(), [255, 0], -1, 0, [254, 0]),
        (pa.uint64(), [2**64 - 1, 0], 1, 2, [2**64 - 1, 1]),
        (pa.uint64(), [2**64 - 1, 0, 2**63], -1, 0, [2**64 - 2, 0, 2**63 - 1]),
        # noise wider than the type: saturates, never wraps
        (pa.int8(), [0, 1], 2**62, 2**62 + 1, [127, 127]),
        (pa.int64(), [1, -1], -(2**63), -(2**63) + 1, [I64[0] + 1, I64[0]]),
        # integer noise is the integers inside [min, max): here only 0, then only 1
        (pa.int32(), [10, 20], -0.5, 0.5, [10, 20]),
        (pa.int32(), [10, 20], 0.2, 1.2, [11, 21]),
        # floats: NaN and infinities pass through, -0.0 is a value like 0.0
        (
            pa.float64(),
            [math.nan, math.inf, -math.inf, None],
            1,
            2,
            ["nan", math.inf, -math.inf, None],
        ),
        # a finite float stays finite (saturates at the largest finite value)
        (pa.float64(), [1.7976931348623157e308], 1e308, 1.1e308, [1.7976931348623157e308]),
        (pa.float32(), [3.4028234663852886e38], 1e38, 2e38, [3.4028234663852886e38]),
        (pa.float32(), [-3.4028234663852886e38], -2e38, -1e38, [-3.4028234663852886e38]),
    ],
)
def test_numeric_table(typ, values, lo, hi, expected):
    out = numeric(values, typ, lo, hi)
    assert out.type == typ
    got = ["nan" if isinstance(v, float) and math.isnan(v) else v for v in out.to_pylist()]
    assert got == expected


@pytest.mark.parametrize(
    ("typ", "values", "lo", "hi"),
    [
        (pa.float64(), [0.0, -0.0, 1.25, -1e6, 1e-300], -2.5, 2.5),  # float noise in range
        (pa.float32(), [0.0, 1.5, -7.25], -1, 1),  # float32 stays float32
        (pa.float64(), [5.0], 0.0, 1e-9),  # a tiny range
    ],
)
def test_numeric_float_noise_in_range(typ, values, lo, hi):
    out = numeric(values, typ, lo, hi).to_pylist()
    assert pa.array(out, typ).type == typ
    for v, o in zip(values, out, strict=True):
        # float64 arithmetic of v + noise can round, by at most half an ulp of the result
        slack = 2 * np.spacing(np.array(abs(o), dtype=typ.to_pandas_dtype())).item()
        assert lo - slack <= o - v < hi + slack


def test_minus_zero_and_zero_get_the_same_noise():
    out = numeric([0.0, -0.0], pa.float64(), -5, 5).to_pylist()
    assert out[0] == out[1] and out[0] != 0.0


@pytest.mark.parametrize(
    ("transform", "input_type", "expected_type", "values", "expected"),
    [
        # dtype fixes the output type; the input is cast first, then integer noise is added
        ({"dtype": "Integer"}, pa.float64(), pa.int32(), [1.0, None], [4, None]),
        ({"dtype": "Double"}, pa.decimal128(5, 2), pa.float64(), [None], [None]),
        (
            {"dtype": "Double", "max": 3.0000001},
            pa.int64(),
            pa.float64(),
            [2],
            [pytest.approx(5.0)],
        ),
        ({"dtype": "Long"}, pa.int8(), pa.int64(), [127], [130]),
    ],
)
def test_numeric_dtype(transform, input_type, expected_type, values, expected):
    out = numeric(values, input_type, 3, 4, **transform)
    assert out.type == expected_type and out.to_pylist() == expected


def test_numeric_dtype_cast_failure_names_the_column():
    with pytest.raises(cape.TransformError, match="column 'x': cannot cast to dtype int32"):
        numeric([1.5], pa.float64(), 3, 4, dtype="Integer")


@pytest.mark.parametrize(
    ("input_type", "transform", "match"),
    [
        (pa.string(), {}, "column 'x': numeric-perturbation needs an integer or floating-point"),
        (pa.bool_(), {}, "but the column is bool"),
        (pa.decimal128(5, 2), {}, "set dtype: Double to perturb a decimal"),
        (pa.timestamp("us"), {}, "but the column is timestamp"),
        (pa.int64(), {"min": 0.2, "max": 0.8}, r"there is none"),
        (pa.int64(), {"min": -1e30, "max": 0}, "64-bit integer range"),
        (pa.float64(), {"dtype": "Integer", "min": 0.2, "max": 0.8}, "there is none"),
    ],
)
def test_numeric_refused_at_plan_time(input_type, transform, match):
    t = {"type": "numeric-perturbation", "min": -1, "max": 1, **transform}
    with pytest.raises(cape.PlanError, match=match):
        cape.build_plan(policy("x", t), pa.schema([("x", input_type)]))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(-(10**12), 10**12) | st.none(), min_size=1, max_size=40),
    st.integers(-1000, 1000),
    st.integers(1, 1000),
    st.integers(0, 2**32),
)
def test_integer_noise_range_property(values, lo, width, seed):
    out = numeric(values, pa.int64(), lo, lo + width, seed=seed).to_pylist()
    for v, o in zip(values, out, strict=True):
        assert (v is None) == (o is None)
        if v is not None:
            assert lo <= o - v < lo + width


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=40),
    st.floats(-1e6, 1e6),
    st.floats(1e-6, 1e6),
)
def test_float_noise_range_property(words, lo, width):
    t = NumericPerturbation(min=lo, max=lo + width)
    noise = t.float_noise(np.array([*words, 0, 2**64 - 1], dtype=np.uint64))
    assert ((noise >= t.min) & (noise < t.max)).all()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(-(2**40), 2**40) | st.none(), min_size=2, max_size=60),
    st.data(),
)
def test_numeric_same_bytes_whatever_the_batching_and_order(values, data):
    arr = pa.array(values, pa.int64())
    whole = numeric(values, pa.int64(), -100, 100)
    cut = data.draw(st.integers(1, len(values) - 1))
    table = pa.Table.from_batches(
        [pa.record_batch([arr.slice(0, cut)], ["x"]), pa.record_batch([arr.slice(cut)], ["x"])]
    )
    t = {"type": "numeric-perturbation", "min": -100, "max": 100, "seed": 1}
    assert run(t, table).column("x").combine_chunks().equals(whole.combine_chunks())
    order = data.draw(st.permutations(range(len(values))))
    shuffled = numeric([values[i] for i in order], pa.int64(), -100, 100).to_pylist()
    assert shuffled == [whole.to_pylist()[i] for i in order]


def test_offset_slices_keep_their_nulls():
    arr = pa.array([1, None, 3, None, 5], pa.int64()).slice(1)
    t = NumericPerturbation(min=10, max=11)
    out = t.apply(arr, ColumnContext("x", key=KEY))
    assert out.to_pylist() == [None, 13, None, 15]


# ---------------------------------------------------------------- keys, seeds, columns


def noisy(transform_extra: dict, keys=None, column: str = "x", resolver=None) -> list:
    table = pa.table({column: pa.array(np.arange(200, dtype=np.int64))})
    t = {"type": "numeric-perturbation", "min": -(10**6), "max": 10**6, **transform_extra}
    return run(t, table, column=column, keys=keys, resolver=resolver).column(column).to_pylist()


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (({"seed": 7},), ({"seed": 7},), True),  # a seed reproduces
        (({"seed": 7},), ({"seed": 8},), False),  # another seed
        (
            ({"key": {"secret": "k"}}, {"k": b"a" * 32}),
            ({"key": {"secret": "k"}}, {"k": b"a" * 32}),
            True,
        ),
        (
            ({"key": {"secret": "k"}}, {"k": b"a" * 32}),
            ({"key": {"secret": "k"}}, {"k": b"b" * 32}),
            False,
        ),
        # a seed is only a public way to write a key: seed 7 is the key seed_key(7)
        (({"seed": 7},), ({"key": {"secret": "k"}}, {"k": seed_key(7)}), True),
        (({},), ({},), False),  # no seed, no key: a fresh key per run
    ],
)
def test_keys_and_seeds(a, b, same):
    assert (noisy(*a) == noisy(*b)) is same


def test_run_key_is_stable_within_a_run():
    resolver = KeyResolver()
    assert noisy({}, resolver=resolver) == noisy({}, resolver=resolver)


def test_different_columns_get_different_noise():
    values = pa.array(np.arange(100, dtype=np.int64))
    table = pa.table({"a": values, "b": values})
    t = {"type": "numeric-perturbation", "min": -1000, "max": 1000, "seed": 3}
    pol = {"label": "t", "rules": [{"match": {"names": ["a", "b"]}, "actions": [{"transform": t}]}]}
    out = cape.apply_policy(pol, table)
    assert out.column("a").to_pylist() != out.column("b").to_pylist()


def test_equal_values_get_equal_noise_without_context():
    out = numeric([42] * 5 + [43], pa.int64(), -1000, 1000).to_pylist()
    assert len(set(out[:5])) == 1
    assert out[5] - 43 != out[0] - 42  # a neighbouring value has its own noise


# ---------------------------------------------------------------- date-perturbation


def dates(arr: pa.Array, transform: dict) -> pa.Array:
    t = {"type": "date-perturbation", "seed": 1, **transform}
    return run(t, pa.table({"x": arr})).column("x").combine_chunks()


DAY_US = 86_400 * 10**6


@pytest.mark.parametrize(
    ("arr", "transform", "expected"),
    [
        # date32: shifted by whole days, stays date32, nulls stay null
        (
            pa.array([dt.date(2020, 2, 28), None]),
            {"frequency": "DAY", "min": 2, "max": 3},
            pa.array([dt.date(2020, 3, 1), None]),
        ),
        # YEAR is 365 days and MONTH 30 days, as in cape-python
        (
            pa.array([dt.date(2020, 1, 1)]),
            {"frequency": "YEAR", "min": 1, "max": 2},
            pa.array([dt.date(2020, 12, 31)]),
        ),
        (
            pa.array([dt.date(2020, 1, 1)]),
            {"frequency": "month", "min": -1, "max": 0},
            pa.array([dt.date(2019, 12, 2)]),
        ),
        # a sub-day shift moves a date by its floor in whole days: +5h: same day, -1h: day before
        (
            pa.array([dt.date(2020, 1, 1)]),
            {"frequency": "HOUR", "min": 5, "max": 6},
            pa.array([dt.date(2020, 1, 1)]),
        ),
        (
            pa.array([dt.date(2020, 1, 1)]),
            {"frequency": "minutes", "min": -1, "max": 0},
            pa.array([dt.date(2019, 12, 31)]),
        ),
        # before 1970 and after 2262, date32
        (
            pa.array([dt.date(1, 1, 2), dt.date(1969, 12, 31), dt.date(9999, 12, 30)]),
            {"frequency": "DAY", "min": -1, "max": 0},
            pa.array([dt.date(1, 1, 1), dt.date(1969, 12, 30), dt.date(9999, 12, 29)]),
        ),
        # date64 stays date64 and moves by whole days
        (
            pa.array([dt.date(2000, 3, 1)], pa.date64()),
            {"frequency": ["DAY", "HOUR"], "min": [-1, 23], "max": [0, 24]},
            pa.array([dt.date(2000, 2, 29)], pa.date64()),
        ),
        # a list of frequencies adds up: +2 days +3 hours -4 minutes +5 seconds
        (
            pa.array([dt.datetime(2020, 1, 1)], pa.timestamp("s")),
            {
                "frequency": ["DAY", "HOUR", "minutes", "seconds"],
                "min": [2, 3, -4, 5],
                "max": [3, 4, -3, 6],
            },
            pa.array([dt.datetime(2020, 1, 3, 2, 56, 5)], pa.timestamp("s")),
        ),
        # timestamps with a time zone keep it; the instant moves
        (
            ts([0, None], "ms", "Europe/Paris"),
            {"frequency": "HOUR", "min": 1, "max": 2},
            ts([3_600_000, None], "ms", "Europe/Paris"),
        ),
        # nanosecond precision is kept
        (
            ts([1_600_000_000_123_456_789], "ns"),
            {"frequency": "seconds", "min": 1, "max": 2},
            ts([1_600_000_001_123_456_789], "ns"),
        ),
        # timestamp[us] before 1970 and after 2262
        (
            ts([-(10**17), 10**17]),
            {"frequency": "DAY", "min": 1, "max": 2},
            ts([-(10**17) + DAY_US, 10**17 + DAY_US]),
        ),
        # ns near both ends saturates; INT64_MIN (pandas' NaT) is never produced
        (
            ts([I64[1] - 5, I64[0] + 5, 0], "ns"),
            {"frequency": "seconds", "min": 1, "max": 2},
            ts([I64[1], I64[0] + 5 + 10**9, 10**9], "ns"),
        ),
        (
            ts([I64[0] + 5], "ns"),
            {"frequency": "seconds", "min": -1, "max": 0},
            ts([I64[0] + 1], "ns"),
        ),
        # date32 saturates at its own range
        (
            pa.array([2**31 - 2], pa.int32()).view(pa.date32()),
            {"frequency": "DAY", "min": 5, "max": 6},
            pa.array([2**31 - 1], pa.int32()).view(pa.date32()),
        ),
    ],
)
def test_date_table(arr, transform, expected):
    out = dates(arr, transform)
    assert out.type == arr.type
    assert out.equals(expected), (out, expected)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(-(10**17), 10**17) | st.none(), min_size=1, max_size=40),
    st.integers(-1000, 1000),
    st.integers(1, 1000),
)
def test_date_shift_range_property(values, lo, width):
    out = dates(ts(values), {"frequency": "minutes", "min": lo, "max": lo + width})
    for v, o in zip(values, out.cast(pa.int64()).to_pylist(), strict=True):
        assert (v is None) == (o is None)
        if v is not None:
            assert (o - v) % 60_000_000 == 0
            assert lo <= (o - v) // 60_000_000 < lo + width


def test_each_frequency_has_its_own_noise():
    values = ts(list(range(0, 500 * 10**6, 10**6)), "us")
    out = dates(values, {"frequency": ["DAY", "seconds"], "min": [0, 0], "max": [1000, 1000]})
    shift = (out.cast(pa.int64()).to_numpy() - values.cast(pa.int64()).to_numpy()) // 10**6
    days, seconds = shift // 86_400, shift % 86_400
    assert not (days == seconds).all()
    assert len(set(days.tolist())) > 100 and len(set(seconds.tolist())) > 100


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 5) | st.none(), min_size=2, max_size=40), st.data())
def test_context_gives_one_shift_per_patient(patients, data):
    n = len(patients)
    base = [dt.datetime(2020, 1, 1) + dt.timedelta(days=i) for i in range(n)]
    table = pa.table(
        {"pid": pa.array(patients, pa.int64()), "x": pa.array(base, pa.timestamp("us"))}
    )
    t = {
        "type": "date-perturbation",
        "frequency": "DAY",
        "min": -30,
        "max": 30,
        "seed": 4,
        "context": "pid",
    }
    out = run(t, table).column("x").to_pylist()
    shifts: dict = {}
    for p, b, o in zip(patients, base, out, strict=True):
        shifts.setdefault(p, set()).add(o - b)
    assert all(len(s) == 1 for s in shifts.values())
    # and the result does not depend on row order
    order = data.draw(st.permutations(range(n)))
    shuffled = run(t, table.take(order)).column("x").to_pylist()
    assert shuffled == [out[i] for i in order]


@pytest.mark.parametrize(
    "context",
    [
        pa.array(["p1", "p2", "p1", None, None]),  # strings, hashed once per distinct value
        pa.array([b"p1", b"p2", b"p1", None, None]),  # binary
        pa.array([1.5, 2.5, 1.5, None, None]),  # floats
        pa.array([dt.date(2000, 1, 1), dt.date(2000, 1, 2), dt.date(2000, 1, 1), None, None]),
        pa.array(["p1", "p2", "p1", None, None]).dictionary_encode(),
    ],
)
def test_context_of_any_type(context):
    base = pa.array([10, 20, 30, 40, 50], pa.int64())
    table = pa.table({"c": context, "x": base})
    t = {"type": "numeric-perturbation", "min": -(10**6), "max": 10**6, "seed": 4, "context": "c"}
    out = run(t, table).column("x").to_pylist()
    noise = [o - b for o, b in zip(out, base.to_pylist(), strict=True)]
    assert noise[0] == noise[2]  # same context value, same noise
    assert noise[3] == noise[4]  # nulls share one noise
    assert len({noise[0], noise[1], noise[3]}) == 3


def test_context_column_must_exist():
    t = {"type": "date-perturbation", "frequency": "DAY", "min": 0, "max": 2, "context": "pid"}
    with pytest.raises(cape.PlanError, match="context column 'pid' is not in the data"):
        cape.build_plan(policy("x", t), pa.schema([("x", pa.date32())]))


@pytest.mark.parametrize(
    ("input_type", "transform", "match"),
    [
        (pa.string(), {}, "column 'x': date-perturbation needs a date or timestamp column"),
        (pa.int64(), {}, "but the column is int64"),
        (pa.time64("us"), {}, "but the column is time64"),
        # 300 years of ns do not fit in int64
        (pa.timestamp("ns"), {"frequency": "YEAR", "min": -300, "max": 300}, "coarser unit"),
    ],
)
def test_date_refused_at_plan_time(input_type, transform, match):
    t = {"type": "date-perturbation", "frequency": "DAY", "min": -1, "max": 1, **transform}
    with pytest.raises(cape.PlanError, match=match):
        cape.build_plan(policy("x", t), pa.schema([("x", input_type)]))


def test_date_with_pandas_keeps_the_index():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"x": pd.to_datetime(["2020-01-01", "2021-06-30"])}, index=[7, 9])
    t = {"type": "date-perturbation", "frequency": "DAY", "min": 1, "max": 2, "seed": 1}
    out = cape.apply_policy(policy("x", t), df)
    assert list(out.index) == [7, 9]
    assert list(out["x"]) == list(pd.to_datetime(["2020-01-02", "2021-07-01"]))


# ---------------------------------------------------------------- bad parameters


LOC = r"rules\[0\]\.actions\[0\]\.transform"


@pytest.mark.parametrize(
    ("transform", "match"),
    [
        ({"type": "numeric-perturbation", "min": "1", "max": 2}, LOC + r"\.min: must be a number"),
        ({"type": "numeric-perturbation", "min": True, "max": 2}, LOC + r"\.min: must be a number"),
        (
            {"type": "numeric-perturbation", "min": 2, "max": 2},
            LOC + r": min \(2\) must be less than max",
        ),
        ({"type": "numeric-perturbation", "min": 3, "max": 2.5}, LOC + r": min \(3\) must be less"),
        ({"type": "numeric-perturbation", "max": 2}, LOC + r"\.min: field required"),
        (
            {"type": "numeric-perturbation", "min": -1e308, "max": 1e308},
            LOC + ": max - min must be a finite",
        ),
        (
            {"type": "numeric-perturbation", "min": 0, "max": 1, "seed": "7"},
            LOC + r"\.seed: must be an integer",
        ),
        (
            {"type": "numeric-perturbation", "min": 0, "max": 1, "dtype": "String"},
            LOC + r"\.dtype: dtype must be numeric",
        ),
        ({"type": "numeric-perturbation", "min": 0, "max": 1, "dtype": "Quad"}, LOC + r"\.dtype"),
        (
            {"type": "numeric-perturbation", "min": 0, "max": 1, "seed": 1, "key": {"secret": "k"}},
            LOC + ": give seed or key, not both",
        ),
        (
            {"type": "numeric-perturbation", "min": 0, "max": 1, "key": 5},
            LOC + r"\.key: key must be",
        ),
        (
            {"type": "date-perturbation", "frequency": "WEEK", "min": 0, "max": 1},
            LOC + r"\.frequency: unknown frequency 'WEEK'",
        ),
        (
            {"type": "date-perturbation", "frequency": 3, "min": 0, "max": 1},
            LOC + r"\.frequency: frequency must be a string",
        ),
        (
            {"type": "date-perturbation", "frequency": [], "min": [], "max": []},
            LOC + r"\.frequency: frequency must name at least one frequency",
        ),
        (
            {"type": "date-perturbation", "frequency": "DAY", "min": "0", "max": 1},
            LOC + r"\.min: must be an integer",
        ),
        (
            {"type": "date-perturbation", "frequency": "DAY", "min": 0.5, "max": 1},
            LOC + r"\.min: must be an integer",
        ),
        (
            {"type": "date-perturbation", "frequency": "DAY", "min": 1, "max": 1},
            LOC + r": min \(1\) must be less than max \(1\) for DAY",
        ),
        (
            {"type": "date-perturbation", "frequency": ["DAY", "HOUR"], "min": [0], "max": [1, 2]},
            LOC + r": frequency, min and max must have the same length \(2, 1, 2\)",
        ),
        (
            {"type": "date-perturbation", "frequency": "YEAR", "min": 0, "max": 10**12},
            LOC + ": the largest possible shift does not fit",
        ),
    ],
)
def test_bad_parameters(transform, match):
    pol = {"label": "t", "rules": [{"match": {"name": "x"}, "actions": [{"transform": transform}]}]}
    with pytest.raises(cape.PolicyError, match=match):
        cape.load_policy(pol)


def test_cape_python_policy_loads():
    yaml_text = """
label: legacy
transformations:
  - name: noise
    type: numeric-perturbation
    dtype: Integer
    min: -10
    max: 10
    seed: 4984
  - name: shift
    type: date-perturbation
    frequency: [YEAR, MONTH, DAY]
    min: [-10, -5, -5]
    max: [10, 5, 5]
rules:
  - match: {name: age}
    actions: [{transform: {name: noise}}]
  - match: {name: born}
    actions: [{transform: {name: shift}}]
"""
    table = pa.table(
        {"age": pa.array([30, 40], pa.int32()), "born": pa.array([dt.date(1980, 5, 1)] * 2)}
    )
    out = cape.apply_policy(yaml_text, table)
    ages = out.column("age").to_pylist()
    assert out.column("age").type == pa.int32()
    assert all(-10 <= a - b < 10 for a, b in zip(ages, [30, 40], strict=True))


def test_repr_hides_key():
    t = NumericPerturbation(min=0, max=1, key="inline secret phrase")
    assert "inline secret phrase" not in repr(t) and "hidden" in repr(t)


def test_date_perturbation_direct_call_needs_a_key():
    t = DatePerturbation(frequency="DAY", min=0, max=1)
    with pytest.raises(cape.TransformError, match="no resolved key"):
        t.apply(pa.array([dt.date(2000, 1, 1)]), ColumnContext("x"))
