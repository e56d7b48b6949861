"""The coordinator's own commands: ``cape coordinator init|serve|upgrade|admin-token|public-key``.

These open the database directly (with its master key) instead of calling a
coordinator over HTTP; :mod:`cape_coordinator.cli` registers them beside the
client commands. Server dependencies are imported inside each handler, so
``cape --help`` works without the coordinator extra.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path
from typing import Any


def _paths_and_settings(args: argparse.Namespace) -> tuple[Any, Any]:
    from .config import Paths, load_settings

    paths = Paths.resolve(args.db, args.key_file, args.config)
    settings = load_settings(paths.config_file)
    return paths, _with_flags(settings, args)


def _with_flags(settings: Any, args: argparse.Namespace) -> Any:
    """``settings`` overridden by the command's flags, validated as a whole."""
    from .config import Settings

    data = settings.model_dump()
    if getattr(args, "audit_jsonl", None):
        data["audit_jsonl"] = str(Path(args.audit_jsonl).resolve())
    if getattr(args, "audit_stdout", None):
        data["audit_stdout"] = True
    if getattr(args, "lost_after", None) is not None:
        data["lost_after_seconds"] = args.lost_after
    if getattr(args, "max_body_bytes", None) is not None:
        data["max_body_bytes"] = args.max_body_bytes
    if getattr(args, "api_docs", None):
        data["api_docs"] = True
    if getattr(args, "metrics_bind", None):
        data["metrics_bind"] = args.metrics_bind
    return Settings.from_dict(data)


# The collector's thresholds while serving: a young-generation pass every 10,000 net
# allocations instead of 700 (an audit batch of 100 records makes thousands of objects).
SERVE_GC_THRESHOLDS = (10_000, 10, 10)


def tune_gc_for_serving() -> None:
    """Keep the cyclic garbage collector out of the request latency: everything built at
    start-up (modules, the app, the schemas, the engine) is collected once and frozen, so
    full collections no longer walk it, and young collections run less often.

    Measured with ``bench/coordinator.py`` (20 posters, batches of 100): before this, full
    collections walked the whole start-up heap about every 0.3 s for ~110 ms each with
    the GIL held, which every request in flight waited out (over a quarter of the server's
    time, and the p99). Nothing is left uncollected: frozen objects are only those alive
    now, and later garbage is collected as before, in larger steps."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVE_GC_THRESHOLDS)


# ---- handlers ---------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    """Create the database, master key, signing key and settings; print an admin token."""
    from .config import Paths, Settings
    from .coordinator import Coordinator

    paths = Paths.resolve(args.db, args.key_file, args.config)
    settings = _with_flags(Settings(), args)
    coord, token = Coordinator.initialize(paths, settings)
    public = coord.public_key_text
    coord.close()
    print(f"database: {paths.sqlite_file or 'initialised at the given URL'}")
    if os.environ.get("CAPE_COORDINATOR_MASTER_KEY"):
        print("master key: from CAPE_COORDINATOR_MASTER_KEY (back it up with the database)")
    else:
        print(f"master key: {paths.key_file} (back it up, apart from the database)")
    if paths.config_file is not None:
        print(f"settings: {paths.config_file}")
    print(f"signing public key (pin it in clients): {public}")
    print("admin token (shown once):")
    print(token)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the HTTP API with uvicorn until interrupted."""
    import uvicorn

    from .app import create_app
    from .coordinator import Coordinator
    from .crypto import CoordinatorSetupError
    from .logs import uvicorn_log_config

    paths, settings = _paths_and_settings(args)
    coord = Coordinator.open(paths, settings, upgrade=True)
    app = create_app(coord)
    metrics_server = None
    if settings.metrics_bind:
        from .metrics import metrics_token_hash, serve_metrics

        token_hash = metrics_token_hash(settings.metrics_token_sha256)
        try:
            metrics_server, _ = serve_metrics(app.state.metrics, settings.metrics_bind, token_hash)
        except (ValueError, OSError) as exc:
            coord.close()
            raise CoordinatorSetupError(
                f"cannot serve metrics on {settings.metrics_bind}: {exc}"
            ) from None
        print(f"metrics on http://{settings.metrics_bind}/metrics", file=sys.stderr, flush=True)
    print(
        f"cape coordinator on http://{args.host}:{args.port} (signing key {coord.public_key_text})",
        file=sys.stderr,
        flush=True,
    )
    tune_gc_for_serving()
    try:
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            access_log=args.access_log,
            log_level="info" if args.access_log else "warning",
            log_config=uvicorn_log_config(),
            server_header=False,
        )
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        coord.close()
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    """Migrate the database schema to the newest revision (``serve`` does this too)."""
    from . import migrate
    from .coordinator import Coordinator

    paths, settings = _paths_and_settings(args)
    coord = Coordinator.open(paths, settings, upgrade=True)
    coord.close()
    print(f"database schema at revision {migrate.head()}")
    return 0


def cmd_admin_token(args: argparse.Namespace) -> int:
    """Make an admin token with the database and master key at hand (no server, no token):
    the way back into a locked-out install. Recorded in the audit chain as
    ``token.created`` by ``offline-recovery``; the token alone on the last line."""
    from .coordinator import Coordinator
    from .services.base import Principal

    paths, settings = _paths_and_settings(args)
    coord = Coordinator.open(paths, settings)
    try:
        system = Principal(token_id="-", name="offline-recovery", role="admin")  # noqa: S106
        info, token = coord.tokens.create(system, name=args.name, role="admin")
    finally:
        coord.close()
    print(f"admin token {info['id']} for {info['name']} (shown once):")
    print(token)
    return 0


def cmd_public_key(args: argparse.Namespace) -> int:
    """Print the signing public key alone on the last line (read from the database itself)."""
    from .coordinator import Coordinator

    paths, settings = _paths_and_settings(args)
    coord = Coordinator.open(paths, settings)
    try:
        print(coord.public_key_text)
    finally:
        coord.close()
    return 0
