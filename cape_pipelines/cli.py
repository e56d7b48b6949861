"""The ``cape`` command line: validate and plan policies, apply them to files, reveal tokens.

Every refused action exits non-zero with a one-line reason on stderr (a
malformed policy lists each of its problems) and no traceback; ``--debug`` (or
``CAPE_DEBUG=1``) shows the traceback too. Exit codes: 0 success, 1 refused
(policy, plan, key, data or file error), 2 usage error, 70 internal error,
130 interrupted.

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
import codecs
import contextlib
import hashlib
import importlib
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from . import __version__
from .errors import CapeError, KeyMissingError, PlanError
from .inputs import format_of, open_inputs
from .io import DEFAULT_BATCH_SIZE, CsvOptions, apply_files, parse_arrow_type
from .keys import KeyRef, KeyResolver, decode_key_text, env_var_name

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], "int | None"]


# -- small helpers shared by the commands ---------------------------------------------------


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Logs to whatever ``sys.stderr`` is at the time (so redirection and tests see it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _QuietAudit(logging.Filter):
    """Drops audit records on their way to stderr unless ``--verbose`` asked for them.

    Three JSON lines before every error message buried the message; records a
    user wants are written where asked (``--audit-file``, ``CAPE_AUDIT_FILE``,
    the coordinator), or on stderr with ``--audit-file -`` or ``--verbose``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.verbose = False

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbose or record.name != "cape_pipelines.audit"


class _StderrSink:
    """``--audit-file -``: each record as one JSON line on stderr."""

    def emit(self, record: Mapping[str, Any]) -> None:
        sys.stderr.write(json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        return None


def _setup_logging(debug: bool, verbose: bool = False) -> None:
    """Warnings of the package on stderr, once; audit records too with ``verbose``."""
    logger = logging.getLogger("cape_pipelines")
    handler = next((h for h in logger.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("cape: %(name)s: %(message)s"))
        handler.addFilter(_QuietAudit())
        logger.addHandler(handler)
    for f in handler.filters:
        if isinstance(f, _QuietAudit):
            f.verbose = verbose or debug
    logger.setLevel(logging.DEBUG if debug else logging.INFO)


def load_keys(keys_file: str | None, key_args: Sequence[str]) -> dict[str, bytes]:
    """Keys from ``--keys-file`` (a YAML/JSON mapping of name to hex or ``base64:...``)
    and ``--key NAME=VALUE`` arguments (later ones win). Values never appear in errors."""
    keys: dict[str, bytes] = {}
    if keys_file:
        path = Path(keys_file)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            raise CapeError(f"keys file {path} is not valid YAML/JSON") from None
        if not isinstance(raw, Mapping):
            raise CapeError(f"keys file {path} must be a mapping of key name to hex value")
        for name, value in raw.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise CapeError(
                    f'keys file {path}: each entry must be NAME: "<hex or base64:...>" '
                    f"(entry {str(name)!r} is not)"
                )
            keys[name] = decode_key_text(value, f"key {name!r} in {path}")
    for arg in key_args:
        name, sep, value = arg.partition("=")
        if not sep or not name:
            raise CapeError("--key takes NAME=VALUE (VALUE in hex or base64:...)")
        keys[name] = decode_key_text(value, f"--key {name}")
    return keys


def _csv_types(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        name, sep, type_name = pair.partition("=")
        if not sep or not name:
            raise CapeError("--csv-type takes COLUMN=TYPE, e.g. zip=string")
        try:
            out[name] = parse_arrow_type(type_name)
        except ValueError as exc:
            raise CapeError(f"--csv-type {name}: {exc}") from None
    return out


def _csv_options(args: argparse.Namespace) -> CsvOptions:
    delimiter = {"\\t": "\t", "tab": "\t"}.get(args.delimiter, args.delimiter)
    if len(delimiter) != 1:
        raise CapeError("--delimiter takes one character (or '\\t' or 'tab' for a tab)")
    encoding = getattr(args, "encoding", None) or "utf-8"
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise CapeError(f"--encoding {encoding}: unknown encoding") from None
    return CsvOptions(
        delimiter=delimiter, column_types=_csv_types(args.csv_type), encoding=encoding
    )


def _audit_target(args: argparse.Namespace) -> Any:
    if args.audit_file == "-":
        return _StderrSink()
    return args.audit_file or None


# -- cape policy ... ------------------------------------------------------------------------


def _cmd_validate(args: argparse.Namespace) -> int:
    from .policy import load_policy

    pol = load_policy(Path(args.file))
    print(f"ok: {pol.label} v{pol.version} sha256:{pol.sha256}")
    return EXIT_OK


def _cmd_schema(args: argparse.Namespace) -> int:
    from .policy import policy_json_schema

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
    from .io import open_inputs
    from .plan import build_plan
    from .policy import load_policy

    pol = load_policy(Path(args.file))
    inputs = open_inputs(args.data, csv_options=_csv_options(args))
    resolver = _PlanResolver(load_keys(args.keys_file, args.key))
    # {tag: ...} rules resolve through the catalog's tags of --dataset, as column_tags= does.
    tags = _catalog_tags(args) if args.dataset else {}
    plan = build_plan(pol, inputs.schema, resolver=resolver, column_tags=tags)
    rows = plan.describe()
    coverage = None
    if args.dataset:
        from .coverage import coverage_report

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
    )


def reveal_policy(columns: Sequence[str], key_name: str, on_error: str = "error") -> dict[str, Any]:
    """The in-memory policy ``cape reveal`` runs: token-reverser over ``columns``."""
    return {
        "label": "cape-reveal",
        "description": "token-reverser over chosen columns (cape reveal)",
        "rules": [
            {
                "match": {"names": list(columns)},
                "actions": [
                    {
                        "transform": {
                            "type": "token-reverser",
                            "key": {"secret": key_name},
                            "on_error": on_error,
                        }
                    }
                ],
            }
        ],
    }


def _cmd_reveal(args: argparse.Namespace) -> int:
    columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    if not columns:
        raise CapeError("--columns needs at least one column name")
    keys = load_keys(args.keys_file, [])
    name, sep, value = args.key.partition("=")
    if not name:
        raise CapeError("--key takes NAME or NAME=VALUE")
    if sep:
        keys[name] = decode_key_text(value, f"--key {name}")
    present = open_inputs(args.input, csv_options=_csv_options(args)).schema.names
    absent = [c for c in columns if c not in present]
    if absent:
        raise CapeError(
            f"--columns: no column {', '.join(map(repr, absent))} in {args.input} "
            f"(columns: {', '.join(present)})"
        )
    result = apply_files(
        reveal_policy(columns, name, args.on_error),
        args.input,
        args.output,
        keys=keys,
        audit=_audit_target(args),
        format=args.format,
        csv_options=_csv_options(args),
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
        policy_source="cape reveal",
    )
    print(
        f"wrote {result.output}: {result.counters.rows_out:,} rows, revealed {', '.join(columns)}",
        file=sys.stderr,
    )
    return EXIT_OK


# -- cape demo -------------------------------------------------------------------------------

DEMO_KEY_NAMES = ("demo-email-key", "demo-name-key", "demo-phone-key", "demo-noise-key")


def demo_keys() -> dict[str, bytes]:
    """PUBLIC demo keys, derived from their names: for ``cape demo`` only, never for real data."""
    return {
        name: hashlib.sha256(
            b"cape-pipelines PUBLIC DEMO KEY, never use for real data: " + name.encode()
        ).digest()
        for name in DEMO_KEY_NAMES
    }


def demo_paths() -> tuple[Path, Path]:
    """The bundled sample dataset and demo policy."""
    data = Path(str(resources.files("cape_pipelines") / "data"))
    return data / "customers.csv", data / "demo_policy.yaml"


def _show(title: str, table: Any, rows: int) -> None:
    try:
        import pandas as pd
    except ImportError:  # pandas is an optional extra; Arrow prints a table too
        print(f"\n{title}")
        print(table.slice(0, rows).to_string(preview_cols=20))
        return

    frame = table.slice(0, rows).to_pandas(integer_object_nulls=True)
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(f"\n{title}")
        print(frame.to_string(index=False, max_colwidth=22))


def run_demo(output: str | None = None, audit_file: str | None = None, rows: int = 5) -> int:
    """The main job on embedded defaults: sample data + demo policy + demo keys."""
    import tempfile

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from .api import apply_policy
    from .audit import JsonlSink, MemorySink, MultiSink, Sink

    data, policy = demo_paths()
    keys = demo_keys()
    memory = MemorySink()
    sinks: list[Sink] = [memory]
    if audit_file:
        sinks.append(JsonlSink(audit_file))
    print(
        "Cape Pipelines demo (synthetic data; keys are PUBLIC demo keys, never use them for real)"
    )
    print(f"  data:   {data}")
    print(f"  policy: {policy}")
    _show("Before (first rows of the sample data):", pacsv.read_csv(data), rows)
    with tempfile.TemporaryDirectory(prefix="cape-demo-") as tmp:
        out = Path(output) if output else Path(tmp) / "customers_protected.parquet"
        result = apply_files(policy, data, out, keys=keys, audit=MultiSink(sinks), overwrite=True)
        protected = pq.read_table(out)
        stamped = {
            k.decode(): v.decode()
            for k, v in (protected.schema.metadata or {}).items()
            if k.startswith(b"cape.")
        }
    _show("After (first rows written by the policy):", protected, rows)
    reveal = apply_policy(
        reveal_policy(["phone"], "demo-phone-key"),
        protected.select(["customer_id", "phone"]).slice(0, rows),
        keys=keys,
        audit=MemorySink(),
    )
    _show("A key holder reveals the phone tokens (cape reveal):", reveal, rows)
    c = result.counters
    print(
        f"\n{c.rows_in:,} rows in, {c.rows_out:,} written, "
        f"{c.rows_redacted:,} removed by row-redact"
    )
    print("Parquet metadata: " + json.dumps(stamped, indent=None))
    if output:
        print(f"output kept at {out}")
    print("\nAudit records of this run:")
    for rec in memory.records:
        print(json.dumps(rec, indent=2, sort_keys=True))
    return EXIT_OK


def write_samples(directory: str | os.PathLike[str]) -> list[Path]:
    """Copy the sample data and demo policy into ``directory``, with a keys file of the
    PUBLIC demo keys, so the README's "Using it" commands run as written there."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    data, policy = demo_paths()
    keys = "".join(f"{name}: {value.hex()}\n" for name, value in sorted(demo_keys().items()))
    files = {
        target / "customers.csv": data.read_bytes(),
        target / "policy.yaml": policy.read_bytes(),
        target / "keys.yaml": (
            "# PUBLIC demo keys (cape demo): anyone can derive them; never use for real data.\n"
            + keys
        ).encode(),
    }
    existing = [str(p) for p in files if p.exists()]
    if existing:
        raise CapeError(f"--write-samples: {', '.join(existing)} already exist(s); not replaced")
    for path, content in files.items():
        path.write_bytes(content)
    return list(files)


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.write_samples:
        for path in write_samples(args.write_samples):
            print(f"wrote {path}", file=sys.stderr)
        return EXIT_OK
    return run_demo(output=args.output, audit_file=args.audit_file, rows=args.rows)


# -- the parser -----------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _add_io_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, metavar="PATH", help="CSV/Parquet file or directory")
    p.add_argument("--output", required=True, metavar="PATH", help="output file (.csv/.parquet)")
    p.add_argument(
        "--format", choices=["csv", "parquet"], help="output format (default: from --output)"
    )
    p.add_argument("--keys-file", metavar="FILE", help="YAML/JSON mapping: key name -> hex")
    p.add_argument(
        "--audit-file", metavar="FILE", help="append audit records (JSONL) here; '-': stderr"
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"rows per batch (default {DEFAULT_BATCH_SIZE:,}); bounds memory",
    )
    p.add_argument(
        "--csv-type",
        action="append",
        default=[],
        metavar="COLUMN=TYPE",
        help="pin a CSV column's type (string, int64, float64, bool, date, timestamp[us], ...)",
    )
    p.add_argument(
        "--delimiter", default=",", help="CSV field delimiter (default ','; '\\t' or tab: a tab)"
    )
    p.add_argument(
        "--encoding",
        default="utf-8",
        metavar="NAME",
        help="text encoding of CSV inputs (default utf-8; e.g. latin-1, utf-16, cp1252)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")


def _debug_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show tracebacks and debug logs",
    )
    parent.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        default=argparse.SUPPRESS,
        help="also print the run's audit records on stderr",
    )
    return parent


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
        "--timestamp-unit",
        choices=["us", "ns"],
        default="us",
        help="Parquet timestamp unit for nanosecond columns (default us: Spark-readable)",
    )
    p.add_argument("--run-id", metavar="ID", help="the audit run id (default: a new UUID)")
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


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: stop exactly as for Ctrl-C, then exit 128 + the signal.

    A subclass of KeyboardInterrupt, so every cleanup that already handles
    Ctrl-C (temporary output removed, destination untouched, ``run.failed``
    recorded) handles what Kubernetes, Airflow and systemd send as well.
    """

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def _stop_signals_as_interrupts() -> Iterator[None]:
    """While a command runs, SIGTERM and SIGHUP raise :class:`Terminated` in the main thread."""
    wanted = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous = {s: signal.signal(s, _raise_terminated) for s in wanted}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


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


if __name__ == "__main__":
    sys.exit(main())
