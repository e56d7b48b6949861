"""``cape reveal``: reverse reversible tokens in chosen columns, for key holders.

The command is the ordinary file job with an in-memory policy
(:func:`reveal_policy`: token-reverser over the columns), so it is audited and
written atomically like ``cape apply``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import CapeError
from ..inputs import open_inputs
from ..io import apply_files
from ..keys import decode_key_text
from .common import EXIT_OK, _audit_target, _csv_options, load_keys


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
