"""``cape policy validate|schema|plan``: check a policy, print its schema, show its plan.

``plan`` reads only the data's schema, so a missing key is reported as
missing instead of refusing (see :class:`_PlanResolver`); with ``--dataset``
it resolves tag rules through the coordinator catalog.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CapeError, KeyMissingError
from ..keys import KeyRef, KeyResolver
from .common import EXIT_OK, _csv_options, load_keys


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
    if coverage is not None:
        print(f"coverage against the catalog's tags of dataset {args.dataset}:")
        for line in coverage.lines():
            print(f"  {line}")
    return EXIT_OK


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
