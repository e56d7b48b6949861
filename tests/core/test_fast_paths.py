"""The fast paths of the token families give exactly the bytes of their reference definitions.

The tokenizer's HMAC is written with ``hashlib`` states (RFC 2104 with
precomputed pads); it is checked here against ``cryptography``'s HMAC on
random keys and values of every length around SHA-256's 64-byte block and its
55-byte single-block limit, keys longer than a block included. Batches are
tokenized either per distinct value or row by row, chosen from a sampled
estimate; both ways must give the same tokens, nulls and row order. The
whole-batch AES-SIV is checked against RFC 5297's vectors and ``cryptography``'s
``AESSIV`` (random keys, lengths around the block size, batches mixing them),
and the reversible transformations' batches large enough to take it against
``AESSIV`` value by value, bad tokens included.
"""

from __future__ import annotations

import hashlib
import hmac
import random

import numpy as np
import pyarrow as pa
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from cape_pipelines.errors import TransformError
from cape_pipelines.transforms._siv import BulkSiv
from cape_pipelines.transforms._text import distinct_or_rows, estimated_distinct_fraction
from cape_pipelines.transforms.base import ColumnContext
from cape_pipelines.transforms.reversible import ReversibleTokenizer, TokenReverser
from cape_pipelines.transforms.tokenize import Tokenizer, hmac_sha256_digester

KEY = b"fast-path-test-key-0123456789abc"

# Lengths on both sides of SHA-256's padding limit (55), its block (64) and two blocks.
_EDGES = [0, 1, 15, 16, 31, 32, 33, 54, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 200]


def reference_hmac(key: bytes, value: bytes) -> bytes:
    h = crypto_hmac.HMAC(key, hashes.SHA256())
    h.update(value)
    return h.finalize()


@pytest.mark.parametrize("key_len", _EDGES)
def test_hashlib_hmac_equals_cryptography_for_every_key_and_value_length(key_len: int) -> None:
    rng = random.Random(key_len)
    key = rng.randbytes(key_len)
    values = [rng.randbytes(n) for n in _EDGES for _ in range(3)]
    got = hmac_sha256_digester(key)(values)
    assert got == [reference_hmac(key, v) for v in values]


def test_hashlib_hmac_equals_cryptography_on_random_keys_and_values() -> None:
    rng = random.Random(2104)
    for _ in range(200):
        key = rng.randbytes(rng.randrange(0, 300))
        values = [rng.randbytes(rng.randrange(0, 300)) for _ in range(5)]
        assert hmac_sha256_digester(key)(values) == [reference_hmac(key, v) for v in values]


def test_a_digester_is_reusable_and_keyed_state_is_not_shared() -> None:
    # Copies of the precomputed states must leave them untouched between calls.
    digest = hmac_sha256_digester(KEY)
    first = digest([b"alice", b"bob"])
    assert digest([b"alice", b"bob"]) == first
    assert hmac_sha256_digester(KEY + b"!")([b"alice"])[0] != first[0]


def _strings(n: int, distinct_values: int, seed: int, nulls: bool = False) -> pa.Array:
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, distinct_values, n)
    values: list[str | None] = [f"value-{p:08d}" for p in picks]
    if nulls:
        for i in rng.integers(0, n, n // 10):
            values[i] = None
    return pa.array(values, pa.string())


def _expected(array: pa.Array, width: int = 64) -> list[str | None]:
    return [
        None if v is None else hmac.new(KEY, v.encode(), hashlib.sha256).hexdigest()[:width]
        for v in array.to_pylist()
    ]


@pytest.mark.parametrize("nulls", [False, True])
@pytest.mark.parametrize("distinct_values", [20, 50_000])
def test_tokens_are_the_same_split_or_row_by_row(distinct_values: int, nulls: bool) -> None:
    array = _strings(20_000, distinct_values, seed=distinct_values, nulls=nulls)
    out = Tokenizer(key={"secret": "k"}, max_token_len=20).apply(array, ColumnContext("x", key=KEY))
    out.validate(full=True)
    assert out.to_pylist() == _expected(array, 20)


def test_a_sliced_high_cardinality_batch_keeps_its_rows_and_nulls() -> None:
    array = _strings(30_000, 1_000_000, seed=3, nulls=True).slice(777, 20_000)
    assert distinct_or_rows(array, 0.5).indices is None
    out = Tokenizer(key={"secret": "k"}).apply(array, ColumnContext("x", key=KEY))
    out.validate(full=True)
    assert out.null_count == array.null_count
    assert out.to_pylist() == _expected(array)


@pytest.mark.parametrize(
    ("distinct_values", "low", "high"),
    [(1, 0.0, 0.01), (500, 0.0, 0.05), (5_000, 0.02, 0.2), (10_000_000, 0.9, 1.0)],
)
def test_distinct_fraction_estimate(distinct_values: int, low: float, high: float) -> None:
    array = _strings(100_000, distinct_values, seed=11)
    assert low <= estimated_distinct_fraction(array) <= high


def test_split_is_decided_by_the_estimate() -> None:
    few = _strings(100_000, 100, seed=5)
    many = _strings(100_000, 10_000_000, seed=5)
    assert distinct_or_rows(few, 0.5).indices is not None
    assert distinct_or_rows(many, 0.5).indices is None
    # A dictionary array is already split, whatever its cardinality.
    assert distinct_or_rows(many.dictionary_encode(), 0.5).indices is not None


# -- AES-SIV over whole batches -------------------------------------------------------------

RFC5297 = [
    # (key, associated data components, plaintext, output = SIV || ciphertext), RFC 5297 A.1/A.2
    (
        "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",
        ["101112131415161718191a1b1c1d1e1f2021222324252627"],
        "112233445566778899aabbccddee",
        "85632d07c6e8f37f950acd320a2ecc9340c02b9690c4dc04daef7f6afe5c",
    ),
    (
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
    ),
]


def _packed(values: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.array([len(v) for v in values], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return np.frombuffer(b"".join(values), np.uint8), starts, lengths


def _unpacked(data: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    return [data[offsets[i] : offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]


@pytest.mark.parametrize(("key", "ad", "plaintext", "output"), RFC5297)
def test_bulk_siv_rfc5297_vectors(key: str, ad: list[str], plaintext: str, output: str) -> None:
    bulk = BulkSiv(bytes.fromhex(key), [bytes.fromhex(a) for a in ad])
    # The vector's plaintext in a batch with others, so its row is not alone in its group.
    batch = [b"", bytes.fromhex(plaintext), b"x" * 40]
    data, offsets = bulk.seal(*_packed(batch))
    assert _unpacked(data, offsets)[1].hex() == output
    sealed = [bytes.fromhex(output)]
    plain, plain_offsets, ok = bulk.open(*_packed(sealed))
    assert ok.all() and _unpacked(plain, plain_offsets) == [bytes.fromhex(plaintext)]
    # Without the last associated-data component the output must not authenticate.
    other = BulkSiv(bytes.fromhex(key), [bytes.fromhex(a) for a in ad[:-1]])
    assert not other.open(*_packed(sealed))[2].any()


@pytest.mark.parametrize("key_len", [32, 64])
def test_bulk_siv_equals_cryptography_on_random_lengths_and_batches(key_len: int) -> None:
    rng = random.Random(5297 + key_len)
    for trial in range(40):
        key = rng.randbytes(key_len)
        ad = None if trial % 3 else [rng.randbytes(rng.randrange(0, 40))]
        lengths = [rng.choice([0, 1, 15, 16, 17, 31, 32, 33, 48, rng.randrange(0, 200)])]
        lengths += [rng.randrange(0, 70) for _ in range(rng.randrange(0, 80))]
        values = [rng.randbytes(n) for n in lengths]
        data, offsets = BulkSiv(key, ad).seal(*_packed(values))
        reference = [AESSIV(key).encrypt(v, ad) for v in values]
        assert _unpacked(data, offsets) == reference
        plain, plain_offsets, ok = BulkSiv(key, ad).open(*_packed(reference))
        assert ok.all() and _unpacked(plain, plain_offsets) == values


@pytest.mark.parametrize("chunk", [None, 5])
def test_bulk_siv_equals_cryptography_across_its_chunks(chunk: int | None, monkeypatch) -> None:
    # Groups of 1, 2 and 3 blocks, each larger than the value-blocks done per numpy pass
    # (the module's own chunk, then a tiny one), so every group is cut, mid-group included.
    from cape_pipelines.transforms import _siv

    if chunk is not None:
        monkeypatch.setattr(_siv, "_CHUNK", chunk)
    rng = random.Random(4096)
    per_group = _siv._CHUNK + 3 if chunk is None else 23
    values = [rng.randbytes(rng.randrange(lo, hi)) for lo, hi in [(0, 17), (17, 33), (33, 49)]
              for _ in range(per_group)]  # fmt: skip
    rng.shuffle(values)
    key = rng.randbytes(32)
    data, offsets = BulkSiv(key).seal(*_packed(values))
    reference = [AESSIV(key).encrypt(v, None) for v in values]
    assert _unpacked(data, offsets) == reference
    plain, plain_offsets, ok = BulkSiv(key).open(*_packed(reference))
    assert ok.all() and _unpacked(plain, plain_offsets) == values


def test_bulk_siv_rejects_every_altered_byte_and_keeps_the_others() -> None:
    key = bytes(range(32))
    values = [f"value {i}".encode() * (i % 4 + 1) for i in range(50)]
    sealed = [AESSIV(key).encrypt(v, None) for v in values]
    for row in (0, 17, 49):
        for position in range(len(sealed[row])):
            altered = list(sealed)
            flipped = bytearray(altered[row])
            flipped[position] ^= 0x01
            altered[row] = bytes(flipped)
            plain, offsets, ok = BulkSiv(key).open(*_packed(altered))
            assert ok.tolist() == [i != row for i in range(len(values))]
            got = _unpacked(plain, offsets)
            assert got[row] == b""
            assert [g for i, g in enumerate(got) if i != row] == values[:row] + values[row + 1 :]
    wrong = BulkSiv(bytes(range(1, 33))).open(*_packed(sealed))[2]
    assert not wrong.any()


def _siv_hex(value: str, key: bytes) -> str:
    return AESSIV(key).encrypt(value.encode(), None).hex()


SIV_KEY = bytes(range(32))


def _texts(n: int, seed: int) -> list[str | None]:
    rng = random.Random(seed)
    alphabet = "abcxyz@.é数😀 "
    out: list[str | None] = []
    for _ in range(n):
        if rng.random() < 0.1:
            out.append(None)
        else:
            out.append("".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40))))
    return out


@pytest.mark.parametrize(
    "typ", [pa.string(), pa.large_string(), pa.string_view()], ids=["string", "large", "view"]
)
def test_reversible_bulk_path_equals_cryptography_and_round_trips(typ: pa.DataType) -> None:
    values = _texts(3000, seed=1)
    array = pa.array(values, typ).slice(13, 2500)
    ctx = ColumnContext("x", key=SIV_KEY)
    tokens = ReversibleTokenizer(key={"secret": "k"}).apply(array, ctx)
    tokens.validate(full=True)
    expected = [None if v is None else _siv_hex(v, SIV_KEY) for v in values[13 : 13 + 2500]]
    assert tokens.to_pylist() == expected
    back = TokenReverser(key={"secret": "k"}).apply(tokens, ColumnContext("x", key=SIV_KEY))
    back.validate(full=True)
    assert back.to_pylist() == values[13 : 13 + 2500]


def test_reversible_bulk_path_with_few_distinct_values() -> None:
    values = [f"country-{i % 37}" for i in range(5000)]
    ctx = ColumnContext("x", key=SIV_KEY)
    tokens = ReversibleTokenizer(key={"secret": "k"}).apply(pa.array(values), ctx)
    assert tokens.to_pylist() == [_siv_hex(v, SIV_KEY) for v in values]
    back = TokenReverser(key={"secret": "k"}).apply(tokens, ctx)
    assert back.to_pylist() == values


def _bad_batch(bad: str, row: int) -> pa.Array:
    good = [_siv_hex(f"user-{i}@example.com", SIV_KEY) for i in range(1000)]
    good[row] = bad
    good[row + 100] = bad
    return pa.array(good)


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ("zz" * 20, "is not hexadecimal"),
        ("abc" * 11, "is not hexadecimal"),  # odd length
        ("ab" * 10, "is too short"),
        (_siv_hex("user-1@example.com", SIV_KEY)[:-2] + "00", "does not authenticate"),
        (_siv_hex("x", bytes(range(1, 33))), "does not authenticate"),
    ],
)
def test_reverser_bulk_batch_with_a_bad_token_names_its_first_row(bad: str, problem: str) -> None:
    array = _bad_batch(bad, 321)
    reverser = TokenReverser(key={"secret": "k"})
    with pytest.raises(TransformError, match=f"the token at row 321 {problem}"):
        reverser.apply(array, ColumnContext("x", key=SIV_KEY))
    lenient = TokenReverser(key={"secret": "k"}, on_error="null")
    out = lenient.apply(array, ColumnContext("x", key=SIV_KEY)).to_pylist()
    assert out[321] is None and out[421] is None
    assert out[:321] == [f"user-{i}@example.com" for i in range(321)]


def test_reverser_bulk_batch_with_non_utf8_plaintext() -> None:
    tokens = [_siv_hex(f"user-{i}", SIV_KEY) for i in range(1000)]
    tokens[500] = AESSIV(SIV_KEY).encrypt("Zoë".encode("latin-1"), None).hex()
    reverser = TokenReverser(key={"secret": "k"})
    with pytest.raises(TransformError, match="row 500 decrypts to bytes that are not valid utf-8"):
        reverser.apply(pa.array(tokens), ColumnContext("x", key=SIV_KEY))


def test_bulk_cipher_shows_no_key() -> None:
    bulk = BulkSiv(SIV_KEY)
    assert SIV_KEY.hex() not in repr(bulk)
    assert "mac_key" not in repr(bulk)
