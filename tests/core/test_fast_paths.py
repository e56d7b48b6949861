"""The fast paths of the token families give exactly the bytes of their reference definitions.

The tokenizer's HMAC is written with ``hashlib`` states (RFC 2104 with
precomputed pads); it is checked here against ``cryptography``'s HMAC on
random keys and values of every length around SHA-256's 64-byte block and its
55-byte single-block limit, keys longer than a block included. Batches are
tokenized either per distinct value or row by row, chosen from a sampled
estimate; both ways must give the same tokens, nulls and row order.
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

from cape_pipelines.transforms._text import distinct, estimated_distinct_fraction
from cape_pipelines.transforms.base import ColumnContext
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
    assert distinct(array, max_fraction=0.5).indices is None
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
    assert distinct(few, max_fraction=0.5).indices is not None
    assert distinct(many, max_fraction=0.5).indices is None
    # Without a limit every batch is split, as before.
    assert distinct(many).indices is not None
