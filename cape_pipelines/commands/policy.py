"""``cape policy validate|schema|plan``: check a policy, print its schema, show its plan.

``plan`` reads only the data's schema, so a missing key is reported as
missing instead of refusing (see :class:`_PlanResolver`); with ``--dataset``
it resolves tag rules through the coordinator catalog. A policy with a
``risk:`` section is also applied to the data (all of it, or the first
``--sample`` rows) and the figure a run would report is shown, so a reviewer
sees it before approving. Keyed transformations run with the keys given; a
missing key is a placeholder, which leaves the classes of tokens unchanged
(a token is a one-to-one function of its value under any key) but not those
of keyed perturbations (the output says so).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CapeError, KeyMissingError
from ..keys import KeyRef, KeyResolver
from .common import EXIT_OK, _csv_options, load_keys

if TYPE_CHECKING:
    from ..inputs import InputSet
    from ..plan import Plan


def _cmd_validate(args: argparse.Namespace) -> int:
    from ..policy import load_policy

    pol = load_policy(Path(args.file))
    print(f"ok: {pol.label} v{pol.version} sha256:{pol.sha256}")
    return EXIT_OK


def _cmd_schema(args: argparse.Namespace) -> int:
    from ..policy import policy_json_schema

    json.dump(policy_json_schema(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return EXIT_OK


class _PlanResolver(KeyResolver):
    """Resolves what it can; stands in a placeholder for missing keys (a plan reads no data)."""

    def __init__(self, keys: Mapping[str, bytes]):
        super().__init__(keys)
        self.missing: list[str] = []

    def resolve(self, ref: KeyRef) -> bytes:
        try:
            return super().resolve(ref)
        except KeyMissingError as exc:
            if exc.key_name not in self.missing:
                self.missing.append(exc.key_name)
            return bytes(32)


def _cmd_plan(args: argparse.Namespace) -> int:
    from ..io import open_inputs
    from ..plan import build_plan
    from ..policy import load_policy

    pol = load_policy(Path(args.file))
    inputs = open_inputs(args.data, csv_options=_csv_options(args))
    resolver = _PlanResolver(load_keys(args.keys_file, args.key))
    # {tag: ...} rules resolve through the catalog's tags of --dataset, as column_tags= does.
    tags = _catalog_tags(args) if args.dataset else {}
    plan = build_plan(pol, inputs.schema, resolver=resolver, column_tags=tags)
    rows = plan.describe()
    risk = _risk_preview(plan, inputs, args.sample) if plan.risk is not None else None
    if risk is not None:
        # Measured with placeholder bytes for these: token classes are unchanged, noise is not.
        risk["placeholder_keys"] = list(resolver.missing)
    coverage = None
    if args.dataset:
        from ..coverage import coverage_report

        coverage = coverage_report(pol, inputs.schema.names, tags)
    if args.json:
        doc: dict[str, Any] = {
            "policy": {"label": pol.label, "version": pol.version, "sha256": pol.sha256},
            "columns": rows,
            "missing_keys": resolver.missing,
        }
        if coverage is not None:
            doc["coverage"] = {"dataset": args.dataset, **coverage.to_dict()}
        if risk is not None:
            doc["risk"] = risk
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    print(f"policy {pol.label} v{pol.version} on {args.data} ({inputs.format})")
    table = [("COLUMN", "INPUT TYPE", "STATUS", "OUTPUT TYPE", "ACTIONS")]
    for r in rows:
        table.append(
            (
                r["column"] or "(rows)",
                r["input_type"] or "",
                r["status"],
                r["output_type"] or "",
                "; ".join(r["actions"]) or "-",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        cells = [row[i].ljust(widths[i]) for i in range(4)]
        print("  ".join([*cells, row[4]]).rstrip())
    if resolver.missing:
        print(f"keys not available here (needed to apply): {', '.join(resolver.missing)}")
    if risk is not None:
        for line in _risk_lines(risk):
            print(line)
    if coverage is not None:
        print(f"coverage against the catalog's tags of dataset {args.dataset}:")
        for line in coverage.lines():
            print(f"  {line}")
    return EXIT_OK


_PREVIEW_BATCH = 65_536


def _risk_preview(plan: Plan, inputs: InputSet, sample: int | None) -> dict[str, Any]:
    """The ``risk`` figure a run would record, on the first ``sample`` rows (None: all)."""
    from ..core import apply_batch
    from ..risk_run import risk_of

    check = plan.risk
    assert check is not None
    if sample is not None and sample < 1:
        raise CapeError("--sample must be at least 1")
    total = check.empty_counts()
    parts = []
    rows = 0
    complete = True
    for _, batch in inputs.batches(_PREVIEW_BATCH):
        if sample is not None and rows + batch.num_rows > sample:
            batch = batch.slice(0, sample - rows)
            complete = False
        rows += batch.num_rows
        out, _, _ = apply_batch(plan, batch)
        parts.append(check.counts_of(out.select(check.columns)))
        if sample is not None and rows >= sample:
            break
    total.merge(*parts)
    return {**risk_of(plan, total), "sample_rows": rows, "whole_file": complete}


def _risk_lines(risk: dict[str, Any]) -> list[str]:
    """The figure for people: what a run would report."""
    on = (
        f"all {risk['sample_rows']} rows"
        if risk["whole_file"]
        else (f"the first {risk['sample_rows']} rows")
    )
    qis = ", ".join(risk["quasi_identifiers"])
    lines = [
        f"k-anonymity over {qis} (k={risk['k']}) on {on}: smallest class "
        f"{risk['smallest_class']}, {risk['classes']} classes, {risk['rows_below_k']} rows in "
        f"{risk['classes_below_k']} classes below k"
    ]
    if risk["action"] == "suppress":
        lines.append(
            f"  suppress: {risk['rows_suppressed']} rows in {risk['classes_suppressed']} classes "
            "would be removed (figures above: after removal)"
        )
    if risk["sensitive"] is not None:
        target = f" (target l={risk['l']})" if risk["l"] is not None else ""
        lines.append(
            f"  l-diversity (distinct values) of {risk['sensitive']}: {risk['l_diversity']}{target}"
        )
    if risk["placeholder_keys"]:
        lines.append(
            "  measured with placeholder keys for "
            + ", ".join(risk["placeholder_keys"])
            + ": token classes are exact, classes of keyed perturbations are not"
        )
    return lines


def _catalog_tags(args: argparse.Namespace) -> dict[str, list[str]]:
    """{column: [tag, ...]} of ``--dataset`` in the coordinator's catalog."""
    try:
        from coordinator_client import Client
    except ImportError:
        raise CapeError(
            "--dataset needs the coordinator client: install the 'coordinator' extra"
        ) from None
    url = args.coordinator or os.environ.get("CAPE_COORDINATOR_URL")
    token = args.token or os.environ.get("CAPE_TOKEN")
    if not url or not token:
        raise CapeError(
            "--dataset reads the coordinator's catalog: pass --coordinator URL and --token"
            " (or set CAPE_COORDINATOR_URL and CAPE_TOKEN)"
        )
    with Client(url, token) as client:
        resp = client.request("GET", f"/v1/catalog/datasets/{args.dataset}/column-tags")
        return {str(k): [str(t) for t in v] for k, v in resp.json().items()}
