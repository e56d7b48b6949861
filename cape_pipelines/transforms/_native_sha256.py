"""SHA-256 of many values in one native call, through Apache DataFusion when it is installed.

The tokenizer's keyed hash is HMAC-SHA256 (RFC 2104): two SHA-256 passes per
value. Written as a Python loop over ``hashlib`` states it costs about 0.5 us
per value, nearly all of it Python's per-call overhead rather than SHA-256.
DataFusion (the Apache Arrow project's query engine, ``pip install
cape-pipelines[fast]``) has a vectorised ``sha256`` over Arrow binary columns,
so the tokenizer hands it whole columns and one expression,
``sha256(K0^opad || sha256(K0^ipad || value))``: about 0.18 us per HMAC of a
short value against 0.5 us for the loop. The HMAC construction stays RFC
2104's, checked against the RFC 4231 vectors and against ``hmac`` on random
keys and values; only the SHA-256 implementation differs, and both give the
same bytes. Should a native call fail, the process goes back to ``hashlib``.

Two limits decide when the native call is used, never what it returns:

- A call has a fixed cost (about 0.2 ms: a session, a plan), so columns of
  fewer than :data:`MIN_VALUES` values stay on ``hashlib``.
- DataFusion runs queries on a pool of runtime threads that a ``fork()`` does
  not copy: a forked child that queries it waits for threads that do not exist.
  A process forked after DataFusion was imported therefore never uses it (a
  ``register_at_fork`` hook marks the child), and falls back to ``hashlib``.
  ``cape apply --workers`` forks its workers before any value is hashed, so
  they use it; Spark, Dask and Beam start their Python workers without
  inheriting a running one.

The padded keys are literals of the expression: in memory for the call only,
never logged (a failure logs the exception's class, not its message), and
each call's in-memory table is deregistered as soon as it has run.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import pyarrow as pa

# Below this many values a column is hashed with hashlib: a native call's fixed
# cost (~0.2 ms) is then more than the per-value saving (~0.4 us).
MIN_VALUES = 2048
# Values per native call: bounds the memory a call holds while keeping its
# fixed cost under 1% of the call.
CHUNK = 131072
DIGEST = 32

_log = logging.getLogger(__name__)
_names = itertools.count()
_forked_after_import = False
_local = threading.local()
_disabled = False


def _after_fork_in_child() -> None:
    global _forked_after_import
    if "datafusion" in sys.modules:
        _forked_after_import = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _session() -> Any | None:
    """This thread's DataFusion session, or None where it is not installed or not safe here."""
    global _disabled
    if _forked_after_import or _disabled:
        return None
    ctx = getattr(_local, "ctx", None)
    if ctx is not None:
        return ctx
    try:
        from datafusion import SessionConfig, SessionContext
    except ImportError:
        _disabled = True
        return None
    # One partition: the call runs on one runtime thread, so "per core" stays per core.
    ctx = _local.ctx = SessionContext(SessionConfig().with_target_partitions(1))
    return ctx


def available() -> bool:
    """Whether this process can hash through DataFusion (installed, and not a risky fork)."""
    return _session() is not None


def sha256_digests(values: pa.Array, suffix: bytes) -> bytes | None:
    """SHA-256(v || suffix) of each ``v``, 32 bytes each back to back; None if unusable here."""

    def expression() -> Any:
        from datafusion import col, lit
        from datafusion import functions as f

        return f.sha256(f.concat(col("m"), lit(suffix)))

    return _digests(values, expression)


def hmac_sha256_digests(values: pa.Array, inner_pad: bytes, outer_pad: bytes) -> bytes | None:
    """HMAC-SHA256 of each value (RFC 2104), 32 bytes each back to back; None if unusable here.

    ``inner_pad`` and ``outer_pad`` are ``K0 ^ ipad`` and ``K0 ^ opad`` (64
    bytes each, ``K0`` the block-sized key): the digest is
    ``SHA-256(outer_pad || SHA-256(inner_pad || v))``, one expression per
    chunk, so the inner digests never come back to Python.
    """

    def expression() -> Any:
        # Imported here, once the session exists: where DataFusion is missing (or
        # must not be used) nothing of it is touched.
        from datafusion import col, lit
        from datafusion import functions as f

        inner = f.sha256(f.concat(lit(inner_pad), col("m")))
        return f.sha256(f.concat(lit(outer_pad), inner))

    return _digests(values, expression)


def _digests(values: pa.Array, expression: Callable[[], Any]) -> bytes | None:
    if len(values) < MIN_VALUES or values.null_count:
        return None
    ctx = _session()
    if ctx is None:
        return None
    try:
        expr = expression().alias("d")
        parts = [
            _chunk(ctx, values.slice(start, CHUNK), expr) for start in range(0, len(values), CHUNK)
        ]
        # One copy out of Arrow's buffers (a growing bytearray copies twice).
        return b"".join(parts)
    except Exception as exc:
        # Any failure falls back to hashlib, which gives the same bytes.
        _give_up(type(exc).__name__)
        return None


def _chunk(ctx: Any, values: pa.Array, expr: Any) -> memoryview:
    """One native call over ``values``; its in-memory table is dropped again at once."""
    name = f"cape_values_{next(_names)}"
    frame = ctx.from_arrow(pa.table({"m": values}), name=name)
    try:
        result = frame.select(expr).to_arrow_table()
    finally:
        ctx.deregister_table(name)
    digests = result.column(0).combine_chunks().cast(pa.binary(DIGEST))
    if len(digests) != len(values) or digests.null_count:
        raise RuntimeError("the native SHA-256 returned a different number of digests")
    data = digests.buffers()[1]
    assert data is not None
    return memoryview(data)[digests.offset * DIGEST : (digests.offset + len(digests)) * DIGEST]


def _give_up(reason: str) -> None:
    """Stop using the native hash in this process: an unexpected failure, told once.

    Only the exception's class is logged: its message could quote the plan,
    whose literals are key material.
    """
    global _disabled
    _disabled = True
    _log.warning("the native SHA-256 failed (%s); hashing with hashlib from now on", reason)
