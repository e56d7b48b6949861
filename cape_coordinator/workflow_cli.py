"""The workflow's command line: ``cape request create|list|show|decline|link`` and
``cape policy comment|assign|request-changes|review|review-settings``.

Same contract as :mod:`cape_coordinator.cli`: ``--coordinator``/``CAPE_COORDINATOR_URL``
and ``--token``/``CAPE_TOKEN``; ``request create`` prints the new request's id alone on
the last line; ``--json`` prints JSON for scripts. A dataset's schema is given as
``--schema col:type,...``, as a JSON/YAML file of ``{column: type}``, or taken from a
sample data file (``--sample data.csv``: only its schema is read).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from .cli import UsageError, _client, _print_json, _table

ARROW_NAMES = {
    "string": "string",
    "large_string": "string",
    "int64": "int64",
    "int32": "int32",
    "int16": "int32",
    "int8": "int32",
    "double": "float64",
    "float": "float64",
    "bool": "bool",
    "date32[day]": "date",
    "binary": "binary",
}


def register(
    subparsers: argparse._SubParsersAction,  # type: ignore[type-arg]
    policy_subparsers: argparse._SubParsersAction,  # type: ignore[type-arg]
    conn: argparse.ArgumentParser,
) -> None:
    """Add ``request`` and the workflow's ``policy`` verbs."""
    req = subparsers.add_parser("request", help="policy requests (requesters file, authors answer)")
    rsub = req.add_subparsers(dest="request_command", required=True)
    p = rsub.add_parser("create", parents=[conn], help="file a request; prints its id")
    p.add_argument("--dataset", required=True, help="the dataset's name")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--schema", help="col:type,... or a JSON/YAML file of {column: type}")
    src.add_argument("--sample", metavar="FILE", help="take the schema from a data file")
    p.add_argument("--purpose", required=True, help="what the data is for")
    p.add_argument(
        "--need",
        action="append",
        required=True,
        metavar="COLUMN=WHY",
        help="a column needed and what for (repeat)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_request_create)
    p = rsub.add_parser("list", parents=[conn], help="requests (a requester sees their own)")
    p.add_argument("--state", choices=["open", "drafting", "in_review", "fulfilled", "declined"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_request_list)
    p = rsub.add_parser("show", parents=[conn], help="one request, its columns and state")
    p.add_argument("request_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_request_show)
    p = rsub.add_parser("decline", parents=[conn], help="decline a request with --reason")
    p.add_argument("request_id")
    p.add_argument("--reason", required=True)
    p.set_defaults(func=cmd_request_decline)
    p = rsub.add_parser("link", parents=[conn], help="link your version to a request")
    p.add_argument("request_id")
    p.add_argument("label")
    p.add_argument("version", type=int)
    p.set_defaults(func=cmd_request_link)

    psub = policy_subparsers
    p = psub.add_parser("comment", parents=[conn], help="comment on a version (or one rule)")
    p.add_argument("label")
    p.add_argument("version", type=int)
    p.add_argument("text")
    p.add_argument("--rule", type=int, help="0-based index of the rule commented on")
    p.add_argument("--reply-to", type=int, metavar="COMMENT_ID")
    p.set_defaults(func=cmd_policy_comment)
    p = psub.add_parser("comments", parents=[conn], help="a version's comment thread")
    p.add_argument("label")
    p.add_argument("version", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_policy_comments)
    p = psub.add_parser("assign", parents=[conn], help="assign reviewers to a version")
    p.add_argument("label")
    p.add_argument("version", type=int)
    p.add_argument("reviewers", nargs="+", help="reviewer token names")
    p.set_defaults(func=cmd_policy_assign)
    p = psub.add_parser(
        "request-changes", parents=[conn], help="send a version back to its author (--reason)"
    )
    p.add_argument("label")
    p.add_argument("version", type=int)
    p.add_argument("--reason", required=True)
    p.set_defaults(func=cmd_policy_request_changes)
    p = psub.add_parser(
        "review", parents=[conn], help="diff vs active, plan, request, approvals, comments"
    )
    p.add_argument("label")
    p.add_argument("version", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_policy_review)
    p = psub.add_parser(
        "review-settings", parents=[conn], help="show or set approvals needed and default reviewers"
    )
    p.add_argument("label")
    p.add_argument("--required-approvals", type=int, help="2 = the two-person rule (admin)")
    p.add_argument("--reviewers", help="default reviewers: NAME,NAME (admin)")
    p.set_defaults(func=cmd_policy_review_settings)


# ---- helpers ----------------------------------------------------------------------------


def read_schema(text: str) -> dict[str, str]:
    """``col:type,...`` or a JSON/YAML file holding ``{column: type}``."""
    path = Path(text)
    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
            raise UsageError(f"--schema {text}: cannot read it ({type(exc).__name__})") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise UsageError(f"--schema {text}: must hold a mapping of column to type name")
        return {str(k): v for k, v in data.items()}
    out: dict[str, str] = {}
    for part in text.split(","):
        name, sep, kind = part.strip().rpartition(":")
        if not sep or not name or not kind:
            raise UsageError(f"--schema: {part.strip()!r} is not COLUMN:TYPE")
        out[name] = kind
    return out


def schema_from_sample(path: str) -> dict[str, str]:
    """The schema of a sample data file, in the request's type names (data is not sent)."""
    import pyarrow as pa

    from cape_pipelines.io import open_inputs

    schema = open_inputs(path).schema
    out: dict[str, str] = {}
    for f in schema:
        if pa.types.is_timestamp(f.type):
            out[f.name] = "timestamp"
        elif pa.types.is_decimal(f.type):
            out[f.name] = "decimal"
        else:
            out[f.name] = ARROW_NAMES.get(str(f.type), "string")
    return out


def _needs(items: list[str]) -> list[dict[str, str]]:
    out = []
    for item in items:
        name, sep, why = item.partition("=")
        if not sep or not name.strip() or not why.strip():
            raise UsageError(f"--need {item!r}: give COLUMN=WHY")
        out.append({"name": name.strip(), "need": why.strip()})
    return out


def _show_request(r: dict[str, Any]) -> None:
    print(f"request {r['id']}: {r['dataset']} ({r['state']})")
    print(f"asked by {r['requester']} at {r['created_at']}")
    print(f"purpose: {r['purpose']}")
    for col in r["columns"]:
        print(f"  needs {col['name']} ({r['schema'].get(col['name'], '?')}): {col['need']}")
    if r["label"]:
        print(f"linked to {r['label']} version {r['version']} (latest {r['latest_version']})")
    if r["state"] == "declined":
        print(f"declined by {r['declined_by']}: {r['decline_reason']}")


# ---- handlers ---------------------------------------------------------------------------


def cmd_request_create(args: argparse.Namespace) -> int:
    """File a request; its id alone on the last line."""
    schema = read_schema(args.schema) if args.schema else schema_from_sample(args.sample)
    body = {
        "dataset": args.dataset,
        "schema": schema,
        "purpose": args.purpose,
        "columns": _needs(args.need),
    }
    with _client(args) as client:
        info = client.request("POST", "/v1/requests", json_body=body).json()
    if args.json:
        _print_json(info)
    else:
        print(f"filed request for {info['dataset']} ({info['state']})")
        print(info["id"])
    return 0


def cmd_request_list(args: argparse.Namespace) -> int:
    """List requests."""
    with _client(args) as client:
        rows = client.request("GET", "/v1/requests", params={"state": args.state}).json()
    if args.json:
        for row in rows:
            _print_json(row)
    else:
        _table(rows, ["id", "dataset", "state", "requester", "label", "latest_version"])
    return 0


def cmd_request_show(args: argparse.Namespace) -> int:
    """Show one request."""
    with _client(args) as client:
        info = client.request("GET", f"/v1/requests/{args.request_id}").json()
    if args.json:
        _print_json(info)
    else:
        _show_request(info)
    return 0


def cmd_request_decline(args: argparse.Namespace) -> int:
    """Decline a request with a reason."""
    with _client(args) as client:
        info = client.request(
            "POST", f"/v1/requests/{args.request_id}/decline", json_body={"reason": args.reason}
        ).json()
    print(f"declined request {info['id']}")
    return 0


def cmd_request_link(args: argparse.Namespace) -> int:
    """Link a version to a request."""
    with _client(args) as client:
        info = client.request(
            "POST",
            f"/v1/requests/{args.request_id}/link",
            json_body={"label": args.label, "version": args.version},
        ).json()
    print(f"request {info['id']} follows {info['label']} from version {info['version']}")
    return 0


def cmd_policy_comment(args: argparse.Namespace) -> int:
    """Comment on a version; prints the comment id."""
    body = {"body": args.text, "rule": args.rule, "reply_to": args.reply_to}
    with _client(args) as client:
        info = client.request(
            "POST",
            f"/v1/policies/{args.label}/versions/{args.version}/comments",
            json_body={k: v for k, v in body.items() if v is not None},
        ).json()
    print(f"comment {info['id']} on {args.label} version {args.version}")
    return 0


def cmd_policy_comments(args: argparse.Namespace) -> int:
    """Print a version's thread."""
    with _client(args) as client:
        rows = client.request(
            "GET", f"/v1/policies/{args.label}/versions/{args.version}/comments"
        ).json()
    if args.json:
        for row in rows:
            _print_json(row)
        return 0
    for c in rows:
        where = f" on rule {c['rule']}" if c["rule"] is not None else ""
        reply = f" (reply to {c['reply_to']})" if c["reply_to"] else ""
        print(f"#{c['id']} v{c['version']} {c['author']} ({c['role']}){where}{reply}: {c['body']}")
    return 0


def cmd_policy_assign(args: argparse.Namespace) -> int:
    """Assign reviewers to a version."""
    with _client(args) as client:
        info = client.request(
            "POST",
            f"/v1/policies/{args.label}/versions/{args.version}/reviewers",
            json_body={"reviewers": args.reviewers},
        ).json()
    print(
        f"{args.label} version {args.version}: reviewers {', '.join(info['reviewers'])}; "
        f"{len(info['approvals'])} of {info['required_approvals']} approval(s)"
    )
    return 0


def cmd_policy_request_changes(args: argparse.Namespace) -> int:
    """Send a version back to its author."""
    with _client(args) as client:
        client.request(
            "POST",
            f"/v1/policies/{args.label}/versions/{args.version}/request-changes",
            json_body={"reason": args.reason},
        )
    print(f"{args.label} version {args.version}: changes requested")
    return 0


def cmd_policy_review(args: argparse.Namespace) -> int:
    """What a reviewer needs to decide on a version."""
    with _client(args) as client:
        info = client.request("GET", f"/v1/policies/{args.label}/versions/{args.version}/review")
        data = info.json()
    if args.json:
        _print_json(data)
        return 0
    print(f"{args.label} version {args.version} ({data['state']}) by {data['author']}")
    print(
        f"approvals {len(data['approvals'])} of {data['required_approvals']}"
        f" ({', '.join(data['approvals']) or 'none'}); "
        f"reviewers: {', '.join(data['reviewers']) or 'any reviewer'}"
    )
    req = data["request"]
    if req:
        print(f"requested by {req['requester']} ({req['id']}): {req['purpose']}")
    print(data["diff"] or "(no change from the active version)")
    plan = data["plan"]
    if plan:
        if plan["error"]:
            print(f"plan over the requested schema fails: {plan['error']}")
        for col in plan["columns"]:
            print(f"  {col['column'] or '(rows)'}: {col['status']} {'; '.join(col['actions'])}")
    for c in data["comments"]:
        print(f"#{c['id']} v{c['version']} {c['author']}: {c['body']}")
    return 0


def cmd_policy_review_settings(args: argparse.Namespace) -> int:
    """Show, or (admin) set, a label's review settings."""
    with _client(args) as client:
        path = f"/v1/policies/{args.label}/review-settings"
        if args.required_approvals is None and args.reviewers is None:
            info = client.request("GET", path).json()
        else:
            if args.required_approvals is None:
                raise UsageError("--reviewers needs --required-approvals too")
            reviewers = [r.strip() for r in (args.reviewers or "").split(",") if r.strip()]
            info = client.request(
                "PUT",
                path,
                json_body={"required_approvals": args.required_approvals, "reviewers": reviewers},
            ).json()
    print(json.dumps(info, sort_keys=True))
    return 0
