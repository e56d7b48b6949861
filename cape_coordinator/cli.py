"""The coordinator's command line: ``cape coordinator|token|key|policy|audit|runs ...``.

:func:`register` adds the subcommands to the ``cape`` parser; each handler
takes the parsed arguments and returns an exit code, and raises
:class:`~cape_pipelines.errors.CapeError` (printed as a one-line reason by the
``cape`` command) when something is refused. Scripts depend on this contract:
the coordinator is found by ``--coordinator URL`` or ``CAPE_COORDINATOR_URL``,
the caller is ``--token`` or ``CAPE_TOKEN``; ``coordinator init`` and ``token
create`` print the token alone on the last line of standard output, ``policy
push`` the new version number; ``audit verify`` exits 0 only when the chain is
intact.

Why one module of about 500 lines: it holds the shared connection options and
output helpers plus the short handlers of the core command groups; the
workflow and catalog commands are already in :mod:`.workflow_cli` and
:mod:`.catalog_cli`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from cape_pipelines.errors import CapeError, PolicyError

from . import cli_server

URL_ENV = "CAPE_COORDINATOR_URL"
TOKEN_ENV = "CAPE_TOKEN"  # noqa: S105 - the variable's name, not a token


class UsageError(CapeError):
    """A command is missing something it needs (a URL, a token, a valid argument)."""


def _connection_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("coordinator connection")
    group.add_argument("--coordinator", metavar="URL", help=f"coordinator URL (default ${URL_ENV})")
    group.add_argument("--token", help=f"API token (default ${TOKEN_ENV})")
    group.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    return parent


def _db_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--db", required=True, help="SQLite file path or SQLAlchemy URL")
    parent.add_argument("--key-file", help="master key file (default: <db>.key)")
    parent.add_argument("--config", help="settings file (default: <db>.config.json)")
    return parent


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audit-jsonl", metavar="PATH", help="also append every audit entry here")
    parser.add_argument(
        "--audit-stdout", action="store_true", default=None, help="also print every audit entry"
    )
    parser.add_argument(
        "--lost-after", type=int, metavar="SECONDS", help="a silent running run is lost after this"
    )
    parser.add_argument("--max-body-bytes", type=int, help="request body size limit")
    parser.add_argument(
        "--api-docs",
        action="store_true",
        default=None,
        help="serve /docs and /openapi.json (off by default)",
    )
    parser.add_argument(
        "--metrics-bind",
        metavar="HOST:PORT",
        help="serve GET /metrics alone on this address (not on the API's port)",
    )


def register(
    subparsers: argparse._SubParsersAction,  # type: ignore[type-arg]
    policy_subparsers: argparse._SubParsersAction | None = None,  # type: ignore[type-arg]
) -> None:
    """Add ``coordinator``, ``token``, ``key``, ``audit``, ``runs`` and the ``policy`` verbs."""
    conn = _connection_parent()
    dbp = _db_parent()

    coord = subparsers.add_parser("coordinator", help="run the bundled coordinator")
    csub = coord.add_subparsers(dest="coordinator_command", required=True)
    p = csub.add_parser("init", parents=[dbp], help="create the database, keys and an admin token")
    _settings_flags(p)
    p.set_defaults(func=cli_server.cmd_init)
    p = csub.add_parser("serve", parents=[dbp], help="serve the HTTP API")
    _settings_flags(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8686)
    p.add_argument("--access-log", action="store_true", help="log every request (no bodies)")
    p.set_defaults(func=cli_server.cmd_serve)
    p = csub.add_parser(
        "admin-token",
        parents=[dbp],
        help="offline recovery: make an admin token in the database directly (audited)",
    )
    p.add_argument("--name", default="recovered-admin", help="who the token is for")
    p.set_defaults(func=cli_server.cmd_admin_token)
    p = csub.add_parser(
        "upgrade", parents=[dbp], help="migrate the database schema to this version's"
    )
    p.set_defaults(func=cli_server.cmd_upgrade)
    p = csub.add_parser(
        "public-key", parents=[dbp], help="print the signing public key (to pin in clients)"
    )
    p.set_defaults(func=cli_server.cmd_public_key)

    token = subparsers.add_parser("token", help="API tokens (admin)")
    tsub = token.add_subparsers(dest="token_command", required=True)
    p = tsub.add_parser("create", parents=[conn], help="make a token; printed on the last line")
    p.add_argument(
        "--role",
        required=True,
        choices=["admin", "author", "reviewer", "pipeline", "auditor", "requester"],
    )
    p.add_argument("--name", required=True, help="who or what uses it")
    p.add_argument("--labels", default="", help="policy labels a pipeline token may use: L1,L2")
    p.add_argument("--expires-in", type=int, metavar="SECONDS")
    p.set_defaults(func=cmd_token_create)
    p = tsub.add_parser("revoke", parents=[conn], help="revoke a token by id")
    p.add_argument("token_id")
    p.set_defaults(func=cmd_token_revoke)
    p = tsub.add_parser("list", parents=[conn], help="list tokens (never secrets)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_token_list)

    key = subparsers.add_parser("key", help="named secrets (admin)")
    ksub = key.add_subparsers(dest="key_command", required=True)
    p = ksub.add_parser("create", parents=[conn], help="make a random 32-byte key server-side")
    p.add_argument("name")
    p.add_argument("--labels", required=True, help="labels whose pipelines may read it: L1,L2")
    p.set_defaults(func=cmd_key_create)
    p = ksub.add_parser("rotate", parents=[conn], help="add a new current version")
    p.add_argument("name")
    p.set_defaults(func=cmd_key_rotate)
    p = ksub.add_parser("list", parents=[conn], help="names, labels, versions (never material)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_key_list)

    if policy_subparsers is None:
        policy = subparsers.add_parser("policy", help="policies on the coordinator")
        policy_subparsers = policy.add_subparsers(dest="policy_command", required=True)
    psub = policy_subparsers
    p = psub.add_parser("push", parents=[conn], help="push a new draft; prints its version")
    p.add_argument("file")
    p.set_defaults(func=cmd_policy_push)
    for verb, helptext in (
        ("submit", "send a draft to review"),
        ("approve", "approve and activate (a reviewer, not the author)"),
        ("reject", "reject with --reason"),
        ("rollback", "re-activate a superseded version, with --reason (a reviewer)"),
    ):
        p = psub.add_parser(verb, parents=[conn], help=helptext)
        p.add_argument("label")
        p.add_argument("version", type=int)
        if verb in ("reject", "rollback"):
            p.add_argument("--reason", required=True)
        p.set_defaults(func=cmd_policy_transition, verb=verb)
    p = psub.add_parser("diff", parents=[conn], help="diff two versions")
    p.add_argument("label")
    p.add_argument("old", type=int)
    p.add_argument("new", type=int)
    p.set_defaults(func=cmd_policy_diff)
    p = psub.add_parser("history", parents=[conn], help="versions of a label and their states")
    p.add_argument("label")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_policy_history)
    p = psub.add_parser("show", parents=[conn], help="a version's document (default: active)")
    p.add_argument("label")
    p.add_argument("version", type=int, nargs="?")
    p.set_defaults(func=cmd_policy_show)
    from .workflow_cli import register as register_workflow

    register_workflow(subparsers, psub, conn)
    from .catalog_cli import register as register_catalog

    register_catalog(subparsers, conn)

    audit = subparsers.add_parser("audit", help="the audit trail")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    p = asub.add_parser(
        "verify", parents=[conn], help="check the hash chain; exit 0 only when intact"
    )
    p.add_argument("--expect", metavar="SEQ:HASH", help="an anchor kept outside the database")
    p.add_argument(
        "--anchor",
        metavar="FILE|URL",
        help="an anchor kept outside the database: a JSONL audit copy, a saved"
        " GET /v1/audit/anchor answer, or that endpoint's URL",
    )
    p.add_argument("--db", help="verify this database directly instead of asking the coordinator")
    p.add_argument("--key-file", help="with --db: the master key file (default: <db>.key)")
    p.set_defaults(func=cmd_audit_verify)
    p = asub.add_parser("list", parents=[conn], help="audit entries as JSON lines")
    p.add_argument("--run", dest="run_id")
    p.add_argument("--label")
    p.add_argument("--event")
    p.add_argument("--since", help="RFC 3339 time (inclusive)")
    p.add_argument("--until", help="RFC 3339 time (exclusive)")
    p.add_argument("--after-seq", type=int, default=0)
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=cmd_audit_list)

    runs = subparsers.add_parser("runs", help="pipeline runs")
    rsub = runs.add_subparsers(dest="runs_command", required=True)
    p = rsub.add_parser("list", parents=[conn], help="runs: running, succeeded, failed, lost")
    p.add_argument("--status", choices=["running", "succeeded", "failed", "lost"])
    p.add_argument("--label")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_runs_list)


# ---- helpers ----------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Any:
    from coordinator_client import Client

    url = args.coordinator or os.environ.get(URL_ENV)
    token = args.token or os.environ.get(TOKEN_ENV)
    if not url:
        raise UsageError(f"no coordinator: pass --coordinator URL or set {URL_ENV}")
    if not token:
        raise UsageError(f"no token: pass --token or set {TOKEN_ENV}")
    return Client(url, token, timeout=(3.05, args.timeout))


def _labels(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _print_json(value: Any) -> None:
    print(json.dumps(value, sort_keys=True))


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    print("\t".join(columns))
    for row in rows:
        print("\t".join("" if row.get(c) is None else str(row.get(c)) for c in columns))


def cmd_token_create(args: argparse.Namespace) -> int:
    """Make a token; the token alone on the last line."""
    with _client(args) as client:
        info = client.create_token(
            args.name, args.role, labels=_labels(args.labels), expires_in=args.expires_in
        )
    labels = f" labels {','.join(info['labels'])}" if info["labels"] else ""
    expiry = f" expires {info['expires_at']}" if info["expires_at"] else ""
    print(f"token {info['id']} for {info['name']} (role {info['role']}){labels}{expiry}")
    print(info["token"])
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    """Revoke a token by id."""
    with _client(args) as client:
        info = client.revoke_token(args.token_id)
    print(f"revoked token {info['id']} ({info['name']})")
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    """List tokens."""
    with _client(args) as client:
        rows = client.list_tokens()
    if args.json:
        for row in rows:
            _print_json(row)
    else:
        _table(rows, ["id", "name", "role", "labels", "expires_at", "revoked_at"])
    return 0


def cmd_key_create(args: argparse.Namespace) -> int:
    """Make a named random key for the given labels."""
    labels = _labels(args.labels)
    if not labels:
        raise UsageError("--labels needs at least one label")
    with _client(args) as client:
        info = client.create_key(args.name, labels)
    print(f"key {info['name']} version {info['current']} for {','.join(info['labels'])}")
    return 0


def cmd_key_rotate(args: argparse.Namespace) -> int:
    """Rotate a key."""
    with _client(args) as client:
        info = client.rotate_key(args.name)
    print(f"key {info['name']} now at version {info['current']}")
    return 0


def cmd_key_list(args: argparse.Namespace) -> int:
    """List keys (never material)."""
    with _client(args) as client:
        rows = client.list_keys()
    if args.json:
        for row in rows:
            _print_json(row)
    else:
        _table(
            [{**r, "labels": ",".join(r["labels"])} for r in rows], ["name", "current", "labels"]
        )
    return 0


def read_policy_file(path: str) -> dict[str, Any]:
    """A policy file as a mapping; YAML errors become a PolicyError with the line."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        loc = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "policy"
        raise PolicyError([(loc, "malformed YAML/JSON")], source=path) from None
    if not isinstance(data, dict):
        raise PolicyError([("policy", "a policy must be a mapping")], source=path)
    return data


def cmd_policy_push(args: argparse.Namespace) -> int:
    """Push a policy file; the new version alone on the last line."""
    document = read_policy_file(args.file)
    with _client(args) as client:
        info = client.push_policy(document)
    print(f"pushed {info['label']} version {info['version']} (draft, sha256 {info['sha256'][:12]})")
    print(info["version"])
    return 0


def cmd_policy_transition(args: argparse.Namespace) -> int:
    """submit, approve, reject or roll back to a version."""
    with _client(args) as client:
        if args.verb == "submit":
            info = client.submit_policy(args.label, args.version)
        elif args.verb == "approve":
            info = client.approve_policy(args.label, args.version)
        elif args.verb == "rollback":
            path = f"/v1/policies/{args.label}/versions/{int(args.version)}/rollback"
            info = client.request("POST", path, json_body={"reason": args.reason}).json()
        else:
            info = client.reject_policy(args.label, args.version, args.reason)
    print(f"{info['label']} version {info['version']} is now {info['state']}")
    return 0


def cmd_policy_diff(args: argparse.Namespace) -> int:
    """Print a unified diff of two versions."""
    with _client(args) as client:
        sys.stdout.write(client.diff_policy(args.label, args.old, args.new))
    return 0


def cmd_policy_history(args: argparse.Namespace) -> int:
    """Print the versions of a label."""
    with _client(args) as client:
        rows = client.policy_history(args.label)
    if args.json:
        for row in rows:
            _print_json(row)
    else:
        _table(rows, ["version", "state", "author", "reviewed_by", "created_at", "reason"])
    return 0


def cmd_policy_show(args: argparse.Namespace) -> int:
    """Print a version's document as YAML (the active one by default)."""
    from .store import canonical_yaml

    with _client(args) as client:
        version = args.version
        if version is None:
            active = [r for r in client.policy_history(args.label) if r["state"] == "active"]
            if not active:
                raise UsageError(f"policy {args.label} has no active version; give a version")
            version = active[0]["version"]
        info = client.show_policy(args.label, version)
    print(f"# {info['label']} version {info['version']}: {info['state']}, sha256 {info['sha256']}")
    sys.stdout.write(canonical_yaml(info["document"]))
    return 0


def _expect(text: str | None) -> tuple[int, str] | None:
    if not text:
        return None
    seq, sep, digest = text.partition(":")
    if not sep or not seq.isdigit() or len(digest) != 64:
        raise UsageError("--expect takes SEQ:HASH (the hash as 64 hex digits)")
    return int(seq), digest


def _external_anchor(args: argparse.Namespace) -> dict[str, Any]:
    """The anchor ``--anchor`` names: ``{count, hash[, signature]}`` read from a URL (with
    the caller's token), a saved anchor JSON, or the last anchor of a JSONL audit copy."""
    source = args.anchor
    if source.startswith(("http://", "https://")):
        import requests

        token = args.token or os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            resp = requests.get(source, headers=headers, timeout=args.timeout)
        except requests.RequestException as exc:
            raise UsageError(f"cannot fetch the anchor: {type(exc).__name__}") from None
        if resp.status_code != 200:
            raise UsageError(f"cannot fetch the anchor: HTTP {resp.status_code}")
        found: Any = resp.json()
    else:
        try:
            lines = Path(source).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UsageError(f"cannot read the anchor file: {exc.strerror}") from None
        found = None
        for line in reversed([x for x in lines if x.strip()]):
            item = json.loads(line)
            if "count" in item and "hash" in item:
                found = item
            elif isinstance(item.get("anchor"), dict):
                found = item["anchor"]
            elif "seq" in item and "hash" in item:
                found = {"count": item["seq"], "hash": item["hash"]}
            if found is not None:
                break
    if not isinstance(found, dict) or "count" not in found or "hash" not in found:
        raise UsageError(f"no anchor in {source}")
    return found


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Verify the chain (through the coordinator, or a database directly with --db),
    optionally against an anchor kept outside the database (--expect, --anchor)."""
    expect = _expect(args.expect)
    external = _external_anchor(args) if getattr(args, "anchor", None) else None
    if external is not None and int(external["count"]) > 0:
        expect = (int(external["count"]), str(external["hash"]))
    if args.db:
        from .config import Paths, Settings
        from .coordinator import Coordinator
        from .crypto import b64d, verify_signature
        from .services.chain import anchor_message

        coord = Coordinator.open(Paths.resolve(args.db, args.key_file), Settings())
        try:
            if external is not None and "signature" in external:
                message = anchor_message(int(external["count"]), str(external["hash"]))
                if not verify_signature(coord.public_key, b64d(external["signature"]), message):
                    raise UsageError("the external anchor's signature does not verify")
            result = coord.verify_audit(expect).__dict__
        finally:
            coord.close()
    else:
        with _client(args) as client:
            result = client.verify_audit(expect)
    for problem in result["problems"]:
        print(f"problem: {problem}")
    if result["intact"]:
        print(f"intact: {result['count']} entries; anchor {result['count']}:{result['last_hash']}")
        return 0
    print(f"NOT intact: {len(result['problems'])} problem(s) in {result['count']} entries")
    return 1


def cmd_audit_list(args: argparse.Namespace) -> int:
    """Print audit entries, one JSON object per line."""
    with _client(args) as client:
        rows = client.list_audit(
            run_id=args.run_id,
            label=args.label,
            event=args.event,
            since=args.since,
            until=args.until,
            after_seq=args.after_seq,
            limit=args.limit,
        )
    for row in rows:
        _print_json(row)
    return 0


def cmd_runs_list(args: argparse.Namespace) -> int:
    """Print pipeline runs."""
    with _client(args) as client:
        rows = client.list_runs(status=args.status, label=args.label, limit=args.limit)
    if args.json:
        for row in rows:
            _print_json(row)
    else:
        _table(
            rows,
            [
                "run_id",
                "status",
                "engine",
                "label",
                "version",
                "rows_in",
                "rows_out",
                "started_at",
                "ended_at",
                "running_on",
            ],
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """A stand-alone ``python -m cape_coordinator`` with the same subcommands and error contract."""
    parser = argparse.ArgumentParser(prog="python -m cape_coordinator")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub, None)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (CapeError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
