"""Audit parity for issue 13 items 4 and 5: every engine's ``run.completed`` carries the same
transformation counts (text-scrub findings) and the same risk figure, equal to an oracle.

The oracle is independent of the core: it plants a known number of each entity in the
notes, generalises the quasi-identifiers with plain Python (ZIP prefix, age decade) and
counts equivalence classes with ``collections.Counter``. Each engine runs the same policy
over the same 240 rows, split over several batches/partitions so that the class counts
must be merged across them (a class spans partitions by construction).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pytest
from runners import dask_frame, from_pandas, to_pandas

import cape_pipelines
from cape_pipelines.audit import MemorySink

ROWS = 240
ENTITY_TEXT = {
    "email": "write to user{i}@example.org",
    "ssn": "ssn 123-45-{i:04d}",
    "ipv4": "from 10.0.{i}.7",
}


def _data() -> tuple[pa.Table, dict[str, int]]:
    rnd = random.Random(13)
    zips = ["02139", "02134", "94110", "94117", "10001", "60601", None]
    dxs = ["flu", "cold", "asthma", None]
    notes, planted = [], Counter[str]()
    for i in range(ROWS):
        parts = []
        for entity, text in ENTITY_TEXT.items():
            if rnd.random() < 0.3:
                parts.append(text.format(i=i + 1))
                planted[entity] += 1
        notes.append("; ".join(parts) if parts else (None if i % 7 == 0 else "nothing here"))
    table = pa.table(
        {
            "id": pa.array(range(ROWS), pa.int64()),
            # Rare ZIPs make small classes: 60601 and 10001 appear a few times only.
            "zip": pa.array(
                [rnd.choices(zips, weights=[30, 30, 30, 30, 2, 1, 3])[0] for _ in range(ROWS)]
            ),
            "age": pa.array([rnd.randint(18, 89) for _ in range(ROWS)], pa.int64()),
            "dx": pa.array([rnd.choice(dxs) for _ in range(ROWS)]),
            "note": pa.array(notes, pa.string()),
        }
    )
    counts = {f"text-scrub.{e}": planted[e] for e in ENTITY_TEXT}
    return table, counts


DATA, PLANTED = _data()


def _policy(action: str) -> dict[str, Any]:
    return {
        "label": "risk-audit",
        "rules": [
            {
                "match": {"name": "zip"},
                "actions": [{"transform": {"type": "generalize", "prefix": 3}}],
            },
            {"match": {"name": "age"}, "actions": [{"transform": {"type": "bucket", "width": 10}}]},
            {
                "match": {"name": "note"},
                "actions": [{"transform": {"type": "text-scrub", "entities": list(ENTITY_TEXT)}}],
            },
        ],
        "risk": {
            "quasi_identifiers": ["zip", "age"],
            "sensitive": "dx",
            "k": 5,
            "l": 2,
            "action": action,
        },
    }


def _oracle(action: str) -> tuple[list[int], dict[str, Any]]:
    """The ids kept and the expected ``risk`` field, by plain Python."""

    def key(row: dict[str, Any]) -> tuple[Any, Any]:
        z = row["zip"][:3] if row["zip"] is not None else None
        lo = row["age"] // 10 * 10
        return z, f"{lo}-{lo + 9}"

    rows = DATA.to_pylist()
    sizes = Counter(key(r) for r in rows)
    small = {c for c, n in sizes.items() if n < 5}
    kept = [r for r in rows if action == "report" or key(r) not in small]
    kept_sizes = Counter(key(r) for r in kept)
    distinct: dict[tuple[Any, Any], set[Any]] = defaultdict(set)
    for r in kept:
        distinct[key(r)].add(r["dx"])
    below = {c: n for c, n in kept_sizes.items() if n < 5}
    l_div = min(len(v) for v in distinct.values())
    figure = {
        "quasi_identifiers": ["zip", "age"],
        "sensitive": "dx",
        "action": action,
        "l_diversity_kind": "distinct",
        "k": 5,
        "l": 2,
        "rows": len(kept),
        "classes": len(kept_sizes),
        "smallest_class": min(kept_sizes.values()),
        "rows_below_k": sum(below.values()),
        "classes_below_k": len(below),
        "l_diversity": l_div,
        "rows_suppressed": sum(sizes[c] for c in small) if action == "suppress" else 0,
        "classes_suppressed": len(small) if action == "suppress" else 0,
        "k_anonymous": not below,
        "l_diverse": l_div >= 2,
    }
    return [r["id"] for r in kept], figure


def _completed(records: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in records if r["event"] == "run.completed"]
    assert len(done) == 1, records
    return done[0]


def run_pyarrow(policy: dict[str, Any]) -> tuple[pa.Table, dict[str, Any]]:
    sink = MemorySink()
    # Several batches, so the core's per-batch counts are merged.
    table = pa.Table.from_batches(DATA.to_batches(max_chunksize=50))
    out = cape_pipelines.apply_policy(policy, table, audit=sink)
    return out, _completed(sink.records)


def run_pandas(policy: dict[str, Any]) -> tuple[pa.Table, dict[str, Any]]:
    sink = MemorySink()
    out = cape_pipelines.apply_policy(policy, to_pandas(DATA), audit=sink)
    return from_pandas(out), _completed(sink.records)


def run_dask(policy: dict[str, Any]) -> tuple[pa.Table, dict[str, Any]]:
    import cape_pipelines.dask as cape_dask

    sink = MemorySink()
    out = cape_dask.apply_policy(dask_frame(to_pandas(DATA), 5), policy, audit=sink)
    result = cape_dask.compute(out, scheduler="threads")
    return from_pandas(result), _completed(sink.records)


def run_spark(policy: dict[str, Any]) -> tuple[pa.Table, dict[str, Any]]:
    from runner_spark import run_spark as spark

    sink = MemorySink()
    out = spark(policy, DATA, audit=sink)
    return out, _completed(sink.records)


def run_beam(policy: dict[str, Any]) -> tuple[pa.Table, dict[str, Any]]:
    from runner_beam import run_beam as beam

    with tempfile.TemporaryDirectory(prefix="cape-risk-") as tmp:
        path = os.path.join(tmp, "audit.jsonl")
        out = beam(policy, DATA, audit=path)
        with open(path, encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh]
    return out, _completed(records)


def run_cli(policy: dict[str, Any]) -> tuple[pa.Table, dict[str, Any]]:
    import pyarrow.parquet as pq

    from cape_pipelines.io import apply_files

    with tempfile.TemporaryDirectory(prefix="cape-risk-") as tmp:
        src, dst = os.path.join(tmp, "in.parquet"), os.path.join(tmp, "out.parquet")
        pq.write_table(DATA, src, row_group_size=60)
        sink = MemorySink()
        apply_files(policy, src, dst, audit=sink, batch_size=37)
        return pq.read_table(dst), _completed(sink.records)


def _param(name: str, fn: Callable[..., Any], package: str | None, mark: str | None) -> Any:
    marks = [getattr(pytest.mark, mark)] if mark else []
    if package and importlib.util.find_spec(package) is None:
        marks.append(pytest.mark.skip(reason=f"{package} is not installed"))
    return pytest.param(fn, id=name, marks=marks)


ENGINES = [
    _param("pyarrow", run_pyarrow, None, None),
    _param("pandas", run_pandas, None, None),
    _param("cli", run_cli, None, None),
    _param("dask", run_dask, "dask", "dask"),
    _param("spark", run_spark, "pyspark", "spark"),
    _param("beam", run_beam, "apache_beam", "beam"),
]


@pytest.mark.parametrize("action", ["report", "suppress"])
@pytest.mark.parametrize("run", ENGINES)
def test_counts_and_risk_equal_the_oracle(run: Callable[..., Any], action: str) -> None:
    kept, figure = _oracle(action)
    assert figure["rows_suppressed"] > 0 or action == "report", "the data must have small classes"
    out, done = run(_policy(action))
    assert sorted(out.column("id").to_pylist()) == kept
    assert done["counts"] == {
        "note": {n: PLANTED.get(n, 0) for n in sorted(f"text-scrub.{e}" for e in ENTITY_TEXT)}
    }
    assert done["risk"] == figure
    assert done["rows_in"] == ROWS
    assert done["rows_out"] == len(kept)
    assert done["rows_redacted"] == ROWS - len(kept)
    # Per-column counts describe the rows written, suppression included.
    zips = [z for i, z in zip(DATA["id"].to_pylist(), DATA["zip"].to_pylist(), strict=True)]
    kept_ids = set(kept)
    values = sum(1 for i, z in enumerate(zips) if i in kept_ids and z is not None)
    assert done["columns"]["zip"] == {
        "transform": "generalize",
        "values": values,
        "nulls": len(kept) - values,
    }
