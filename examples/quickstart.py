"""A short tour of the Python API on the bundled sample data and demo policy.

Loads a policy, shows its plan against the data's schema, applies it to a
pandas DataFrame and to a pyarrow Table (same values), shows that the result
does not depend on how the data is split, reveals the reversible phone tokens
with the key, streams a file to Parquet with ``apply_files``, and prints the
audit records. Run it with ``python examples/quickstart.py``.

The keys are the PUBLIC demo keys of ``cape demo``: never use them for real data.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa

import cape_pipelines as cape
from cape_pipelines.audit import MemorySink
from cape_pipelines.cli import demo_keys, demo_paths, reveal_policy
from cape_pipelines.io import apply_files, read_output_metadata


def main() -> None:
    data_path, policy_path = demo_paths()
    keys = demo_keys()

    # 1. Load and validate a policy (a path, a YAML/JSON string or a dict).
    policy = cape.load_policy(policy_path)
    print(f"policy {policy.label} v{policy.version} sha256:{policy.sha256[:12]}...")

    # 2. The plan: the policy bound to the data's schema, checked before any data is read.
    df = pd.read_csv(data_path, parse_dates=["signup"])
    df["birthdate"] = pd.to_datetime(df["birthdate"]).dt.date
    plan = cape.build_plan(policy, pa.Table.from_pandas(df, preserve_index=False).schema, keys=keys)
    for row in plan.describe():
        print(f"  {row['column'] or '(rows)':12} {row['status']:12} {'; '.join(row['actions'])}")

    # 3. Apply it to a pandas DataFrame: a new frame comes back, the input is untouched,
    #    and rows removed by row-redact take their index labels with them.
    audit = MemorySink()
    protected = cape.apply_policy(policy, df, keys=keys, audit=audit)
    print(protected.head(3).to_string(max_colwidth=20))
    assert "ssn" not in protected.columns and "ssn" in df.columns
    assert (protected["age"] >= 18).all()
    assert protected.index.isin(df.index).all()

    # 4. The same policy on a pyarrow Table gives the same values.
    table = pa.Table.from_pandas(df, preserve_index=False)
    protected_table = cape.apply_policy(policy, table, keys=keys, audit=MemorySink())
    assert protected_table.column("email").to_pylist() == protected["email"].tolist()

    # 5. Deterministic: applying the policy to two halves gives the same rows as the whole.
    halves = [df.iloc[:500], df.iloc[500:]]
    parts = [cape.apply_policy(policy, h, keys=keys, audit=MemorySink()) for h in halves]
    assert pd.concat(parts).equals(protected)

    # 6. A key holder reverses the reversible phone tokens.
    revealed = cape.apply_policy(
        reveal_policy(["phone"], "demo-phone-key"), protected, keys=keys, audit=MemorySink()
    )
    assert revealed["phone"].tolist() == df.loc[protected.index, "phone"].tolist()
    print(f"revealed {len(revealed)} phone numbers, e.g. {revealed['phone'].iloc[0]}")

    # 7. Files: stream a CSV (or Parquet file, or directory) to Parquet, in bounded memory.
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "customers.parquet"
        result = apply_files(policy_path, data_path, out, keys=keys, audit=audit)
        print(f"wrote {result.counters.rows_out} rows; metadata {read_output_metadata(out)}")

    # 8. One audit trail per run: started, (policy fetched,) completed, with counts.
    for record in audit.records:
        print(record["event"], record.get("rows_in", ""), record.get("rows_out", ""))


if __name__ == "__main__":
    main()
