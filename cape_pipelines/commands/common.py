"""What every ``cape`` command shares: exit codes, logging on stderr, keys and CSV options.

Moved out of :mod:`cape_pipelines.cli` so each command group's module imports
only these helpers, never the parser or ``main`` (which import the groups).
"""

from __future__ import annotations

import argparse
import codecs
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..errors import CapeError
from ..io import DEFAULT_BATCH_SIZE, CsvOptions, parse_arrow_type
from ..keys import decode_key_text

EXIT_OK = 0


EXIT_REFUSED = 1


EXIT_USAGE = 2


EXIT_INTERNAL = 70


EXIT_INTERRUPTED = 130


Handler = Callable[[argparse.Namespace], "int | None"]


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


# -- options several commands take ----------------------------------------------------------


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
