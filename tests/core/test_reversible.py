"""reversible-tokenizer and token-reverser: RFC 5297 vectors, cape-python tokens, bad tokens, keys.

The RFC 5297 vectors are written out here; cape-python compatibility is
checked against cape-python's formula (``tag.hex() + ciphertext.hex()``)
computed with ``cryptography``'s AESSIV, so it always runs, and that reference
against pycryptodome (cape-python's library) where it is installed; never
against the code under test.
"""

from __future__ import annotations

import pickle

import pandas as pd
import pyarrow as pa
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import cape_pipelines as cape
from cape_pipelines.audit import MemorySink
from cape_pipelines.errors import KeyFormatError
from cape_pipelines.transforms.base import ColumnContext
from cape_pipelines.transforms.reversible import (
    ReversibleTokenizer,
    TokenReverser,
    siv_decrypt,
    siv_encrypt,
)

KEY32 = bytes(range(32))
KEY64 = bytes(range(100, 164))


def cape_python_token(value: str, key: bytes, encoding: str = "utf-8") -> str:
    # cape-python: AES.new(key, AES.MODE_SIV).encrypt_and_digest(x) -> tag.hex() + ct.hex(),
    # i.e. RFC 5297's SIV || C with no associated data, which cryptography's AESSIV
    # returns as one string. Always available (cryptography is a core dependency).
    return AESSIV(key).encrypt(value.encode(encoding), None).hex()


def pycryptodome_token(value: str, key: bytes) -> str | None:
    """cape-python's own library, where installed (the dev extra has it): a second reference."""
    try:
        from Crypto.Cipher import AES
    except ImportError:
        return None
    ct, tag = AES.new(key, AES.MODE_SIV).encrypt_and_digest(value.encode("utf-8"))
    return tag.hex() + ct.hex()


def policy(*transforms: dict, column: str = "x") -> dict:
    return {
        "label": "rev",
        "rules": [{"match": {"name": column}, "actions": [{"transform": t} for t in transforms]}],
    }


def tokenize(values: pa.Array, key: bytes = KEY32, **params) -> list[str | None]:
    t = {"type": "reversible-tokenizer", "key": {"secret": "k"}, **params}
    out = cape.apply_policy(policy(t), pa.table({"x": values}), keys={"k": key}, audit=MemorySink())
    col = out.column("x").combine_chunks()
    col.validate(full=True)
    return col.to_pylist()


def reverse(tokens: pa.Array, key: bytes = KEY32, **params) -> list[str | None]:
    t = {"type": "token-reverser", "key": {"secret": "k"}, **params}
    out = cape.apply_policy(policy(t), pa.table({"x": tokens}), keys={"k": key}, audit=MemorySink())
    col = out.column("x").combine_chunks()
    col.validate(full=True)
    return col.to_pylist()


# -- RFC 5297 ------------------------------------------------------------------------------

RFC5297 = [
    # (key, associated data components, plaintext, output = SIV || ciphertext)
    pytest.param(
        "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",
        ["101112131415161718191a1b1c1d1e1f2021222324252627"],
        "112233445566778899aabbccddee",
        "85632d07c6e8f37f950acd320a2ecc9340c02b9690c4dc04daef7f6afe5c",
        id="A.1-deterministic",
    ),
    # A.2: nonce-based; the nonce is the last associated-data component.
    pytest.param(
        "7f7e7d7c7b7a79787776757473727170404142434445464748494a4b4c4d4e4f",
        [
            "00112233445566778899aabbccddeeffdeaddadadeaddadaffeeddccbbaa99887766554433221100",
            "102030405060708090a0",
            "09f911029d74e35bd84156c5635688c0",
        ],
        "7468697320697320736f6d6520706c61696e7465787420746f20656e637279707420"
        "7573696e67205349562d414553",
        "7bdb6e3b432667eb06f4d14bff2fbd0fcb900f2fddbe404326601965c889bf17"
        "dba77ceb094fa663b7a3f748ba8af829ea64ad544a272e9c485b62a3fd5c0d",
        id="A.2-nonce-based",
    ),
]


@pytest.mark.parametrize(("key", "ad", "plaintext", "output"), RFC5297)
def test_rfc5297_vectors(key: str, ad: list[str], plaintext: str, output: str) -> None:
    cipher = AESSIV(bytes.fromhex(key))
    components = [bytes.fromhex(a) for a in ad]
    assert siv_encrypt(cipher, [bytes.fromhex(plaintext)], components)[0].hex() == output
    assert siv_decrypt(cipher, [bytes.fromhex(output)], components)[0].hex() == plaintext
    with pytest.raises(InvalidTag):
        siv_decrypt(cipher, [bytes.fromhex(output)], components[:-1])


# -- cape-python compatibility -------------------------------------------------------------

VALUES = [
    "alice@example.com",  # ASCII
    "",  # empty string: a tag and no ciphertext
    "Zoë Ñúñez",  # Latin-1 range
    "数据隐私",  # CJK
    "\U0001d518\U0001d52b\U0001d526 \U0001f389",  # astral plane (Fraktur letters, emoji)
    "x" * 5000,  # longer than many AES blocks
]


def test_tokens_equal_cape_python_with_a_32_byte_key() -> None:
    got = tokenize(pa.array(VALUES))
    assert got == [cape_python_token(v, KEY32) for v in VALUES]


@pytest.mark.parametrize("key", [KEY32, KEY64], ids=["aes-128-siv", "aes-256-siv"])
def test_the_two_references_agree(key: bytes) -> None:
    if pycryptodome_token("a", key) is None:
        pytest.skip("pycryptodome (cape-python's library) is not installed")
    assert [cape_python_token(v, key) for v in VALUES] == [
        pycryptodome_token(v, key) for v in VALUES
    ]


def test_64_byte_key_is_aes_256_siv() -> None:
    # pycryptodome takes a 64-byte SIV key too (AES-256-SIV).
    assert tokenize(pa.array(VALUES), KEY64) == [cape_python_token(v, KEY64) for v in VALUES]


def test_cape_python_plain_string_key_is_its_utf8_bytes() -> None:
    key = "0123456789abcdef0123456789abcdeF"
    pol = policy({"type": "reversible-tokenizer", "key": key})
    out = cape.apply_policy(pol, pd.DataFrame({"x": VALUES}), audit=MemorySink())
    assert out["x"].tolist() == [cape_python_token(v, key.encode("utf-8")) for v in VALUES]


def test_direct_call_equals_cape_python() -> None:
    ctx = ColumnContext("x", key=KEY32)
    out = ReversibleTokenizer(key={"secret": "k"}).apply(pa.array(["a", None, "a"]), ctx)
    token = cape_python_token("a", KEY32)
    assert out.to_pylist() == [token, None, token]
    assert TokenReverser(key={"secret": "k"}).apply(out, ctx).to_pylist() == ["a", None, "a"]


# -- round trips ---------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(st.one_of(st.none(), st.text(), st.sampled_from(["", "dup"]))),
    key=st.sampled_from([KEY32, KEY64]),
    cut=st.integers(min_value=0, max_value=40),
)
def test_round_trip_property(values: list[str | None], key: bytes, cut: int) -> None:
    ctx = ColumnContext("x", key=key)
    arr = pa.array(values, pa.string())
    tokens = ReversibleTokenizer(key={"secret": "k"}).apply(arr, ctx)
    tokens.validate(full=True)
    assert TokenReverser(key={"secret": "k"}).apply(tokens, ctx).to_pylist() == values
    # The same tokens whatever the batch split.
    cut = min(cut, len(values))
    halves = [
        ReversibleTokenizer(key={"secret": "k"}).apply(part, ctx).to_pylist()
        for part in (arr.slice(0, cut), arr.slice(cut))
    ]
    assert halves[0] + halves[1] == tokens.to_pylist()


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(pa.array(["a", None, "b", "a"]), id="nulls"),
        pytest.param(pa.array([None, None], pa.string()), id="all-null"),
        pytest.param(pa.array([], pa.string()), id="empty-array"),
        pytest.param(pa.array(["", ""]), id="empty-strings"),
        pytest.param(pa.array(["ab€" * (1 << 18)]), id="one-mebibyte-string"),
        pytest.param(pa.array(["q", "r", None, "q"]).dictionary_encode(), id="dictionary"),
        pytest.param(pa.array(["q", None], pa.large_string()), id="large-string"),
    ],
)
def test_round_trip_through_a_policy(values: pa.Array) -> None:
    pol = policy(
        {"type": "reversible-tokenizer", "key": {"secret": "k"}},
        {"type": "token-reverser", "key": {"secret": "k"}},
    )
    out = cape.apply_policy(pol, pa.table({"x": values}), keys={"k": KEY32}, audit=MemorySink())
    original = values.dictionary_decode() if pa.types.is_dictionary(values.type) else values
    assert out.column("x").to_pylist() == original.to_pylist()


@pytest.mark.parametrize(
    ("array", "text"),
    [
        (pa.array([123, None], pa.int64()), ["123", None]),  # str(int)
        (pa.array([True]), ["true"]),  # bool
        (pa.array([0], pa.date32()), ["1970-01-01"]),  # ISO date
    ],
)
def test_non_strings_are_tokenized_as_their_canonical_text(array: pa.Array, text: list) -> None:
    tokens = tokenize(array)
    assert tokens == [None if t is None else cape_python_token(t, KEY32) for t in text]
    assert reverse(pa.array(tokens, pa.string())) == text


def test_binary_and_nested_columns_are_refused() -> None:
    for typ in (pa.binary(), pa.list_(pa.string())):
        with pytest.raises(cape.PlanError, match="reversible-tokenizer needs strings"):
            cape.build_plan(
                policy({"type": "reversible-tokenizer", "key": {"secret": "k"}}),
                pa.schema([("x", typ)]),
                keys={"k": KEY32},
            )
    with pytest.raises(cape.PlanError, match="token-reverser needs a string column"):
        cape.build_plan(
            policy({"type": "token-reverser", "key": {"secret": "k"}}),
            pa.schema([("x", pa.int64())]),
            keys={"k": KEY32},
        )


# -- encodings -----------------------------------------------------------------------------


def test_latin1_encoding_matches_cape_python_and_round_trips() -> None:
    values = ["Zoë", "façade", None]
    tokens = tokenize(pa.array(values), encoding="latin-1")
    assert tokens == [None if v is None else cape_python_token(v, KEY32, "latin-1") for v in values]
    assert reverse(pa.array(tokens), encoding="latin-1") == values


@pytest.mark.parametrize(
    ("action", "values", "params", "match"),
    [
        # '€' has no Latin-1 byte.
        (
            "tokenize",
            ["ok", "€uro"],
            {"encoding": "latin-1"},
            r"row 1 cannot be encoded as latin-1",
        ),
        # A Latin-1 token read back as UTF-8: b"\xe9" is not UTF-8.
        ("reverse", ["ok", "é"], {}, r"row 1 decrypts to bytes that are not valid utf-8"),
    ],
)
def test_encoding_errors_name_the_row(action: str, values: list, params: dict, match: str) -> None:
    if action == "tokenize":
        with pytest.raises(cape.TransformError, match=match):
            tokenize(pa.array(values), **params)
    else:
        tokens = tokenize(pa.array(values), encoding="latin-1")
        with pytest.raises(cape.TransformError, match=match):
            reverse(pa.array(tokens), **params)
        assert reverse(pa.array(tokens), on_error="null") == ["ok", None]


def test_unknown_encoding_is_a_policy_error() -> None:
    with pytest.raises(cape.PolicyError, match=r"unknown text encoding 'klingon'"):
        cape.load_policy(
            policy({"type": "reversible-tokenizer", "key": {"secret": "k"}, "encoding": "klingon"})
        )


# -- invalid tokens ------------------------------------------------------------------------


def _good() -> str:
    ctx = ColumnContext("x", key=KEY32)
    return ReversibleTokenizer(key={"secret": "k"}).apply(pa.array(["hello"]), ctx)[0].as_py()


def _flip(token: str) -> str:
    last = "0" if token[-1] != "0" else "1"
    return token[:-1] + last


BAD_TOKENS = [
    # (how the token is made, message)
    pytest.param(lambda good: "zz" * 20, r"row 1 is not hexadecimal", id="not-hex"),
    pytest.param(lambda good: good[:-1], r"row 1 is not hexadecimal", id="odd-length"),
    pytest.param(lambda good: good[:30], r"row 1 is too short \(30 hex characters", id="too-short"),
    pytest.param(lambda good: "", r"row 1 is too short \(0 hex", id="empty-token"),
    pytest.param(_flip, r"row 1 does not authenticate with this key", id="altered-ciphertext"),
    pytest.param(lambda good: "00" * 20, r"row 1 does not authenticate", id="forged"),
    pytest.param(
        lambda good: (
            ReversibleTokenizer(key={"secret": "k"})
            .apply(pa.array(["hello"]), ColumnContext("x", key=KEY64))[0]
            .as_py()
        ),
        r"row 1 does not authenticate",
        id="made-with-another-key",
    ),
]


@pytest.mark.parametrize(("make", "match"), BAD_TOKENS)
def test_invalid_tokens_are_errors_or_nulls(make, match: str) -> None:
    good = _good()
    bad = make(good)
    tokens = pa.array([good, bad, None, bad])
    with pytest.raises(cape.TransformError, match=match) as info:
        reverse(tokens)
    message = str(info.value)
    assert "column 'x'" in message and "rules[0].actions[0]" in message
    if len(bad) >= 8:
        assert bad not in message  # the token is not echoed
    assert KEY32.hex() not in message
    assert reverse(tokens, on_error="null") == ["hello", None, None, None]


def test_reverser_reports_the_first_row_of_a_repeated_bad_token() -> None:
    good = _good()
    tokens = pa.array([good, good, None, "nothex!", "nothex!"]).dictionary_encode()
    with pytest.raises(cape.TransformError, match=r"row 3 is not hexadecimal"):
        TokenReverser(key={"secret": "k"}).apply(tokens, ColumnContext("x", key=KEY32))


# -- keys ----------------------------------------------------------------------------------

SHORT = "short-inline-secret-1234"  # 24 bytes: not an AES-SIV key


def test_wrong_inline_key_length_fails_at_load_without_showing_the_key() -> None:
    for type_name in ("reversible-tokenizer", "token-reverser"):
        with pytest.raises(cape.PolicyError, match=r"needs a 32- or 64-byte key") as info:
            cape.load_policy(policy({"type": type_name, "key": SHORT}))
        assert SHORT not in str(info.value)
    with pytest.raises(ValidationError, match=r"24 byte\(s\)") as direct_info:
        ReversibleTokenizer(key=SHORT)
    assert SHORT not in str(direct_info.value)


@pytest.mark.parametrize("length", [1, 16, 31, 33, 48, 65])
def test_wrong_named_key_length_fails_at_plan_without_showing_the_key(length: int) -> None:
    key = (b"Qz#7" * 20)[:length]
    schema = pa.schema([("x", pa.string())])
    # below 16 bytes every keyed transformation refuses the key before its own length check
    why = "; keys must be at least 16 bytes" if length < 16 else " long"
    with pytest.raises(KeyFormatError, match=rf"actions\[0\].*{length} byte\(s\){why}") as info:
        cape.build_plan(
            policy({"type": "reversible-tokenizer", "key": {"secret": "k"}}),
            schema,
            keys={"k": key},
        )
    if length >= 3:  # a one- or two-character key could appear anywhere by chance
        assert key.decode() not in str(info.value) and key.hex() not in str(info.value)


def test_wrong_key_length_in_a_direct_call_is_a_transform_error() -> None:
    with pytest.raises(cape.TransformError, match=r"needs a 32- or 64-byte key"):
        TokenReverser(key={"secret": "k"}).apply(pa.array(["00"]), ColumnContext("x", key=b"k"))


def test_key_is_never_shown() -> None:
    secret = "inline-secret-32-bytes-long-0001"
    assert len(secret.encode()) == 32
    schema = pa.schema([("x", pa.string())])
    for type_name in ("reversible-tokenizer", "token-reverser"):
        t = (
            ReversibleTokenizer(key=secret)
            if type_name == "reversible-tokenizer"
            else (TokenReverser(key=secret))
        )
        plan = cape.build_plan(policy({"type": type_name, "key": secret}), schema)
        for text in (repr(t), str(t), repr(plan), t.model_dump_json(), repr(plan.steps)):
            assert secret not in text
        assert secret.encode() not in pickle.dumps(repr(t))
        assert secret.encode() not in pickle.dumps(repr(plan))
