"""NIST SP 800-38G FF1 over AES, for many numeral strings at once.

FF1 is a ten-round Feistel network whose round function is a CBC-MAC of AES
(the standard's PRF) followed by modular arithmetic on the numerals. The AES
part comes from the ``cryptography`` package only: one ECB encryptor applied to
a whole column of independent blocks, with the CBC chaining (an XOR of the
previous block into the next, as the standard's PRF defines it) done in numpy.
So one round costs a few AES calls over the whole batch, not one call per
value. The published FF1 sample vectors check this module (tests/core).

Strings of the same length and the same tweak length share every shape in the
algorithm (``u``, ``v``, ``b``, ``d``, the block ``P``), so :class:`FF1` works
on one such group at a time. When ``radix**v`` fits 32 bits (``b <= 4``: 16
decimal digits, 12 base-36 characters), the halves and ``y`` fit unsigned
64-bit integers and every round is numpy arithmetic; longer strings take the
same steps on Python integers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BLOCK = 16
ROUNDS = 10
# SP 800-38G Rev. 1: radix**minlen must be at least one million.
MIN_DOMAIN = 1_000_000
MAX_RADIX = 1 << 16

# Halves of the Feistel network: a uint64 array (the fast path) or a list of Python ints.
Numbers = Any


def check_domain(radix: int, length: int) -> str | None:
    """Why FF1 must not encrypt ``length`` numerals of ``radix``, or None when it may."""
    if length < 2:
        return f"FF1 needs at least 2 characters to encrypt, got {length}"
    if radix**length < MIN_DOMAIN:
        return (
            f"{length} characters of radix {radix} give only {radix**length:,} possible values; "
            f"NIST SP 800-38G Rev. 1 requires at least {MIN_DOMAIN:,} (radix**length), because "
            "FF1 on smaller domains can be broken by guessing"
        )
    return None


def _ceil_log2(x: int) -> int:
    """ceil(log2(x)) for x >= 1, exactly (no floating point)."""
    return (x - 1).bit_length()


class FF1:
    """FF1 with one AES key and one radix; encrypts or decrypts groups of equal-shaped strings.

    >>> ff1 = FF1(bytes.fromhex("2B7E151628AED2A6ABF7158809CF4F3C"), 10)
    >>> x = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    >>> "".join(map(str, ff1.encrypt(x, b"")[0]))
    '2433477484'
    """

    def __init__(self, key: bytes, radix: int, *, exact: bool = False):
        if len(key) not in (16, 24, 32):
            raise ValueError("FF1 needs an AES key of 16, 24 or 32 bytes")
        if not 2 <= radix <= MAX_RADIX:
            raise ValueError(f"radix must be between 2 and {MAX_RADIX}")
        self.radix = radix
        # exact: always take the Python-integer path (tests compare the two paths).
        self.exact = exact
        self._cipher = Cipher(algorithms.AES(key), modes.ECB())  # noqa: S305

    def _aes(self, blocks: np.ndarray) -> np.ndarray:
        """AES over each row of a ``(k, 16)`` uint8 array (independent blocks)."""
        data = np.ascontiguousarray(blocks, dtype=np.uint8)
        # ECB is what FF1 specifies here: its PRF is CBC-MAC, chained by the caller.
        enc = self._cipher.encryptor()
        out = enc.update(data.tobytes()) + enc.finalize()
        return np.frombuffer(out, dtype=np.uint8).reshape(data.shape)

    def encrypt(self, numerals: np.ndarray, tweak: bytes | np.ndarray) -> np.ndarray:
        """Encrypt each row of ``numerals`` (``(k, n)`` ints below the radix) under ``tweak``.

        ``tweak`` is one byte string for every row, or a ``(k, t)`` uint8 array
        with one tweak per row.
        """
        return self._run(numerals, tweak, decrypt=False)

    def decrypt(self, numerals: np.ndarray, tweak: bytes | np.ndarray) -> np.ndarray:
        """The inverse of :meth:`encrypt`."""
        return self._run(numerals, tweak, decrypt=True)

    def _run(self, numerals: np.ndarray, tweak: bytes | np.ndarray, *, decrypt: bool) -> np.ndarray:
        x = np.asarray(numerals)
        k, n = x.shape
        problem = check_domain(self.radix, n)
        if problem:
            raise ValueError(problem)
        if isinstance(tweak, bytes | bytearray):
            tweaks = np.broadcast_to(np.frombuffer(bytes(tweak), dtype=np.uint8), (k, len(tweak)))
        else:
            tweaks = np.asarray(tweak, dtype=np.uint8)
        t = tweaks.shape[1]
        radix = self.radix
        u = n // 2
        v = n - u
        b = (_ceil_log2(radix**v) + 7) // 8
        d = 4 * ((b + 3) // 4) + 4
        p = bytes([1, 2, 1]) + radix.to_bytes(3, "big") + bytes([10, u % 256])
        p += n.to_bytes(4, "big") + t.to_bytes(4, "big")
        y_p = self._aes(np.frombuffer(p, dtype=np.uint8)[None, :])[0]
        pad = (-t - b - 1) % BLOCK
        q_len = t + pad + 1 + b
        # Q's bytes before the round number depend only on the tweak: chain the
        # CBC-MAC through its whole blocks once, for all ten rounds.
        fixed_blocks = (t + pad) // BLOCK
        q_head = np.zeros((k, q_len), dtype=np.uint8)
        q_head[:, :t] = tweaks
        state = np.broadcast_to(y_p, (k, BLOCK)).copy()
        for j in range(fixed_blocks):
            state = self._aes(state ^ q_head[:, j * BLOCK : (j + 1) * BLOCK])
        tail = q_head[:, fixed_blocks * BLOCK :]
        fast = b <= 4 and not self.exact
        a_num = _to_numbers(x[:, :u], radix, fast)
        b_num = _to_numbers(x[:, u:], radix, fast)
        mod_u, mod_v = radix**u, radix**v
        order = range(ROUNDS - 1, -1, -1) if decrypt else range(ROUNDS)
        for i in order:
            modulus = mod_u if i % 2 == 0 else mod_v
            source = a_num if decrypt else b_num
            block_tail = tail.copy()
            block_tail[:, -b - 1] = i
            block_tail[:, -b:] = _be_bytes(source, b, fast)
            y = self._round_y(state, block_tail, d, fast)
            if fast:
                m = np.uint64(modulus)
                ym = y % m
                if decrypt:
                    c = (b_num + (m - ym)) % m
                else:
                    c = (a_num + ym) % m
            else:
                if decrypt:
                    c = [(bb - yy) % modulus for bb, yy in zip(b_num, y, strict=True)]
                else:
                    c = [(aa + yy) % modulus for aa, yy in zip(a_num, y, strict=True)]
            if decrypt:
                b_num, a_num = a_num, c
            else:
                a_num, b_num = b_num, c
        out = np.empty((k, n), dtype=np.uint8 if radix <= 256 else np.int64)
        out[:, :u] = _to_numerals(a_num, u, radix, fast)
        out[:, u:] = _to_numerals(b_num, v, radix, fast)
        return out

    def _round_y(self, state: np.ndarray, tail: np.ndarray, d: int, fast: bool) -> Numbers:
        """NUM(S) for one round: finish the CBC-MAC over ``tail``, extend to ``d`` bytes."""
        r = state
        for j in range(tail.shape[1] // BLOCK):
            r = self._aes(r ^ tail[:, j * BLOCK : (j + 1) * BLOCK])
        if fast:
            # d == 8: S is R's first eight bytes.
            return r[:, :8].copy().view(">u8")[:, 0].astype(np.uint64)
        parts = [r]
        for j in range(1, (d + BLOCK - 1) // BLOCK):
            counter = np.zeros(BLOCK, dtype=np.uint8)
            counter[-8:] = np.frombuffer(j.to_bytes(8, "big"), dtype=np.uint8)
            parts.append(self._aes(r ^ counter))
        s = np.concatenate(parts, axis=1)[:, :d]
        return [int.from_bytes(s[i].tobytes(), "big") for i in range(s.shape[0])]


def _to_numbers(digits: np.ndarray, radix: int, fast: bool) -> Numbers:
    """NUM_radix of each row, as uint64 (fast) or Python ints."""
    k, m = digits.shape
    if fast:
        acc = np.zeros(k, dtype=np.uint64)
        r = np.uint64(radix)
        for j in range(m):
            acc = acc * r + digits[:, j].astype(np.uint64)
        return acc
    out = []
    for row in digits.tolist():
        total = 0
        for dgt in row:
            total = total * radix + dgt
        out.append(total)
    return out


def _to_numerals(numbers: Numbers, m: int, radix: int, fast: bool) -> np.ndarray:
    """STR^m_radix of each number: ``(k, m)`` numerals, most significant first."""
    if fast:
        assert isinstance(numbers, np.ndarray)
        num = numbers.copy()
        # Numeral by numeral into contiguous rows, then transposed: writing
        # columns of a row-major array strides through memory.
        out_t = np.empty((m, len(num)), dtype=np.uint8 if radix <= 256 else np.int64)
        r = np.uint64(radix)
        for j in range(m - 1, -1, -1):
            out_t[j] = num % r
            num //= r
        return out_t.T
    rows = []
    for value in numbers:
        row = [0] * m
        for j in range(m - 1, -1, -1):
            value, row[j] = divmod(value, radix)
        rows.append(row)
    return np.array(rows, dtype=np.int64).reshape(len(rows), m)


def _be_bytes(numbers: Numbers, width: int, fast: bool) -> np.ndarray:
    """Each number as ``width`` big-endian bytes: a ``(k, width)`` uint8 array."""
    if fast:
        assert isinstance(numbers, np.ndarray)
        full = numbers.astype(">u8").view(np.uint8).reshape(-1, 8)
        return full[:, 8 - width :]
    data = b"".join(int(v).to_bytes(width, "big") for v in numbers)
    return np.frombuffer(data, dtype=np.uint8).reshape(len(numbers), width)
