"""AES-SIV (RFC 5297) over a whole column at once, built on AES from the ``cryptography`` package.

``cryptography``'s ``AESSIV`` seals one value per call, and each call sets up
a fresh OpenSSL context and key schedule: about 0.7 us per value, far more
than the AES work in it. Here every value of a batch is sealed or opened
together: RFC 5297's S2V (AES-CMAC, RFC 4493) and its counter mode are
written as a few AES calls over all values' blocks at once (AES-ECB over
independent blocks, SP 800-38A), with the chaining, padding, doubling and
XORs done by numpy over the whole batch. AES itself is only ever
``cryptography``'s. The RFC 5297 vectors and ``cryptography``'s ``AESSIV`` on
random keys, lengths and batches check this module (tests/core/test_fast_paths.py).

Values are passed as one byte buffer with per-value start offsets and
lengths (an Arrow string/binary array's buffers), so no Python object is made
per value. Associated data, when given, is the same for every value; the
tokenizers pass none.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from ._prf import encrypt_blocks

BLOCK = 16
# Value-blocks per numpy pass: each temporary (values x blocks x 16 bytes) stays at
# 64 KiB whatever the batch size, under glibc's 128 KiB mmap threshold. Larger ones
# are mapped and unmapped by every numpy call where that threshold is fixed, as it is
# in Dask's worker processes (Dask sets MALLOC_TRIM_THRESHOLD_, which fixes it): with
# 32,768 the bench's reversible column cost 2.3x its time there (0.49 s against 0.21 s
# per million rows), with 4,096 1.5x; elsewhere the two sizes measure the same.
_CHUNK = 1 << 12
_RB = 0x87  # RFC 4493's R_128 constant for doubling in GF(2^128)


def _aes(key: bytes, blocks: np.ndarray) -> np.ndarray:
    """AES-encrypt each row of a (m, 16) uint8 array."""
    if len(blocks) == 0:
        return blocks.copy()
    out = encrypt_blocks(key, np.ascontiguousarray(blocks).view("<u8").reshape(-1, 2))
    return out.view(np.uint8).reshape(-1, BLOCK)


def _dbl(block: bytes) -> bytes:
    """RFC 5297's dbl(): multiply by x in GF(2^128) (shift left one bit, reduce by R_128)."""
    n = int.from_bytes(block, "big") << 1
    if n >> 128:
        n = (n & ((1 << 128) - 1)) ^ _RB
    return n.to_bytes(BLOCK, "big")


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _cmac_one(key: bytes, message: bytes, k1: bytes, k2: bytes) -> bytes:
    """AES-CMAC of one short message (RFC 4493), for the per-key constants."""
    n = max(1, -(-len(message) // BLOCK))
    complete = len(message) > 0 and len(message) % BLOCK == 0
    last = message[(n - 1) * BLOCK :]
    last = _xor(last, k1) if complete else _xor(last + b"\x80" + bytes(BLOCK - 1 - len(last)), k2)
    x = bytes(BLOCK)
    for i in range(n - 1):
        block = np.frombuffer(_xor(x, message[i * BLOCK : (i + 1) * BLOCK]), np.uint8)
        x = _aes(key, block[None]).tobytes()
    return _aes(key, np.frombuffer(_xor(x, last), np.uint8)[None]).tobytes()


class BulkSiv:
    """AES-SIV under one 32- or 64-byte key, sealing and opening many values per call.

    The key's first half keys S2V (CMAC), the second half the counter mode,
    as RFC 5297 says. The object holds key material: it is kept in a plan
    step's per-process state, never pickled, logged or shown (its repr is the
    default one, which shows no attribute).
    """

    def __init__(self, key: bytes, associated_data: list[bytes] | None = None):
        if len(key) not in (32, 64):
            raise ValueError("AES-SIV needs a 32- or 64-byte key")
        half = len(key) // 2
        self._mac_key = key[:half]
        self._ctr_key = key[half:]
        zero = np.zeros((1, BLOCK), np.uint8)
        k1 = _dbl(_aes(self._mac_key, zero).tobytes())
        k2 = _dbl(k1)
        # S2V's running value after the associated data, the same for every value.
        d = _cmac_one(self._mac_key, bytes(BLOCK), k1, k2)
        for component in associated_data or []:
            d = _xor(_dbl(d), _cmac_one(self._mac_key, component, k1, k2))
        self._k1 = np.frombuffer(k1, np.uint8)
        self._k2 = np.frombuffer(k2, np.uint8)
        self._d = np.frombuffer(d, np.uint8)
        self._dbl_d = np.frombuffer(_dbl(d), np.uint8)

    # ----------------------------------------------------------------- helpers

    def _s2v(self, plain: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """S2V's output V (m, 16) for rows of ``plain`` (m, width) holding ``lengths`` bytes.

        Every row of a call spans the same number of CMAC blocks (``width / 16``
        for T = the plaintext, or one block for plaintexts shorter than 16).
        """
        m, width = plain.shape
        long_rows = lengths >= BLOCK
        # Plaintexts of a block or more: T = P xorend D (D over the last 16 bytes);
        # shorter ones: T = dbl(D) xor pad(P), exactly one block.
        t = plain ^ _placed(self._d, np.where(long_rows, lengths - BLOCK, 0), width)
        if not long_rows.all():
            short = np.flatnonzero(~long_rows)
            padded = plain[short, :BLOCK] | _placed(_PAD, lengths[short], BLOCK)
            t[short, :BLOCK] = padded ^ self._dbl_d
        t_len = np.maximum(lengths, BLOCK)
        n = width // BLOCK
        # CMAC's last block: a complete one is XORed with K1, a partial one padded
        # (0x80 then zeros) and XORed with K2.
        complete = t_len % BLOCK == 0
        if not complete.all():
            partial = np.flatnonzero(~complete)
            t[partial] |= _placed(_PAD, t_len[partial], width)
        t[:, (n - 1) * BLOCK :] ^= np.where(complete[:, None], self._k1, self._k2)
        x = np.zeros((m, BLOCK), np.uint8)
        for i in range(n):
            x ^= t[:, i * BLOCK : (i + 1) * BLOCK]
            x = _aes(self._mac_key, x)
        return x

    def _keystream(self, v: np.ndarray, blocks: int) -> np.ndarray:
        """CTR keystream (m, blocks * 16) from each row's SIV ``v``."""
        q = v.copy()
        # RFC 5297: Q = V with bits 63 and 31 cleared, so that the low 32-bit
        # counter word cannot carry for any value shorter than 32 GiB.
        q[:, 8] &= 0x7F
        q[:, 12] &= 0x7F
        counters = np.repeat(q[:, None, :], blocks, axis=1)
        if blocks > 1:
            low = counters[:, :, 12:].copy().view(">u4")[..., 0]
            low += np.arange(blocks, dtype=np.uint32)[None, :]
            counters[:, :, 12:] = low.astype(">u4")[..., None].view(np.uint8)
        return _aes(self._ctr_key, counters.reshape(-1, BLOCK)).reshape(len(v), blocks * BLOCK)

    # -------------------------------------------------------------------- API

    def seal(
        self, data: np.ndarray, starts: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """SIV || ciphertext of each value, in order: (bytes, int64 offsets)."""
        lengths = lengths.astype(np.int64, copy=False)
        padded = _padded(data)
        parts = []
        for n, idx in _groups(lengths):
            lens = lengths[idx]
            plain = _gather(padded, starts[idx], lens, n * BLOCK)
            v = self._s2v(plain, lens)
            sealed = np.concatenate([v, plain ^ self._keystream(v, n)], axis=1)
            parts.append((idx, sealed, lens + BLOCK))
        return _in_order(parts, len(lengths))

    def open(
        self, data: np.ndarray, starts: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(plaintext bytes, int64 offsets, authentic mask) of sealed values at least 16 bytes long.

        A value that does not authenticate gets an empty plaintext and False.
        """
        lengths = lengths.astype(np.int64, copy=False)
        if len(lengths) and int(lengths.min()) < BLOCK:
            raise ValueError("a sealed value is shorter than its SIV")
        plain_len = lengths - BLOCK
        ok = np.ones(len(lengths), bool)
        padded = _padded(data)
        parts = []
        for n, idx in _groups(plain_len):
            lens = plain_len[idx]
            sealed = _gather(padded, starts[idx], lengths[idx], (n + 1) * BLOCK)
            v = sealed[:, :BLOCK]
            plain = sealed[:, BLOCK:] ^ self._keystream(v, n)
            plain &= _placed(_ONES, lens, n * BLOCK)
            good = (self._s2v(plain, lens) == v).all(axis=1)
            ok[idx] = good
            parts.append((idx, plain, np.where(good, lens, 0)))
        out, offsets = _in_order(parts, len(lengths))
        return out, offsets, ok


# Small patterns cut out per row by a sliding window (see _placed).
_PAD = np.array([0x80], np.uint8)
_ONES = np.full(1, 0xFF, np.uint8)


def _placed(pattern: np.ndarray, at: np.ndarray, width: int) -> np.ndarray:
    """A (m, width) matrix whose row i holds ``pattern`` from column ``at[i]``, zeros elsewhere.

    For ``_ONES`` (a single 0xFF) every column from ``at[i]`` on is 0xFF; used
    inverted as a "before ``at[i]``" mask. Rows are cut from one small padded
    array by a sliding window, a plain row copy each.
    """
    if pattern is _ONES:
        line = np.concatenate([np.full(width, 0xFF, np.uint8), np.zeros(width, np.uint8)])
        # Row i: 0xFF for columns below at[i], zero from there on.
        return np.lib.stride_tricks.sliding_window_view(line, width)[width - at]
    line = np.zeros(2 * width + len(pattern), np.uint8)
    line[width : width + len(pattern)] = pattern
    windows = np.lib.stride_tricks.sliding_window_view(line, width)
    return windows[width - at]


def _padded(data: np.ndarray) -> np.ndarray:
    """``data`` and 32 zero bytes: a group's width exceeds a value's length by at most 31."""
    padded = np.zeros(len(data) + 2 * BLOCK, np.uint8)
    padded[: len(data)] = data
    return padded


def _gather(padded: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """A (m, width) matrix of each value's bytes, zero beyond its length (see :func:`_padded`)."""
    rows = np.lib.stride_tricks.sliding_window_view(padded, width)
    rows = rows[starts]
    rows &= _placed(_ONES, lengths, width)
    return rows


def _groups(lengths: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(blocks, row indices) of the rows whose S2V input spans that many blocks, in chunks."""
    t_len = np.maximum(lengths, BLOCK)
    blocks = t_len // BLOCK + (t_len % BLOCK != 0)
    kinds = np.unique(blocks)
    for n in kinds:
        idx = np.arange(len(blocks)) if len(kinds) == 1 else np.flatnonzero(blocks == n)
        step = max(1, _CHUNK // int(n))
        for s in range(0, len(idx), step):
            yield int(n), idx[s : s + step]


def _in_order(
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate each part's rows (the first ``lengths`` bytes of each) back into row order."""
    datas = []
    lengths = []
    order = []
    for idx, rows, lens in parts:
        inside = _placed(_ONES, lens, rows.shape[1]).view(bool)
        datas.append(rows[inside])
        lengths.append(lens)
        order.append(idx)
    if not parts:
        return np.zeros(0, np.uint8), np.zeros(count + 1, np.int64)
    data = np.concatenate(datas)
    lens = np.concatenate(lengths)
    offsets = np.zeros(count + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    idx = np.concatenate(order)
    if np.array_equal(idx, np.arange(count)):
        return data, offsets
    # Rows were processed by group: put them back in order with one Arrow take.
    grouped = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), count, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )
    inverse = np.empty(count, np.int64)
    inverse[idx] = np.arange(count)
    ordered = grouped.take(pa.array(inverse))
    offs = np.frombuffer(ordered.buffers()[1], np.int64)[: count + 1]
    out = np.frombuffer(ordered.buffers()[2], np.uint8)[offs[0] : offs[-1]]
    return out, offs - offs[0]
