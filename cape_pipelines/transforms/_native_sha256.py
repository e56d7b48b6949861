"""SHA-256 of many values in one native call, through Apache DataFusion when it is installed.

The tokenizer's keyed hash is HMAC-SHA256 (RFC 2104): two SHA-256 passes per
value. Written as a Python loop over ``hashlib`` states it costs about 0.5 us
per value, nearly all of it Python's per-call overhead rather than SHA-256.
DataFusion (the Apache Arrow project's query engine, ``pip install
cape-pipelines[fast]``) has a vectorised ``sha256`` over an Arrow binary
column that costs about 0.06 us per one-block value, so the tokenizer hands it
whole columns: ``key ^ ipad || value`` in one call, ``key ^ opad || inner
digest`` in a second. The HMAC construction itself stays RFC 2104's, checked
against the RFC 4231 vectors and against ``hmac`` on random keys and values;
only the SHA-256 implementation differs, and both give the same bytes.

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

The values passed in carry key material (``key ^ ipad``); they live in Arrow
buffers owned by this call and DataFusion's memory table for its duration,
are never logged, and are dropped when it returns.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

# Below this many values a column is hashed with hashlib: a native call's fixed
# cost (~0.2 ms) is then more than the per-value saving (~0.4 us).
MIN_VALUES = 2048
# Values per native call: bounds the extra memory (each value plus a 64-byte
# pad) while keeping the fixed cost per call under 5% of the call.
CHUNK = 65536
DIGEST = 32

_forked_after_import = False
_local = threading.local()
_import_failed = False


def _after_fork_in_child() -> None:
    global _forked_after_import
    if "datafusion" in sys.modules:
        _forked_after_import = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _session() -> Any | None:
    """This thread's DataFusion session, or None where it is not installed or not safe here."""
    global _import_failed
    if _forked_after_import or _import_failed:
        return None
    ctx = getattr(_local, "ctx", None)
    if ctx is not None:
        return ctx
    try:
        from datafusion import SessionConfig, SessionContext
    except ImportError:
        _import_failed = True
        return None
    # One partition: the call runs on one runtime thread, so "per core" stays per core.
    ctx = _local.ctx = SessionContext(SessionConfig().with_target_partitions(1))
    return ctx


def available() -> bool:
    """Whether this process can hash through DataFusion (installed, and not a risky fork)."""
    return _session() is not None


def sha256_digests(values: pa.Array, prefix: bytes = b"", suffix: bytes = b"") -> bytes | None:
    """The 32-byte SHA-256 digests of ``prefix || v || suffix``, back to back; None if unusable."""
    if len(values) < MIN_VALUES or values.null_count:
        return None
    ctx = _session()
    if ctx is None:
        return None
    out = bytearray()
    for start in range(0, len(values), CHUNK):
        out += _chunk_digests(ctx, values.slice(start, CHUNK), prefix, suffix)
    return bytes(out)


def hmac_sha256_digests(values: pa.Array, inner_pad: bytes, outer_pad: bytes) -> bytes | None:
    """HMAC-SHA256 of each value given the key's padded blocks (RFC 2104); None if unusable.

    ``inner_pad`` and ``outer_pad`` are ``K0 ^ ipad`` and ``K0 ^ opad`` (64
    bytes each, ``K0`` the block-sized key). The inner digests never leave
    Arrow buffers: each chunk's are prefixed with ``outer_pad`` and hashed again.
    """
    if len(values) < MIN_VALUES or values.null_count:
        return None
    ctx = _session()
    if ctx is None:
        return None
    out = bytearray()
    for start in range(0, len(values), CHUNK):
        inner = _chunk_digests(ctx, values.slice(start, CHUNK), inner_pad, b"")
        inner_array = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(DIGEST), len(inner) // DIGEST, [None, pa.py_buffer(inner)]
        ).cast(pa.binary())
        out += _chunk_digests(ctx, inner_array, outer_pad, b"")
    return bytes(out)


def _chunk_digests(ctx: Any, values: pa.Array, prefix: bytes, suffix: bytes) -> memoryview:
    from datafusion import col
    from datafusion import functions as f

    t = pa.large_binary() if pa.types.is_large_binary(values.type) else pa.binary()
    message = values
    if prefix or suffix:
        message = pc.binary_join_element_wise(
            pa.scalar(prefix, t), values, pa.scalar(suffix, t), pa.scalar(b"", t)
        )
    table = pa.table({"m": message})
    del message
    result = ctx.from_arrow(table).select(f.sha256(col("m")).alias("d")).to_arrow_table()
    del table
    digests = result.column(0).combine_chunks().cast(pa.binary(DIGEST))
    if len(digests) != len(values) or digests.null_count:
        raise RuntimeError("the native SHA-256 returned a different number of digests")
    data = digests.buffers()[1]
    assert data is not None
    return memoryview(data)[digests.offset * DIGEST : (digests.offset + len(digests)) * DIGEST]
