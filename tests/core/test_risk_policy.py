"""The policy's ``risk:`` section and transformation-provided counts, in the core and pandas.

Load-time checks name the place; the section is bound to the *output* at plan time;
``run.completed`` carries the figure (and text-scrub's findings) exactly however the rows
were split; ``action: suppress`` removes the rows of classes below ``k`` and nothing else.
Engine parity lives in tests/engines (test_parity.py cases, test_risk_audit.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cape_pipelines
from cape_pipelines import PlanError, PolicyError, build_plan, load_policy
from cape_pipelines.audit import MemorySink
from cape_pipelines.core import Counters, apply_table
from cape_pipelines.io import apply_files
from cape_pipelines.policy import policy_json_schema

RULES = [
    {"match": {"name": "zip"}, "actions": [{"transform": {"type": "generalize", "prefix": 3}}]},
]
SCHEMA = pa.schema([("zip", pa.string()), ("age", pa.int64()), ("dx", pa.string())])


def pol(risk: Any, **extra: Any) -> dict[str, Any]:
    return {"label": "r", "rules": RULES, "risk": risk, **extra}


def problems(source: Any) -> list[tuple[str, str]]:
    with pytest.raises(PolicyError) as info:
        load_policy(source)
    return info.value.problems


@pytest.mark.parametrize(
    ("risk", "where", "says"),
    [
        ({"quasi_identifiers": ["zip"], "k": 1}, "risk.k", "greater than or equal to 2"),
        ({"quasi_identifiers": [], "k": 3}, "risk.quasi_identifiers", "at least 1"),
        ({"k": 3}, "risk.quasi_identifiers", "field required"),
        ({"quasi_identifiers": ["zip", "zip"], "k": 3}, "risk", "listed twice"),
        ({"quasi_identifiers": ["zip"], "sensitive": "zip", "k": 3}, "risk", "also a quasi"),
        ({"quasi_identifiers": ["zip"], "k": 3, "l": 2}, "risk", "l needs a sensitive"),
        ({"quasi_identifiers": ["zip"], "sensitive": "dx", "k": 3, "l": 1}, "risk.l", "2"),
        ({"quasi_identifiers": ["zip"], "k": 3, "action": "drop"}, "risk.action", "report"),
        ({"quasi_identifiers": ["zip"], "k": 3, "kk": 1}, "risk.kk", "unknown field"),
    ],
)
def test_bad_risk_sections_are_refused_naming_the_place(risk: Any, where: str, says: str) -> None:
    found = problems(pol(risk))
    assert any(loc == where and says in msg for loc, msg in found), found


def test_a_policy_without_the_section_is_unchanged() -> None:
    plain = {"label": "r", "rules": RULES}
    assert load_policy(plain).risk is None
    sink = MemorySink()
    cape_pipelines.apply_policy(plain, pa.table({"zip": ["02139"]}), audit=sink)
    done = sink.records[-1]
    assert done["event"] == "run.completed"
    assert "risk" not in done and "counts" not in done


def test_the_json_schema_documents_the_section() -> None:
    schema = policy_json_schema()
    assert "risk" in schema["properties"]
    section = schema["$defs"]["RiskSection"]
    assert section["properties"]["k"]["minimum"] == 2
    assert section["properties"]["action"]["enum"] == ["report", "suppress"]
    assert section["required"] == ["quasi_identifiers", "k"]


def test_columns_are_bound_to_the_output() -> None:
    plan = build_plan(pol({"quasi_identifiers": ["zip", "age"], "sensitive": "dx", "k": 3}), SCHEMA)
    assert plan.risk is not None
    assert plan.risk.columns == ["zip", "age", "dx"]

    dropped = {
        "label": "r",
        "rules": [{"match": {"name": "age"}, "actions": ["drop"]}],
        "risk": {"quasi_identifiers": ["zip", "age"], "k": 3},
    }
    with pytest.raises(PlanError, match=r"risk\.quasi_identifiers\[1\]: column 'age' is removed"):
        build_plan(dropped, SCHEMA)

    with pytest.raises(PlanError, match=r"risk\.sensitive: column 'diag' is not in the data"):
        build_plan(pol({"quasi_identifiers": ["zip"], "sensitive": "diag", "k": 3}), SCHEMA)


def test_a_nested_column_cannot_be_a_quasi_identifier() -> None:
    schema = SCHEMA.append(pa.field("tags", pa.list_(pa.string())))
    with pytest.raises(PlanError, match=r"risk\.quasi_identifiers\[1\]: column 'tags' is list"):
        build_plan(pol({"quasi_identifiers": ["zip", "tags"], "k": 3}), schema)


def test_on_missing_column_skip_leaves_absent_columns_out() -> None:
    risk = {"quasi_identifiers": ["zip", "city"], "sensitive": "diag", "l": 2, "k": 3}
    plan = build_plan(pol({**risk, "on_missing_column": "skip"}), SCHEMA)
    assert plan.risk is not None
    assert (plan.risk.quasi_identifiers, plan.risk.sensitive, plan.risk.l) == (("zip",), None, None)
    # The policy-wide default applies too; with no quasi-identifier left there is nothing to do.
    plan = build_plan(
        pol({"quasi_identifiers": ["city"], "k": 3}, on_missing_column="skip"), SCHEMA
    )
    assert plan.risk is None


def _oracle(rows: list[tuple[Any, Any, Any]], k: int) -> dict[str, Any]:
    sizes = Counter((z, a) for z, a, _ in rows)
    distinct: dict[Any, set[Any]] = defaultdict(set)
    for z, a, d in rows:
        distinct[(z, a)].add(d)
    return {
        "rows": len(rows),
        "classes": len(sizes),
        "smallest_class": min(sizes.values()) if sizes else 0,
        "rows_below_k": sum(n for n in sizes.values() if n < k),
        "classes_below_k": sum(1 for n in sizes.values() if n < k),
        "l_diversity": min(len(v) for v in distinct.values()) if distinct else None,
    }


ROWS = st.lists(
    st.tuples(
        st.sampled_from(["021", "941", "100", None]),
        st.sampled_from([1, 2, None]),
        st.sampled_from(["flu", "cold", None]),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(rows=ROWS, k=st.integers(2, 6), chunk=st.integers(1, 17))
def test_report_and_suppression_equal_the_oracle_however_split(
    rows: list[tuple[Any, Any, Any]], k: int, chunk: int
) -> None:
    table = pa.table(
        {
            "zip": pa.array([r[0] for r in rows], pa.string()),
            "age": pa.array([r[1] for r in rows], pa.int64()),
            "dx": pa.array([r[2] for r in rows], pa.string()),
        }
    )
    table = pa.Table.from_batches(table.to_batches(max_chunksize=chunk), schema=table.schema)
    for action in ("report", "suppress"):
        risk = {"quasi_identifiers": ["zip", "age"], "sensitive": "dx", "k": k, "action": action}
        sink = MemorySink()
        policy = {
            "label": "r",
            "rules": [
                {
                    "match": {"name": "age"},
                    "actions": [{"transform": {"type": "numeric-rounding", "precision": 0}}],
                }
            ],
            "risk": risk,
        }
        out = cape_pipelines.apply_policy(policy, table, audit=sink)
        done = sink.records[-1]
        before = _oracle(rows, k)
        small = {c for c, n in Counter((z, a) for z, a, _ in rows).items() if n < k}
        kept = [r for r in rows if action == "report" or (r[0], r[1]) not in small]
        expected = _oracle(kept, k)
        got = {f: done["risk"][f] for f in expected}
        assert got == expected
        assert out.num_rows == len(kept)
        assert [tuple(r.values()) for r in out.to_pylist()] == kept  # order kept
        assert done["rows_redacted"] == len(rows) - len(kept)
        assert done["risk"]["rows_suppressed"] == (
            before["rows_below_k"] if action == "suppress" else 0
        )


def test_pandas_suppression_keeps_the_index_and_counts_columns_of_what_is_written() -> None:
    df = pd.DataFrame(
        {"zip": ["02139", "02134", "94110", None, "02139"], "dx": ["a", "b", "a", "c", None]},
        index=[10, 11, 12, 13, 14],
    )
    policy = pol({"quasi_identifiers": ["zip"], "sensitive": "dx", "k": 2, "action": "suppress"})
    sink = MemorySink()
    out = cape_pipelines.apply_policy(policy, df, audit=sink)
    assert list(out.index) == [10, 11, 14]
    assert list(out["zip"]) == ["021", "021", "021"]
    done = sink.records[-1]
    assert (done["rows_in"], done["rows_out"], done["rows_redacted"]) == (5, 3, 2)
    assert done["columns"]["zip"] == {"transform": "generalize", "values": 3, "nulls": 0}
    assert done["risk"]["l_diversity"] == 3  # a, b and null: distinct values, null is one


NOTES = pa.table(
    {
        "note": pa.array(
            ["mail a@example.com", "x 123-45-6789 and b@example.org", None, "nothing", "10.0.0.1"]
            * 7
        )
    }
)
SCRUB = {
    "label": "s",
    "rules": [{"match": {"name": "note"}, "actions": [{"transform": {"type": "text-scrub"}}]}],
}


@settings(max_examples=25, deadline=None)
@given(chunk=st.integers(1, 35))
def test_text_scrub_counts_merge_exactly_across_batches(chunk: int) -> None:
    plan = build_plan(SCRUB, NOTES.schema)
    table = pa.Table.from_batches(NOTES.to_batches(max_chunksize=chunk), schema=NOTES.schema)
    _, counters = apply_table(plan, table)
    assert counters.counts == {
        "note": {
            "text-scrub.email": 14,
            "text-scrub.card": 0,
            "text-scrub.iban": 0,
            "text-scrub.ssn": 7,
            "text-scrub.ipv4": 7,
            "text-scrub.ipv6": 0,
            "text-scrub.phone": 0,
        }
    }
    # What crosses process boundaries (Dask attrs, Beam side inputs) keeps them exactly.
    assert Counters.from_dict(counters.to_dict()).to_dict() == counters.to_dict()


def test_cape_apply_suppresses_and_reports_the_same_as_pandas(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {
            "zip": ["02139", "02134", "94110", None, "02139", "94117", "10001"],
            "age": [30, 31, 40, 50, 33, 41, 60],
            "dx": ["a", "b", "a", "c", None, "a", "b"],
        }
    )
    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), src)
    policy = pol({"quasi_identifiers": ["zip"], "sensitive": "dx", "k": 2, "action": "suppress"})
    sink, sink2 = MemorySink(), MemorySink()
    apply_files(policy, src, tmp_path / "out.parquet", audit=sink, batch_size=2)
    written = pq.read_table(tmp_path / "out.parquet")
    expected = cape_pipelines.apply_policy(policy, pa.Table.from_pandas(df), audit=sink2)
    assert written.to_pylist() == expected.to_pylist()
    assert sink.records[-1]["risk"] == sink2.records[-1]["risk"]
    assert sink.records[-1]["rows_redacted"] == 2
    # No spool file is left next to the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "out.parquet"]


def test_cape_policy_plan_shows_the_figure_before_approval(tmp_path: Path) -> None:
    data = tmp_path / "in.csv"
    data.write_text("zip,dx\n02139,a\n02134,b\n94110,a\n")
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps(pol({"quasi_identifiers": ["zip"], "sensitive": "dx", "k": 2})))
    cape = [sys.executable, "-m", "cape_pipelines.cli"]
    shown = subprocess.run(
        [
            *cape,
            "policy",
            "plan",
            str(policy),
            "--data",
            str(data),
            "--json",
            "--csv-type",
            "zip=string",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    doc = json.loads(shown.stdout)
    assert doc["risk"]["rows_below_k"] == 1
    assert doc["risk"]["sample_rows"] == 3
    text = subprocess.run(
        [
            *cape,
            "policy",
            "plan",
            str(policy),
            "--data",
            str(data),
            "--sample",
            "2",
            "--csv-type",
            "zip=string",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "k-anonymity over zip (k=2) on the first 2 rows" in text
