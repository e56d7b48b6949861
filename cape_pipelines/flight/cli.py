"""``cape flight serve``: run the Flight service from the command line.

Datasets are ``--dataset NAME=PATH`` (a CSV/Parquet file or directory),
protected by the policy label of the same name unless ``--label NAME=LABEL``
says otherwise. Policies and keys come from a coordinator (``--coordinator
URL``: each caller's bearer token is checked there; pin the signing key with
``--public-key`` or ``CAPE_COORDINATOR_PUBLIC_KEY``), or from policy files
(``--policy FILE``, keys from ``CAPE_KEY_<NAME>``) with tokens from
``--tokens FILE`` (JSON ``{"token": ["label", ...]}``). The service prints one
line ``cape flight: serving on URI`` once it accepts calls, and stops cleanly
on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from ..errors import CapeError


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def register(sub: Any) -> None:
    """Add ``cape flight serve`` to the ``cape`` parser's subcommands."""
    fl = sub.add_parser("flight", help="Arrow Flight service (datasets and transformation)")
    fsub = fl.add_subparsers(dest="flight_command", metavar="ACTION", required=True)
    p = fsub.add_parser("serve", help="serve datasets through their policies over Arrow Flight")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8815, help="port (0 picks a free one)")
    p.add_argument("--dataset", action="append", type=_pair, default=[], metavar="NAME=PATH")
    p.add_argument("--label", action="append", type=_pair, default=[], metavar="NAME=LABEL")
    p.add_argument("--coordinator", metavar="URL", help="check tokens, fetch policies there")
    p.add_argument("--public-key", metavar="KEY", help="the coordinator's signing key (pinned)")
    p.add_argument("--state-dir", metavar="DIR", help="audit spool and policy cache directory")
    p.add_argument("--policy", action="append", default=[], metavar="FILE", help="policy file")
    p.add_argument("--tokens", metavar="FILE", help='JSON {"token": ["label", ...]}')
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="with --policy: accept callers without a token (loopback testing only)",
    )
    p.add_argument("--audit-file", metavar="FILE", help="with --policy: append audit records here")
    p.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    p.add_argument("--batch-rows", type=int, default=65_536, help="rows per batch (65536)")
    p.add_argument(
        "--lineage",
        action="store_true",
        help="send OpenLineage events per stream (transport from openlineage.yml, "
        "OPENLINEAGE__TRANSPORT__* or OPENLINEAGE_URL; see docs/lineage.md)",
    )
    p.set_defaults(func=_cmd_serve)


def _access(args: argparse.Namespace) -> Any:
    from .access import CoordinatorAccess, StaticAccess

    if args.coordinator:
        if args.policy or args.tokens or args.no_auth:
            raise CapeError("--coordinator takes policies and tokens from the coordinator")
        state = Path(args.state_dir or Path.home() / ".cache" / "cape" / "flight")
        return CoordinatorAccess(args.coordinator, public_key=args.public_key, state_dir=state)
    if not args.policy:
        raise CapeError("give --coordinator URL, or --policy FILE (with --tokens or --no-auth)")
    if bool(args.tokens) == bool(args.no_auth):
        raise CapeError("with --policy, give exactly one of --tokens FILE and --no-auth")
    tokens = None
    if args.tokens:
        try:
            tokens = json.loads(Path(args.tokens).read_text(encoding="utf-8"))
        except ValueError as exc:
            raise CapeError(f"{args.tokens}: not JSON: {exc}") from None
        if not isinstance(tokens, dict) or not all(isinstance(v, list) for v in tokens.values()):
            raise CapeError(f'{args.tokens}: expected {{"token": ["label", ...]}}')
    audit: Any = None
    if args.audit_file:
        from ..audit import JsonlSink

        audit = JsonlSink(args.audit_file)
    return StaticAccess([Path(p) for p in args.policy], tokens=tokens, audit=audit)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import CapeFlightServer, Dataset

    if not args.dataset:
        raise CapeError("give at least one --dataset NAME=PATH")
    labels = dict(args.label)
    unknown = sorted(set(labels) - {n for n, _ in args.dataset})
    if unknown:
        raise CapeError(f"--label names datasets that are not served: {', '.join(unknown)}")
    datasets = [Dataset(n, Path(p), labels.get(n, n)) for n, p in args.dataset]
    for ds in datasets:
        if not ds.path.exists():
            raise CapeError(f"dataset {ds.name!r}: {ds.path} does not exist")
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise CapeError("TLS needs both --tls-cert and --tls-key")
        tls = [(Path(args.tls_cert).read_bytes(), Path(args.tls_key).read_bytes())]
    scheme = "grpc+tls" if tls else "grpc+tcp"
    server = CapeFlightServer(
        f"{scheme}://{args.host}:{args.port}",
        datasets,
        _access(args),
        tls_certificates=tls,
        batch_rows=args.batch_rows,
        lineage=args.lineage,
    )

    def stop(signum: int, frame: Any) -> None:
        # shutdown() waits for calls in progress; it must not run in the serving thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"cape flight: serving on {scheme}://{args.host}:{server.port}", flush=True)
    server.serve()
    print("cape flight: stopped", file=sys.stderr)
    return 0
