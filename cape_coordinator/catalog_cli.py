"""The catalog's command line: ``cape catalog scan|proposals|accept|reject|show|tag|untag|
coverage|atlas ...``.

Same contract as :mod:`cape_coordinator.cli`: ``--coordinator``/``CAPE_COORDINATOR_URL``
and ``--token``/``CAPE_TOKEN``; ``--json`` prints JSON for scripts. ``catalog scan PATH``
alone only prints what it would propose (it needs no coordinator); with ``--dataset
NAME`` it registers the dataset's schema and stores the proposals as *pending* in the
catalog, where a reviewer accepts or rejects each (``catalog accept|reject``): a scan
never tags a column by itself.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from .cli import UsageError, _client, _print_json, _table

ATLAS_URL_ENV = "CAPE_ATLAS_URL"
ATLAS_USER_ENV = "CAPE_ATLAS_USER"
ATLAS_PASSWORD_ENV = "CAPE_ATLAS_PASSWORD"  # noqa: S105 - the variable's name


def register(
    subparsers: argparse._SubParsersAction,  # type: ignore[type-arg]
    conn: argparse.ArgumentParser,
) -> None:
    """Add ``catalog``."""
    cat = subparsers.add_parser("catalog", help="governance catalog: datasets, tags, scans")
    csub = cat.add_subparsers(dest="catalog_command", required=True)

    p = csub.add_parser(
        "scan",
        parents=[conn],
        help="sample a CSV/Parquet dataset and propose tags (stored as pending with --dataset)",
    )
    p.add_argument(
        "path", metavar="PATH", help="CSV/Parquet file or directory; with --engine spark: TABLE"
    )
    p.add_argument(
        "--engine",
        choices=["arrow", "spark"],
        default="arrow",
        help="arrow (files, in this process) or spark (PATH is a table of the Spark session)",
    )
    p.add_argument("--dataset", help="register the schema and store the proposals under NAME")
    p.add_argument("--owner", help="the dataset's owner (default: the token's name)")
    p.add_argument("--sample", type=int, default=10_000, help="rows to read (default 10000)")
    p.add_argument("--threshold", type=float, default=0.8, help="least confidence to propose")
    p.add_argument("--min-evidence", type=int, default=5, help="least confirmed values")
    p.add_argument(
        "--phone-region",
        default="US",
        metavar="CC",
        help="country whose format national phone numbers (no +) are read in (default US)",
    )
    p.add_argument("--delimiter", default=",", help="CSV delimiter")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_scan)

    p = csub.add_parser("proposals", parents=[conn], help="list the scanner's proposals")
    p.add_argument("--dataset")
    p.add_argument("--state", choices=["pending", "accepted", "rejected"], default="pending")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_proposals)

    p = csub.add_parser("accept", parents=[conn], help="accept proposals: their tags are set")
    p.add_argument("ids", type=int, nargs="+", metavar="ID")
    p.set_defaults(func=cmd_accept)

    p = csub.add_parser("reject", parents=[conn], help="reject a proposal (nothing is tagged)")
    p.add_argument("ids", type=int, nargs="+", metavar="ID")
    p.add_argument("--reason", help="why (kept with the decision)")
    p.set_defaults(func=cmd_reject)

    p = csub.add_parser("show", parents=[conn], help="a dataset's columns, types and tags")
    p.add_argument("dataset")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = csub.add_parser("list", parents=[conn], help="every dataset")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    for verb, helptext in (("tag", "put a tag on a column"), ("untag", "take a tag off")):
        p = csub.add_parser(verb, parents=[conn], help=helptext)
        p.add_argument("dataset")
        p.add_argument("column")
        p.add_argument("tag")
        p.set_defaults(func=cmd_tag, verb=verb)

    p = csub.add_parser(
        "coverage", parents=[conn], help="which tagged columns a policy file leaves uncovered"
    )
    p.add_argument("dataset")
    p.add_argument("--policy", required=True, metavar="FILE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_coverage)

    p = csub.add_parser(
        "require-coverage",
        parents=[conn],
        help="tie a policy label to a dataset; approvals must cover its tagged columns",
    )
    p.add_argument("label")
    p.add_argument("--dataset", required=True)
    p.add_argument("--off", action="store_true", help="report coverage in review, do not block")
    p.set_defaults(func=cmd_require_coverage)

    atlas = csub.add_parser("atlas", help="exchange datasets, columns and tags with Apache Atlas")
    asub = atlas.add_subparsers(dest="atlas_command", required=True)
    ns = argparse.ArgumentParser(add_help=False)
    ns.add_argument("--namespace", default="cape", help="qualifiedName suffix (default cape)")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--atlas-url", help=f"Atlas base URL (default ${ATLAS_URL_ENV})")
    remote.add_argument("--atlas-user", help=f"basic-auth user (default ${ATLAS_USER_ENV})")
    p = asub.add_parser("export", parents=[conn, ns], help="write Atlas v2 JSON of the catalog")
    p.add_argument("--dataset", action="append", default=[], help="only these (repeatable)")
    p.add_argument("--output", required=True, metavar="FILE")
    p.set_defaults(func=cmd_atlas_export)
    p = asub.add_parser(
        "import", parents=[conn, ns], help="Atlas classifications from a file -> pending proposals"
    )
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=cmd_atlas_import)
    p = asub.add_parser("push", parents=[conn, ns, remote], help="export to a live Atlas")
    p.add_argument("--dataset", action="append", default=[], help="only these (repeatable)")
    p.set_defaults(func=cmd_atlas_push)
    p = asub.add_parser(
        "pull", parents=[conn, ns, remote], help="a dataset's classifications from a live Atlas"
    )
    p.add_argument("dataset")
    p.set_defaults(func=cmd_atlas_pull)


def cmd_scan(args: argparse.Namespace) -> int:
    from cape_pipelines.catalog.scan import scan_path
    from cape_pipelines.inputs import CsvOptions

    if not 0 < args.threshold <= 1:
        raise UsageError("--threshold must be in (0, 1]")
    if args.sample < 1 or args.min_evidence < 1:
        raise UsageError("--sample and --min-evidence must be at least 1")
    if args.engine == "spark":
        from pyspark.sql import SparkSession

        from cape_pipelines.catalog.scan import scan_spark_table

        # The session spark-submit or the environment configures (master, catalog).
        spark = SparkSession.builder.appName("cape-catalog-scan").getOrCreate()
        try:
            result = scan_spark_table(
                spark,
                args.path,
                sample=args.sample,
                threshold=args.threshold,
                min_evidence=args.min_evidence,
                phone_region=args.phone_region,
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    else:
        try:
            result = scan_path(
                Path(args.path),
                sample=args.sample,
                threshold=args.threshold,
                min_evidence=args.min_evidence,
                csv_options=CsvOptions(delimiter=args.delimiter),
                phone_region=args.phone_region,
            )
        except ValueError as exc:
            if "phone_region" not in str(exc):
                raise
            raise UsageError(str(exc).replace("phone_region", "--phone-region")) from None
    proposals = [p.to_dict() for p in result.proposals]
    stored: list[dict[str, Any]] = []
    if args.dataset:
        client = _client(args)
        owner = args.owner or client.whoami()["name"]
        client.request(
            "PUT",
            f"/v1/catalog/datasets/{args.dataset}",
            json_body={"owner": owner, "schema": result.schema},
        )
        if proposals:
            stored = client.request(
                "POST",
                f"/v1/catalog/datasets/{args.dataset}/proposals",
                json_body={"proposals": proposals},
            ).json()
    if args.json:
        _print_json(
            {"schema": result.schema, "rows": result.rows, "proposals": stored or proposals}
        )
        return 0
    print(f"sampled {result.rows} rows of {args.path}: {len(proposals)} proposal(s)")
    rows = stored or proposals
    _table(
        rows,
        (["id"] if stored else [])
        + ["column", "tag", "confidence", "evidence", "sampled", "detector"],
    )
    if stored:
        print(f"stored as pending in dataset {args.dataset}: `cape catalog accept ID` to tag")
    return 0


def cmd_proposals(args: argparse.Namespace) -> int:
    rows = (
        _client(args)
        .request(
            "GET", "/v1/catalog/proposals", params={"dataset": args.dataset, "state": args.state}
        )
        .json()
    )
    if args.json:
        _print_json(rows)
    else:
        _table(
            rows, ["id", "dataset", "column", "tag", "confidence", "evidence", "sampled", "state"]
        )
    return 0


def cmd_accept(args: argparse.Namespace) -> int:
    client = _client(args)
    for pid in args.ids:
        info = client.request("POST", f"/v1/catalog/proposals/{pid}/accept").json()
        print(f"accepted {pid}: {info['dataset']}.{info['column']} tagged {info['tag']}")
    return 0


def cmd_reject(args: argparse.Namespace) -> int:
    client = _client(args)
    for pid in args.ids:
        info = client.request(
            "POST", f"/v1/catalog/proposals/{pid}/reject", json_body={"reason": args.reason}
        ).json()
        print(f"rejected {pid}: {info['dataset']}.{info['column']} {info['tag']}")
    return 0


def _print_dataset(info: dict[str, Any]) -> None:
    print(f"dataset {info['name']} (owner {info['owner']})")
    rows = [
        {
            "column": c["name"],
            "type": c["type"],
            "tags": ", ".join(f"{t['tag']} ({t['tagged_by']} {t['tagged_at']})" for t in c["tags"]),
        }
        for c in info["columns"]
    ]
    _table(rows, ["column", "type", "tags"])


def cmd_show(args: argparse.Namespace) -> int:
    info = _client(args).request("GET", f"/v1/catalog/datasets/{args.dataset}").json()
    if args.json:
        _print_json(info)
    else:
        _print_dataset(info)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = _client(args).request("GET", "/v1/catalog/datasets").json()
    if args.json:
        _print_json(rows)
        return 0
    _table(
        [
            {
                "name": d["name"],
                "owner": d["owner"],
                "columns": len(d["columns"]),
                "tagged": sum(1 for c in d["columns"] if c["tags"]),
            }
            for d in rows
        ],
        ["name", "owner", "columns", "tagged"],
    )
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    path = "tags" if args.verb == "tag" else "untag"
    info = (
        _client(args)
        .request(
            "POST",
            f"/v1/catalog/datasets/{args.dataset}/{path}",
            json_body={"column": args.column, "tag": args.tag},
        )
        .json()
    )
    _print_dataset(info)
    return 0


def coverage_lines(report: dict[str, Any]) -> list[str]:
    """A coverage report (the catalog's JSON form) in words."""
    out = [
        f"uncovered: column {u['column']!r} tagged {', '.join(u['tags'])} matches no rule"
        for u in report["uncovered"]
    ]
    out += [f"unused: rule {i} matches no column" for i in report["unmatched_rules"]]
    if not out:
        out.append(f"complete: all {len(report['covered'])} tagged columns are covered")
    return out


def cmd_coverage(args: argparse.Namespace) -> int:
    from .cli import read_policy_file

    document = read_policy_file(args.policy)
    report = (
        _client(args)
        .request(
            "POST",
            f"/v1/catalog/datasets/{args.dataset}/coverage",
            json_body={"document": document},
        )
        .json()
    )
    if args.json:
        _print_json(report)
    else:
        print("\n".join(coverage_lines(report)))
    return 0 if report["complete"] else 1


def cmd_require_coverage(args: argparse.Namespace) -> int:
    info = (
        _client(args)
        .request(
            "PUT",
            f"/v1/catalog/labels/{args.label}",
            json_body={"dataset": args.dataset, "require_coverage": not args.off},
        )
        .json()
    )
    rule = "required" if info["require_coverage"] else "reported, not required"
    print(f"label {info['label']}: dataset {info['dataset']}, coverage {rule}")
    return 0


# ---- Apache Atlas ---------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> dict[str, Any]:
    from cape_pipelines.catalog.atlas import export_catalog

    datasets = _client(args).request("GET", "/v1/catalog/datasets").json()
    if args.dataset:
        known = {d["name"] for d in datasets}
        missing = [n for n in args.dataset if n not in known]
        if missing:
            raise UsageError(f"no dataset {', '.join(missing)} in the catalog")
        datasets = [d for d in datasets if d["name"] in args.dataset]
    return export_catalog(datasets, args.namespace)


def _atlas(args: argparse.Namespace) -> Any:
    from cape_pipelines.catalog.atlas import AtlasClient

    url = args.atlas_url or os.environ.get(ATLAS_URL_ENV)
    if not url:
        raise UsageError(f"no Atlas: pass --atlas-url URL or set {ATLAS_URL_ENV}")
    user = args.atlas_user or os.environ.get(ATLAS_USER_ENV)
    # The password only from the environment: never on a command line others can read.
    return AtlasClient(url, user, os.environ.get(ATLAS_PASSWORD_ENV), timeout=args.timeout)


def cmd_atlas_export(args: argparse.Namespace) -> int:
    doc = _export(args)
    Path(args.output).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", "utf-8")
    n = len(doc["entities"]["entities"])
    print(f"wrote {args.output}: {n} entities, {len(doc['typedefs']['classificationDefs'])} tags")
    return 0


def cmd_atlas_push(args: argparse.Namespace) -> int:
    doc = _export(args)
    _atlas(args).push(doc)
    print(f"pushed {len(doc['entities']['entities'])} entities to Atlas")
    return 0


def _propose_classifications(args: argparse.Namespace, document: dict[str, Any]) -> int:
    """Store the document's classifications as pending proposals (detector ``atlas``);
    classifications outside the taxonomy and unknown columns are listed, not stored."""
    from cape_pipelines.catalog.atlas import classifications_from

    found = classifications_from(document, args.namespace)
    client = _client(args)
    tags = [t["tag"] for t in client.request("GET", "/v1/catalog/tags").json()]
    exact = {t for t in tags if not t.endswith(".*")}
    families = tuple(t[:-1] for t in tags if t.endswith(".*"))
    stored = skipped = 0
    for dataset, columns in sorted(found.items()):
        info = client.request("GET", f"/v1/catalog/datasets/{dataset}").json()
        have = {c["name"]: {t["tag"] for t in c["tags"]} for c in info["columns"]}
        items = []
        for column, classes in sorted(columns.items()):
            for tag in classes:
                if column not in have or not (tag in exact or tag.startswith(families)):
                    print(f"skipped: {dataset}.{column} {tag} (unknown column or tag)")
                    skipped += 1
                elif tag not in have[column]:
                    items.append(
                        {
                            "column": column,
                            "tag": tag,
                            "confidence": 1.0,
                            "evidence": 0,
                            "sampled": 0,
                            "detector": "atlas",
                        }
                    )
        if items:
            client.request(
                "POST",
                f"/v1/catalog/datasets/{dataset}/proposals",
                json_body={"proposals": items},
            )
            stored += len(items)
    print(f"{stored} proposal(s) stored as pending, {skipped} skipped")
    return 0


def cmd_atlas_import(args: argparse.Namespace) -> int:
    try:
        document = json.loads(Path(args.file).read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{args.file}: not a readable JSON file ({type(exc).__name__})") from None
    if not isinstance(document, dict):
        raise UsageError(f"{args.file}: expected a JSON object")
    return _propose_classifications(args, document)


def cmd_atlas_pull(args: argparse.Namespace) -> int:
    return _propose_classifications(args, _atlas(args).pull(args.dataset, args.namespace))
