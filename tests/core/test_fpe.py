"""fpe and fpe-reverser: every NIST FF1 sample, round trips, format options, refusals.

The nine FF1 samples NIST publishes with SP 800-38G (AES-128/192/256, radix 10
and 36, empty and non-empty tweaks) are written out here and checked against
both the FF1 engine and the policy transformation, in both directions. The
Luhn check in the tests is computed here from its definition, not by the code
under test.
"""

from __future__ import annotations

import string

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import cape_pipelines as cape
from cape_pipelines.audit import MemorySink
from cape_pipelines.errors import KeyFormatError, PolicyError, TransformError
from cape_pipelines.transforms._ff1 import FF1
from cape_pipelines.transforms.base import ColumnContext
from cape_pipelines.transforms.fpe import Fpe, FpeReverser

K128 = bytes.fromhex("2B7E151628AED2A6ABF7158809CF4F3C")
K192 = K128 + bytes.fromhex("EF4359D8D580AA4F")
K256 = K192 + bytes.fromhex("7F036D6F04FC6A94")
T10 = bytes.fromhex("39383736353433323130")
T11 = bytes.fromhex("3737373770717273373737")
B36 = string.digits + string.ascii_lowercase

NIST_FF1_SAMPLES = [
    # (sample, key, tweak, radix, plaintext, ciphertext)
    (1, K128, b"", 10, "0123456789", "2433477484"),
    (2, K128, T10, 10, "0123456789", "6124200773"),
    (3, K128, T11, 36, "0123456789abcdefghi", "a9tv40mll9kdu509eum"),
    (4, K192, b"", 10, "0123456789", "2830668132"),
    (5, K192, T10, 10, "0123456789", "2496655549"),
    (6, K192, T11, 36, "0123456789abcdefghi", "xbj3kv35jrawxv32ysr"),
    (7, K256, b"", 10, "0123456789", "6657667009"),
    (8, K256, T10, 10, "0123456789", "1001623463"),
    (9, K256, T11, 36, "0123456789abcdefghi", "xs8a0azh2avyalyzuwd"),
]
SAMPLE_IDS = [f"sample-{s[0]}" for s in NIST_FF1_SAMPLES]


def numerals(text: str) -> np.ndarray:
    return np.array([[B36.index(c) for c in text]])


def text_of(row: np.ndarray) -> str:
    return "".join(B36[i] for i in row)


def luhn_ok(number: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


@pytest.mark.parametrize(
    ("sample", "key", "tweak", "radix", "plain", "cipher"), NIST_FF1_SAMPLES, ids=SAMPLE_IDS
)
def test_ff1_engine_matches_nist_sample(sample, key, tweak, radix, plain, cipher):
    ff1 = FF1(key, radix)
    enc = ff1.encrypt(numerals(plain), tweak)
    assert text_of(enc[0]) == cipher
    assert text_of(ff1.decrypt(enc, tweak)[0]) == plain


@pytest.mark.parametrize(
    ("sample", "key", "tweak", "radix", "plain", "cipher"), NIST_FF1_SAMPLES, ids=SAMPLE_IDS
)
def test_fpe_transformation_matches_nist_sample(sample, key, tweak, radix, plain, cipher):
    params = {"key": {"secret": "k"}, "radix": radix, "tweak": tweak.decode("ascii")}
    ctx = ColumnContext("x", key=key)
    out = Fpe(**params).apply(pa.array([plain, None, plain]), ctx)
    assert out.to_pylist() == [cipher, None, cipher]
    assert FpeReverser(**params).apply(out, ctx).to_pylist() == [plain, None, plain]


def test_ff1_per_row_tweaks_equal_one_at_a_time():
    ff1 = FF1(K128, 10)
    x = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]] * 2)
    tweaks = np.frombuffer(T10 + bytes(10), np.uint8).reshape(2, 10)
    both = ff1.encrypt(x, tweaks)
    assert text_of(both[0]) == "6124200773"
    assert (both[1] == ff1.encrypt(x[:1], bytes(10))[0]).all()


def policy(*transforms: dict, column: str = "x") -> dict:
    return {
        "label": "fpe",
        "rules": [{"match": {"name": column}, "actions": [{"transform": t} for t in transforms]}],
    }


def run(table: pa.Table, *transforms: dict, key: bytes = K256, column: str = "x") -> pa.Table:
    return cape.apply_policy(
        policy(*transforms, column=column), table, keys={"k": key}, audit=MemorySink()
    )


def fpe(**params) -> dict:
    return {"type": "fpe", "key": {"secret": "k"}, **params}


def rev(**params) -> dict:
    return {"type": "fpe-reverser", "key": {"secret": "k"}, **params}


@settings(max_examples=40, deadline=None)
@given(
    radix=st.sampled_from([10, 36, 62]),
    data=st.data(),
)
def test_round_trip_any_length_and_radix(radix, data):
    # Lengths from the domain minimum up to 40 cover the numpy path (b <= 4)
    # and the Python-integer path (longer halves).
    chars = {10: string.digits, 36: B36, 62: B36 + string.ascii_uppercase}[radix]
    min_len = {10: 6, 36: 4, 62: 4}[radix]
    values = data.draw(
        st.lists(
            st.one_of(st.none(), st.text(alphabet=chars, min_size=min_len, max_size=40)),
            min_size=1,
            max_size=20,
        )
    )
    table = pa.table({"x": pa.array(values, pa.string())})
    enc = run(table, fpe(radix=radix, tweak="t"))
    out = enc.column("x").to_pylist()
    for before, after in zip(values, out, strict=True):
        assert (before is None) == (after is None)
        if before is not None:
            assert len(after) == len(before) and set(after) <= set(chars)
    assert run(enc, rev(radix=radix, tweak="t")).column("x").to_pylist() == values


@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.text(alphabet=string.digits, min_size=6, max_size=20),
            st.one_of(st.none(), st.text(max_size=30)),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_round_trip_with_tweak_column(rows):
    values = [v for v, _ in rows]
    table = pa.table({"x": values, "t": pa.array([t for _, t in rows], pa.string())})
    enc = run(table, fpe(tweak_column="t"))
    assert run(enc, rev(tweak_column="t")).column("x").to_pylist() == values


def test_tweak_changes_the_ciphertext_and_equal_pairs_agree():
    table = pa.table({"x": ["12345678"] * 3, "t": ["a", "b", "a"]})
    out = run(table, fpe(tweak_column="t")).column("x").to_pylist()
    assert out[0] == out[2] != out[1]


def test_dictionary_and_large_string_inputs():
    values = ["12345678", None, "12345678", "87654321"]
    plain = run(pa.table({"x": pa.array(values)}), fpe()).column("x").to_pylist()
    dict_in = pa.table({"x": pa.array(values).dictionary_encode()})
    large_in = pa.table({"x": pa.array(values, pa.large_string())})
    assert run(dict_in, fpe()).column("x").to_pylist() == plain
    assert run(large_in, fpe()).column("x").to_pylist() == plain


def test_keep_separators_luhn_and_keep_first():
    cards = ["4111-1111-1111-1111", "5500 0000 0000 0004", "4012888888881881", None]
    table = pa.table({"x": pa.array(cards)})
    params = {"keep_separators": True, "luhn": True, "keep_first": 6}
    enc = run(table, fpe(**params)).column("x").to_pylist()
    for before, after in zip(cards[:3], enc[:3], strict=True):
        assert len(after) == len(before)
        assert [c for c in after if not c.isdigit()] == [c for c in before if not c.isdigit()]
        digits = "".join(c for c in after if c.isdigit())
        assert digits[:6] == "".join(c for c in before if c.isdigit())[:6]
        assert luhn_ok(digits)
        assert after != before
    assert enc[3] is None
    back = run(pa.table({"x": pa.array(enc)}), rev(**params)).column("x").to_pylist()
    assert back == cards


def test_keep_last_keeps_the_last_characters():
    table = pa.table({"x": ["1234567890123456"]})
    out = run(table, fpe(keep_last=4)).column("x").to_pylist()[0]
    assert out.endswith("3456") and len(out) == 16


def test_custom_alphabet():
    table = pa.table({"x": ["ACGTACGTACGT"]})
    out = run(table, fpe(alphabet="ACGT")).column("x").to_pylist()[0]
    assert set(out) <= set("ACGT") and len(out) == 12
    back = run(pa.table({"x": [out]}), rev(alphabet="ACGT")).column("x").to_pylist()
    assert back == ["ACGTACGTACGT"]


@pytest.mark.parametrize(
    ("value", "params", "match"),
    [
        # five decimal digits: 100,000 values, below SP 800-38G's one million
        ("12345", {}, "too short to encrypt.*100,000 possible values.*SP 800-38G"),
        # keep_first leaves only 5 digits to encrypt
        ("12345678", {"keep_first": 3}, "too short to encrypt"),
        # one character: FF1's minimum length is 2
        ("z", {"radix": 62}, "at least 2 characters"),
        ("1234-5678", {}, "outside the alphabet"),
        ("4111111111111112", {"luhn": True}, "Luhn"),
        ("", {}, "too short"),
    ],
)
def test_refusals_name_the_row_and_reason(value, params, match):
    # The first row is fine for every option (a Luhn-valid 16-digit number).
    table = pa.table({"x": ["4111111111111111", value]})
    with pytest.raises(TransformError, match=f"row 1 .*{match}"):
        run(table, fpe(**params))


def test_on_error_null_nulls_only_the_bad_rows():
    table = pa.table({"x": ["123456789", "123", "12a45678"]})
    out = run(table, fpe(on_error="null")).column("x").to_pylist()
    assert out[0] is not None and out[1:] == [None, None]


def test_error_message_holds_no_value():
    table = pa.table({"x": ["98765"]})
    with pytest.raises(TransformError) as info:
        run(table, fpe())
    assert "98765" not in str(info.value)


def test_wrong_key_length_is_refused_without_showing_it():
    with pytest.raises(KeyFormatError, match="16-, 24- or 32-byte key") as info:
        run(pa.table({"x": ["123456789"]}), fpe(), key=b"k" * 20)
    assert "kkkk" not in str(info.value)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"tweak": "a", "tweak_column": "t"}, "not both"),
        ({"radix": 36, "alphabet": "abc"}, "radix or alphabet"),
        ({"luhn": True, "radix": 36}, "decimal digits"),
        ({"luhn": True, "keep_last": 4}, "keep_last"),
        ({"alphabet": "aa"}, "distinct"),
        ({"alphabet": "a"}, "at least 2"),
        ({"alphabet": "aé"}, "ASCII"),
        ({"radix": 16}, "radix"),
        ({"keep_first": -1}, "keep_first"),
    ],
)
def test_invalid_parameters(params, match):
    with pytest.raises(PolicyError, match=match):
        cape.load_policy(policy(fpe(**params)))


def test_parameters_checked_by_the_class():
    with pytest.raises(ValidationError):
        Fpe(key={"secret": "k"}, tweak="a", tweak_column="t")


def test_non_string_column_is_refused_at_plan_time():
    with pytest.raises(cape.PlanError, match="needs a string column"):
        run(pa.table({"x": pa.array([123456789])}), fpe())


def test_missing_tweak_column_is_a_plan_error():
    with pytest.raises(cape.PlanError):
        run(pa.table({"x": ["123456789"]}), fpe(tweak_column="nope"))


def test_keep_separators_with_regex_special_characters_in_the_alphabet():
    # ] \\ ^ - are alphabet characters here, so they are encrypted, not kept.
    alphabet = "0123456789]\\^-"
    values = ["12]4\\5^6-7 x", "12\u201334 56"]
    table = pa.table({"x": values})
    enc = run(table, fpe(alphabet=alphabet, keep_separators=True)).column("x").to_pylist()
    assert enc[0].endswith(" x") and enc[1][2] == "\u2013" and enc[1][5] == " "
    back = run(pa.table({"x": enc}), rev(alphabet=alphabet, keep_separators=True))
    assert back.column("x").to_pylist() == values


@settings(max_examples=30, deadline=None)
@given(
    payload=st.text(alphabet=string.digits, min_size=12, max_size=18),
    seps=st.lists(st.sampled_from(["", " ", "-", "/"]), min_size=19, max_size=19),
    keep_first=st.integers(0, 6),
)
def test_round_trip_cards_with_separators_and_luhn(payload, seps, keep_first):
    digits = payload + luhn_check(payload)
    card = "".join(d + s for d, s in zip(digits, seps, strict=False))
    params = {"keep_separators": True, "luhn": True, "keep_first": keep_first}
    enc = run(pa.table({"x": [card]}), fpe(**params)).column("x").to_pylist()[0]
    assert [c for c in enc if not c.isdigit()] == [c for c in card if not c.isdigit()]
    enc_digits = "".join(c for c in enc if c.isdigit())
    assert luhn_ok(enc_digits) and enc_digits[:keep_first] == digits[:keep_first]
    assert run(pa.table({"x": [enc]}), rev(**params)).column("x").to_pylist() == [card]


def luhn_check(payload: str) -> str:
    for d in "0123456789":
        if luhn_ok(payload + d):
            return d
    raise AssertionError("no check digit")


@settings(max_examples=40, deadline=None)
@given(
    radix=st.sampled_from([10, 36, 62, 2]),
    n=st.integers(2, 24),
    rows=st.integers(1, 8),
    tweak=st.binary(max_size=40),
    seed=st.integers(0, 2**32 - 1),
)
def test_numpy_path_equals_python_integer_path(radix, n, rows, tweak, seed):
    if radix**n < 1_000_000:
        return
    x = np.random.default_rng(seed).integers(0, radix, (rows, n))
    fast, exact = FF1(K256, radix), FF1(K256, radix, exact=True)
    enc = fast.encrypt(x, tweak)
    assert (enc == exact.encrypt(x, tweak)).all()
    assert (fast.decrypt(enc, tweak) == x).all()
