"""The tokenizer's native batch hash (DataFusion's SHA-256) against the standard library.

Every check here compares with ``hmac``/``hashlib`` or RFC 4231's published
vectors, on batches large enough to take the native path (a spy proves it was
taken), and both tokenizer algorithms must give the hashlib loop's bytes for
every value: ASCII and multi-byte text, empty values, values around SHA-256's
block and padding boundaries, binary, large types, nulls, cut tokens, keys
longer than a block. A process forked after DataFusion ran must not use it
(its runtime threads are not copied by fork) and must still finish with the
same bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import signal
import threading
import time

import pyarrow as pa
import pytest

from cape_pipelines.transforms import _native_sha256 as native
from cape_pipelines.transforms.base import ColumnContext
from cape_pipelines.transforms.tokenize import Tokenizer

REQUIRE = os.environ.get("CAPE_REQUIRE_ALL_ENGINES", "") not in ("", "0")
try:
    import datafusion  # noqa: F401

    HAVE_DATAFUSION = True
except ImportError:
    HAVE_DATAFUSION = False

if not HAVE_DATAFUSION and REQUIRE:
    pytest.fail("datafusion (cape-pipelines[fast]) is missing and CAPE_REQUIRE_ALL_ENGINES is set")
pytestmark = pytest.mark.skipif(not HAVE_DATAFUSION, reason="datafusion is not installed")

KEY = b"native-sha256-test-key-0123456789"
N = native.MIN_VALUES + 1000


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the values hashed through DataFusion, so a test knows the native path ran."""
    seen: list[int] = []
    real = native._chunk

    def counting(ctx, values, expr):  # type: ignore[no-untyped-def]
        seen.append(len(values))
        return real(ctx, values, expr)

    monkeypatch.setattr(native, "_chunk", counting)
    return seen


def tokens(array: pa.Array, key: bytes = KEY, **params: object) -> list[str | None]:
    out = Tokenizer(key={"secret": "k"}, **params).apply(array, ColumnContext("x", key=key))
    out.validate(full=True)
    return out.to_pylist()


def expected_hmac(values: list[bytes | None], key: bytes = KEY, cut: int = 64) -> list:
    return [
        None if v is None else hmac.new(key, v, hashlib.sha256).hexdigest()[:cut] for v in values
    ]


def varied(n: int) -> list[bytes]:
    """Distinct values of every length from 0 to 200 bytes (block and padding edges included)."""
    out = []
    for i in range(n):
        length = i % 201
        body = f"{i:08d}-é数-".encode() * (length // 14 + 1)
        out.append(body[:length] if length >= 8 else f"{i}".encode()[:length] + bytes([i % 256]))
    return out


@pytest.mark.parametrize(
    ("key_hex", "data", "expected"),
    [
        (
            "0b" * 20,
            b"Hi There",
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
        ),
        (
            "4a656665",
            b"what do ya want for nothing?",
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
        ),
        (
            "aa" * 20,
            b"\xdd" * 50,
            "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
        ),
        (
            "aa" * 131,
            b"Test Using Larger Than Block-Size Key - Hash Key First",
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
        ),
        (
            "aa" * 131,
            b"This is a test using a larger than block-size key and a larger than block-size data."
            b" The key needs to be hashed before being used by the HMAC algorithm.",
            "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
        ),
    ],
    ids=["case-1", "case-2", "case-3", "case-6", "case-7"],
)
def test_rfc4231_vectors_through_the_batch_hmac(
    key_hex: str, data: bytes, expected: str, spy: list[int]
) -> None:
    from cape_pipelines.transforms.tokenize import hmac_pads

    key = bytes.fromhex(key_hex)
    # The vector's data at every position of a batch long enough for the native path.
    values = pa.array([data] * N, pa.binary())
    digests = native.hmac_sha256_digests(values, *hmac_pads(key))
    assert digests is not None and spy
    assert len(digests) == 32 * N
    assert {digests[i : i + 32].hex() for i in range(0, len(digests), 32)} == {expected}


@pytest.mark.parametrize("typ", [pa.string(), pa.large_string(), pa.binary(), pa.large_binary()])
def test_hmac_tokens_equal_the_standard_library(typ: pa.DataType, spy: list[int]) -> None:
    raw = varied(N)
    values: list = [v.decode("utf-8", "replace").encode() for v in raw]
    values[5] = None
    values[700] = None
    array = pa.array([None if v is None else v.decode() for v in values], typ)
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        values = list(raw)
        values[5] = values[700] = None
        array = pa.array(values, typ)
    assert tokens(array) == expected_hmac(values)
    assert sum(spy) >= N


def test_more_values_than_one_native_call(spy: list[int]) -> None:
    values = [f"user{i}@example.com".encode() for i in range(native.CHUNK * 2 + 17)]
    assert tokens(pa.array(values, pa.binary())) == expected_hmac(values)
    assert max(spy) <= native.CHUNK and len(spy) == 3


@pytest.mark.parametrize("cut", [1, 7, 16, 63, 64])
def test_cut_tokens_are_prefixes(cut: int, spy: list[int]) -> None:
    values = varied(N)
    assert tokens(pa.array(values, pa.binary()), max_token_len=cut) == expected_hmac(
        values, cut=cut
    )
    assert spy


@pytest.mark.parametrize(
    "key",
    [
        b"k" * 16,
        b"a-32-byte-key-for-the-tokenizer!",
        os.urandom(64),
        os.urandom(65),
        os.urandom(200),
    ],
)
def test_every_key_length(key: bytes, spy: list[int]) -> None:
    values = varied(N)
    assert tokens(pa.array(values, pa.binary()), key) == expected_hmac(values, key)
    assert spy


def test_cape_sha256_equals_cape_python(spy: list[int]) -> None:
    values = [f"customer-{i}-Zoë".encode() for i in range(N)]
    got = tokens(pa.array([v.decode() for v in values]), algorithm="cape-sha256")
    assert got == [hashlib.sha256(v + KEY).hexdigest() for v in values]
    assert spy


def test_repeated_values_are_split_then_gathered(spy: list[int]) -> None:
    # 3% distinct: the batch is split into its distinct values; still above the native floor.
    distinct = [f"country-{i}".encode() for i in range(native.MIN_VALUES + 10)]
    values = [distinct[(i * 7919) % len(distinct)] for i in range(len(distinct) * 30)]
    assert tokens(pa.array(values, pa.binary())) == expected_hmac(values)
    assert sum(spy) < len(values)


def test_short_columns_stay_on_hashlib(spy: list[int]) -> None:
    values = varied(native.MIN_VALUES - 1)
    assert tokens(pa.array(values, pa.binary())) == expected_hmac(values)
    assert not spy


def test_same_tokens_without_datafusion(monkeypatch: pytest.MonkeyPatch) -> None:
    values = varied(N)
    with_native = tokens(pa.array(values, pa.binary()))
    monkeypatch.setattr(native, "_session", lambda: None)
    assert not native.available()
    assert tokens(pa.array(values, pa.binary())) == with_native == expected_hmac(values)


@pytest.mark.parametrize("algorithm", ["hmac-sha256", "cape-sha256"])
def test_same_tokens_where_datafusion_cannot_be_imported(
    monkeypatch: pytest.MonkeyPatch, algorithm: str
) -> None:
    # As in an environment without the fast extra (the Flink venv): importing fails.
    import sys

    values = varied(N)
    expected = tokens(pa.array(values, pa.binary()), algorithm=algorithm)
    monkeypatch.setitem(sys.modules, "datafusion", None)
    monkeypatch.setattr(native, "_local", threading.local())
    monkeypatch.setattr(native, "_disabled", False)
    assert tokens(pa.array(values, pa.binary()), algorithm=algorithm) == expected
    assert not native.available()


def test_threads_hash_at_once(spy: list[int]) -> None:
    # Dask's threaded scheduler calls the core from several threads: one session each.
    values = [[*varied(N)[i:], f"t{i}".encode()] for i in range(4)]
    results: dict[int, list] = {}

    def work(i: int) -> None:
        results[i] = tokens(pa.array(values[i], pa.binary()))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(results[i] == expected_hmac(values[i]) for i in range(4))


def test_pads_are_not_pickled_or_shown() -> None:
    # The keyed pads live only in the process's step state; a Tokenizer holds no key bytes.
    t = Tokenizer(key={"secret": "k"})
    ctx = ColumnContext("x", key=KEY)
    t.apply(pa.array(varied(N), pa.binary()), ctx)
    assert KEY not in pickle.dumps(t)
    assert KEY.hex() not in repr(t) and "native" not in repr(t)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_after_datafusion_ran_still_tokenizes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """DataFusion's runtime threads are not copied by fork: the child must not wait for them."""
    values = [f"user{i}@example.com".encode() for i in range(300_000)]
    array = pa.array(values, pa.binary())
    before = tokens(array)  # starts DataFusion's runtime in this process
    assert native.available()
    out = tmp_path / "child.bin"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            out.write_bytes(pickle.dumps((native.available(), tokens(array))))
        finally:
            os._exit(0)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung hashing through DataFusion")
    available_in_child, child_tokens = pickle.loads(out.read_bytes())
    assert available_in_child is False
    assert child_tokens == before


def test_no_table_is_left_registered() -> None:
    # DataFusion's from_arrow registers each input under a fresh name; left there,
    # every batch's values (cleartext) would stay in memory for the process's life.
    for _ in range(3):
        tokens(pa.array(varied(N), pa.binary()))
    ctx = native._session()
    assert ctx is not None
    assert not ctx.catalog().schema().table_names()


def test_a_native_failure_falls_back_without_showing_the_key(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    values = varied(N)

    def failing(ctx, values, expr):  # type: ignore[no-untyped-def]
        raise RuntimeError(f"planning failed near literal {KEY!r} {KEY.hex()}")

    monkeypatch.setattr(native, "_chunk", failing)
    monkeypatch.setattr(native, "_disabled", False)
    with caplog.at_level("WARNING"):
        assert tokens(pa.array(values, pa.binary())) == expected_hmac(values)
    assert native._disabled is True
    assert "RuntimeError" in caplog.text
    assert (
        KEY.hex() not in caplog.text
        and repr(KEY) not in caplog.text
        and "literal" not in caplog.text
    )
