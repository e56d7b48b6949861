"""The ``cape`` command line: validate and plan policies, apply them to files, reveal tokens.

Every refused action exits non-zero with a one-line reason on stderr (a
malformed policy lists each of its problems) and no traceback; ``--debug`` (or
``CAPE_DEBUG=1``) shows the traceback too. Exit codes: 0 success, 1 refused
(policy, plan, key, data or file error), 2 usage error, 70 internal error,
130 interrupted.

The command groups live in :mod:`cape_pipelines.commands` (one module each);
this module builds the parser, runs ``cape apply`` and maps errors to exit codes.
The parser is extensible: :func:`build_parser` calls
``cape_coordinator.cli.register(subparsers, policy_subparsers)`` when that
module is importable, so the coordinator adds its own commands (``cape
coordinator ...``, ``cape policy push|submit|approve|...``). A command is a
subparser with ``set_defaults(func=handler)``; ``handler(args)`` returns an
exit code (None means 0) and raises :class:`~cape_pipelines.CapeError` or
``OSError`` to refuse.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from . import __version__
from .commands.common import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    Handler,
    _add_io_options,
    _audit_target,
    _csv_options,
    _debug_parent,
    _positive_int,
    _setup_logging,
    load_keys,
)
from .commands.demo import DEMO_KEY_NAMES, _cmd_demo, demo_keys, demo_paths, run_demo, write_samples
from .commands.policy import _catalog_tags, _cmd_plan, _cmd_schema, _cmd_validate
from .commands.reveal import _cmd_reveal, reveal_policy
from .commands.signals import Terminated, _stop_signals_as_interrupts
from .errors import CapeError, KeyMissingError, PlanError
from .inputs import format_of
from .io import apply_files
from .keys import env_var_name

# -- small helpers shared by the commands ---------------------------------------------------


# -- cape policy ... ------------------------------------------------------------------------


# -- cape apply / reveal --------------------------------------------------------------------


def _coordinator_client(args: argparse.Namespace) -> Any:
    """The client ``--coordinator``/``--token``/``--public-key`` (or their variables) describe."""
    try:
        from coordinator_client import Client
    except ImportError:
        raise CapeError(
            "--policy-label needs the coordinator client: install the 'coordinator' extra"
        ) from None
    url = args.coordinator or os.environ.get("CAPE_COORDINATOR_URL")
    token = args.token or os.environ.get("CAPE_TOKEN")
    if not url:
        raise CapeError("--policy-label needs --coordinator URL or CAPE_COORDINATOR_URL")
    if not token:
        raise CapeError("--policy-label needs --token or CAPE_TOKEN (a pipeline token)")
    key_cache = None
    if args.key_cache or os.environ.get("CAPE_KEY_CACHE_DIR"):
        from coordinator_client import KeyCache

        key_cache = KeyCache.from_settings(
            args.key_cache, key_file=args.key_cache_key_file, ttl=args.key_cache_ttl
        )
    # None lets the client read CAPE_COORDINATOR_PUBLIC_KEY and CAPE_POLICY_MAX_AGE.
    return Client(
        url,
        token,
        public_key=args.public_key,
        policy_max_age=args.policy_max_age,
        key_cache=key_cache,
    )


def _close_client(client: Any, sink: Any) -> None:
    """Deliver the run's records to the coordinator (up to 10 s); say so if some wait in the
    spool. ``sink`` is None when the records went elsewhere or the run never started."""
    delivered = sink.flush(10.0) if sink is not None else True
    client.close()
    if not delivered:
        print(
            f"cape: {sink.pending_count()} audit record(s) wait in {sink.pending}; "
            "the next run using this coordinator delivers them",
            file=sys.stderr,
        )


def _cmd_apply(args: argparse.Namespace) -> int:
    keys = load_keys(args.keys_file, args.key)
    # --coordinator/--token also serve --dataset (the catalog); the rest only --policy-label.
    coordinator_only = (
        (args.coordinator or args.token) and not args.dataset,
        args.public_key,
        args.policy_max_age is not None,
        args.key_cache,
        args.key_cache_key_file,
        args.key_cache_ttl is not None,
    )
    if args.policy and any(coordinator_only):
        raise CapeError(
            "--coordinator and --token go with --policy-label or --dataset; --public-key,"
            " --policy-max-age and --key-cache* with --policy-label"
        )
    policy: Any = Path(args.policy) if args.policy else None
    client = sink = None
    run_from: dict[str, Any] = {"audit": _audit_target(args)}
    try:
        if args.policy_label:
            from .source import resolve_policy

            client = _coordinator_client(args)
            # The signature is verified here, before the input is opened.
            src = resolve_policy(
                args.policy_label, client=client, keys=keys, audit=_audit_target(args)
            )
            policy = src.policy
            sink = None if args.audit_file else src.audit
            run_from = {"audit": src.audit, "resolver": src.resolver, "policy_source": src.source}
        if args.dataset:
            # {tag: ...} rules bind to the columns the catalog tags in --dataset (every engine
            # gets them through the same binding as column_tags=).
            run_from["column_tags"] = _catalog_tags(args)
        result = _apply_files_from(policy, args, keys, run_from)
    finally:
        if client is not None:
            _close_client(client, sink)
    c = result.counters
    print(
        f"wrote {result.output}: {c.rows_out:,} rows ({c.rows_redacted:,} redacted), "
        f"run {result.run_id}",
        file=sys.stderr,
    )
    return EXIT_OK


def _apply_files_from(
    policy: Any, args: argparse.Namespace, keys: Mapping[str, bytes], run_from: dict[str, Any]
) -> Any:
    return apply_files(
        policy,
        args.input,
        args.output,
        keys=keys,
        **run_from,
        format=args.format,
        csv_options=_csv_options(args),
        batch_size=args.batch_size,
        engine=args.engine,
        timestamp_unit=args.timestamp_unit,
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
        run_id=args.run_id,
        worker_keys="inline" if args.inline_keys else None,
        lineage=_lineage(args),
    )


def _lineage(args: argparse.Namespace) -> Any:
    if not args.lineage:
        if args.lineage_job or args.lineage_namespace:
            raise CapeError("--lineage-job and --lineage-namespace go with --lineage")
        return None
    from .lineage import Lineage, lineage_option

    lineage_option(True)  # a clear error now if the client is not installed
    return Lineage(
        job_name=args.lineage_job,
        namespace=args.lineage_namespace,
        catalog_dataset=args.dataset,
    )


# -- cape demo -------------------------------------------------------------------------------


# -- the parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``cape`` argument parser, with the coordinator's commands if it is installed."""
    common = _debug_parent()
    parser = argparse.ArgumentParser(
        prog="cape",
        description="Apply privacy policies (tokenize, perturb, round, truncate, redact) to data.",
    )
    parser.add_argument("--version", action="version", version=f"cape-pipelines {__version__}")
    parser.add_argument(
        "--debug", action="store_true", default=False, help="show tracebacks and debug logs"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    policy = sub.add_parser("policy", help="validate, inspect and plan policies", parents=[common])
    psub = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)

    p = psub.add_parser("validate", help="check a policy file", parents=[common])
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=_cmd_validate)

    p = psub.add_parser("schema", help="print the policy JSON Schema", parents=[common])
    p.set_defaults(func=_cmd_schema)

    p = psub.add_parser(
        "plan", help="show what a policy does to each column of a dataset", parents=[common]
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--data", required=True, metavar="PATH", help="CSV/Parquet file or directory")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--sample",
        type=int,
        metavar="N",
        help="with a risk: section, measure the risk figure on the first N rows (default: all)",
    )
    p.add_argument("--keys-file", metavar="FILE", help="check these keys are available")
    p.add_argument("--key", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--csv-type", action="append", default=[], metavar="COLUMN=TYPE")
    p.add_argument("--delimiter", default=",")
    p.add_argument(
        "--dataset",
        metavar="NAME",
        help="resolve {tag: ...} rules through the coordinator catalog's tags of NAME and "
        "report coverage (tagged columns no rule covers, rules that match nothing)",
    )
    p.add_argument("--coordinator", metavar="URL", help="with --dataset ($CAPE_COORDINATOR_URL)")
    p.add_argument("--token", help="with --dataset ($CAPE_TOKEN)")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("apply", help="apply a policy to CSV/Parquet files", parents=[common])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--policy", metavar="FILE", help="policy file (YAML/JSON)")
    which.add_argument(
        "--policy-label",
        metavar="LABEL",
        help="the active policy of LABEL on the coordinator (signature verified; keys and "
        "audit records through it)",
    )
    p.add_argument(
        "--coordinator", metavar="URL", help="with --policy-label (default $CAPE_COORDINATOR_URL)"
    )
    p.add_argument("--token", help="with --policy-label: a pipeline token (default $CAPE_TOKEN)")
    p.add_argument(
        "--dataset",
        metavar="NAME",
        help="resolve {tag: ...} rules through the coordinator catalog's tags of NAME",
    )
    p.add_argument(
        "--public-key",
        metavar="KEY",
        help="the coordinator's pinned signing key (default $CAPE_COORDINATOR_PUBLIC_KEY)",
    )
    p.add_argument(
        "--policy-max-age",
        type=float,
        metavar="SECONDS",
        help="with --policy-label: during an outage, use the cached policy only if it was "
        "last confirmed online at most this long ago (default $CAPE_POLICY_MAX_AGE or "
        "86400; 0 for no limit)",
    )
    p.add_argument(
        "--key-cache",
        metavar="DIR",
        help="with --policy-label: keep the label's keys sealed (AES-GCM) in DIR for runs "
        "during an outage (default $CAPE_KEY_CACHE_DIR; off unless set)",
    )
    p.add_argument(
        "--key-cache-key-file",
        metavar="FILE",
        help="the key cache's 32-byte wrapping key (default $CAPE_KEY_CACHE_KEY_FILE or "
        "$CAPE_KEY_CACHE_KEY)",
    )
    p.add_argument(
        "--key-cache-ttl",
        type=float,
        metavar="SECONDS",
        help="how long cached keys stay usable (default $CAPE_KEY_CACHE_TTL or 86400)",
    )
    _add_io_options(p)
    p.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a key by name, hex or base64:... (prefer --keys-file or CAPE_KEY_<NAME>)",
    )
    p.add_argument(
        "--engine",
        default="pandas",
        metavar="NAME",
        help="engine: pandas (default, in this process), or beam, dask, spark (their extras)",
    )
    p.add_argument(
        "--inline-keys",
        action="store_true",
        default=False,
        help="ship key bytes inside the engine's job (quick local runs only: anyone who can "
        "read the job can read the keys; by default workers get key references)",
    )
    p.add_argument(
        "--timestamp-unit",
        choices=["us", "ns"],
        default="us",
        help="Parquet timestamp unit for nanosecond columns (default us: Spark-readable)",
    )
    p.add_argument("--run-id", metavar="ID", help="the audit run id (default: a new UUID)")
    p.add_argument(
        "--lineage",
        action="store_true",
        help="send OpenLineage START/COMPLETE events (transport from openlineage.yml, "
        "OPENLINEAGE_CONFIG, OPENLINEAGE__TRANSPORT__* or OPENLINEAGE_URL)",
    )
    p.add_argument("--lineage-job", metavar="NAME", help="the job name (default cape.<label>)")
    p.add_argument(
        "--lineage-namespace",
        metavar="NS",
        help="the job namespace (default $OPENLINEAGE_NAMESPACE or cape)",
    )
    p.set_defaults(func=_cmd_apply)

    p = sub.add_parser(
        "reveal",
        help="reverse reversible tokens in chosen columns (key holders)",
        parents=[common],
    )
    _add_io_options(p)
    p.add_argument("--columns", required=True, metavar="A,B", help="columns holding tokens")
    p.add_argument(
        "--key",
        required=True,
        metavar="NAME[=VALUE]",
        help="the key's name (found in --keys-file or CAPE_KEY_<NAME>), or NAME=VALUE",
    )
    p.add_argument(
        "--on-error",
        choices=["error", "null"],
        default="error",
        help="a token that does not authenticate: stop (default) or write null",
    )
    p.set_defaults(func=_cmd_reveal)

    p = sub.add_parser(
        "demo", help="run the demo: bundled sample data and policy, demo keys", parents=[common]
    )
    p.add_argument("--output", metavar="PATH", help="keep the protected output here (.parquet)")
    p.add_argument("--audit-file", metavar="FILE", help="also append audit records here")
    p.add_argument("--rows", type=_positive_int, default=5, help="rows to show (default 5)")
    p.add_argument(
        "--write-samples",
        metavar="DIR",
        help="instead of running the demo: write customers.csv, policy.yaml and keys.yaml "
        "(public demo keys) into DIR, to try the other commands on",
    )
    p.set_defaults(func=_cmd_demo)

    _register_extensions(sub, psub)
    return parser


def _register_extensions(sub: Any, policy_sub: Any) -> None:
    # `cape flight serve` needs pyarrow.flight, which some pyarrow builds lack.
    try:
        flight_cli = importlib.import_module("cape_pipelines.flight.cli")
    except ImportError:
        pass
    else:
        flight_cli.register(sub)
    try:
        coordinator_cli = importlib.import_module("cape_coordinator.cli")
    except ImportError:
        return
    coordinator_cli.register(sub, policy_sub)


# -- main -----------------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, FileExistsError | IsADirectoryError):
        if exc.filename is not None and exc.strerror:
            return f"{exc.strerror}: {exc.filename}"
    text = str(exc).strip()
    return text or type(exc).__name__


def _hint(exc: BaseException, args: argparse.Namespace) -> str:
    """What a command-line user can do about ``exc``, in their terms (not the Python API's)."""
    if isinstance(exc, KeyMissingError):
        name = exc.key_name
        return (
            f"; give it with --key {name}=HEX, a '{name}: HEX' line in --keys-file FILE, "
            f"or the environment variable {env_var_name(name)}"
        )
    if isinstance(exc, PlanError) and _header_only_csv(getattr(args, "input", None)):
        return (
            "; the CSV has no data rows, so every column was read as text: "
            "pin the types with --csv-type COLUMN=TYPE"
        )
    return ""


def _header_only_csv(path: str | None) -> bool:
    """Whether ``path`` is a CSV file with a header and no data rows (error path only)."""
    if not path or format_of(path) != "csv" or not os.path.isfile(path):
        return False
    try:
        with pa.input_stream(path, compression="detect") as raw:
            head = raw.read(1 << 16)
    except (OSError, pa.ArrowException):
        return False
    lines = [line for line in head.splitlines() if line.strip()]
    return len(lines) == 1 and len(head) < (1 << 16)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cape`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    debug = bool(getattr(args, "debug", False)) or os.environ.get("CAPE_DEBUG") == "1"
    _setup_logging(debug, bool(getattr(args, "verbose", False)))
    handler: Handler = args.func
    try:
        with _stop_signals_as_interrupts():
            return int(handler(args) or EXIT_OK)
    except Terminated as exc:
        if debug:
            traceback.print_exc()
        print(f"cape: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("cape: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`cape policy schema | head`): not an error worth a message.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except (CapeError, OSError) as exc:
        if debug:
            traceback.print_exc()
        text = _reason(exc)
        if isinstance(exc, KeyMissingError):
            # The Python API's name for "keys you passed" means nothing on the command line.
            text = text.replace("(tried: keys=, ", "(tried: --key, --keys-file, ")
        print(f"cape: error: {text}{_hint(exc, args)}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as exc:
        if debug:
            traceback.print_exc()
        print(
            f"cape: internal error: {type(exc).__name__}: {_reason(exc).splitlines()[0]} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


# Re-exported: examples, tests and scripts import these from here, where they always were.
__all__ = [
    "DEMO_KEY_NAMES",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "Terminated",
    "build_parser",
    "demo_keys",
    "demo_paths",
    "load_keys",
    "main",
    "reveal_policy",
    "run_demo",
    "write_samples",
]

if __name__ == "__main__":
    sys.exit(main())
