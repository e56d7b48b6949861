"""Audit: one trail of records per pipeline run, to a configurable sink.

A run emits ``run.started``, optionally ``policy.fetched``, then exactly one of
``run.completed`` or ``run.failed``. Records carry counts measured on the data
actually written, never data values or keys. A :class:`Sink` receives them;
the coordinator client provides a durable, retrying sink of its own.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .errors import CapeError

log = logging.getLogger("cape_pipelines.audit")

EVENTS = ("run.started", "policy.fetched", "run.completed", "run.failed")


@runtime_checkable
class Sink(Protocol):
    """Where audit records go. ``emit`` must not lose a record it has returned from."""

    def emit(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Appends one JSON object per line to a file, flushed and fsynced per record."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"JsonlSink({str(self.path)!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Engines (Beam, Dask, Spark) ship the sink to worker processes; a lock
        # cannot be pickled and only guards threads of one process anyway.
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._lock = threading.Lock()

    def emit(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            if os.path.isfile(self.path):
                # Only a regular file can be synced; /dev/stdout or a pipe cannot.
                os.fsync(fh.fileno())

    def close(self) -> None:
        return None


class LoggingSink:
    """Writes each record as one JSON log line to a Python logger."""

    def __init__(self, logger: logging.Logger | str = log, level: int = logging.INFO):
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.level = level

    def emit(self, record: Mapping[str, Any]) -> None:
        self.logger.log(self.level, json.dumps(record, sort_keys=True, separators=(",", ":")))

    def close(self) -> None:
        return None


class MemorySink:
    """Keeps records in a list (tests, notebooks)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def emit(self, record: Mapping[str, Any]) -> None:
        self.records.append(dict(record))

    def close(self) -> None:
        return None


class NullSink:
    """Discards every record: for a caller that records the run itself.

    ``cape apply --engine beam|dask|spark`` records one run of its own and
    passes this sink as the engine adapter's ``audit=``, so the adapter's
    records are switched off rather than written twice. Picklable, so Beam can
    ship it to workers.
    """

    def emit(self, record: Mapping[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


class MultiSink:
    """Sends each record to several sinks."""

    def __init__(self, sinks: Iterable[Sink]):
        self.sinks = list(sinks)

    def emit(self, record: Mapping[str, Any]) -> None:
        for s in self.sinks:
            s.emit(record)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


AuditTarget = Sink | str | os.PathLike[str] | None


def resolve_sink(audit: AuditTarget) -> Sink:
    """``None``: ``CAPE_AUDIT_FILE`` if set, else the ``cape_pipelines.audit`` logger;
    a path: a JSONL file; a :class:`Sink`: itself."""
    if audit is None:
        env = os.environ.get("CAPE_AUDIT_FILE")
        return JsonlSink(env) if env else LoggingSink()
    if isinstance(audit, str | os.PathLike):
        return JsonlSink(audit)
    if isinstance(audit, Sink):
        return audit
    raise TypeError(f"audit must be a Sink, a path or None, not {type(audit).__name__}")


def now_rfc3339() -> str:
    """The current UTC time, RFC 3339 with microseconds and ``Z``."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def engine_version(engine: str) -> str:
    """The installed version of ``engine``'s package (or Python's, for pandas/pyarrow)."""
    from importlib.metadata import PackageNotFoundError, version

    package = {
        "beam": "apache-beam",
        "dask": "dask",
        "spark": "pyspark",
        "pandas": "pandas",
        "pyarrow": "pyarrow",
        "flight": "pyarrow",
        "flink": "apache-flink",
    }.get(engine)
    if package is None:
        return platform.python_version()
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def error_info(exc: BaseException) -> dict[str, str]:
    """An exception's type and message for an audit record.

    Our own errors are written to name places, not values; any other
    exception's message is cut to its first line and 500 characters.
    """
    if isinstance(exc, CapeError):
        return {"type": type(exc).__name__, "message": str(exc)[:2000]}
    first = (str(exc).splitlines() or [""])[0]
    return {"type": type(exc).__name__, "message": first[:500]}


class RunContext:
    """One pipeline run's audit trail: ids, engine, policy, and the sink.

    >>> from cape_pipelines.audit import MemorySink, RunContext
    >>> run = RunContext(engine="pandas", sink=MemorySink())
    >>> _ = run.started()
    """

    def __init__(
        self,
        *,
        engine: str,
        sink: AuditTarget = None,
        policy: Mapping[str, Any] | None = None,
        principal: str | None = None,
        run_id: str | None = None,
    ):
        self.run_id = run_id or str(uuid.uuid4())
        self.engine = engine
        self.engine_version = engine_version(engine)
        self.sink = resolve_sink(sink)
        self.policy = dict(policy) if policy else None
        self.principal = principal or os.environ.get("CAPE_PRINCIPAL") or _local_principal()
        self._finished = False

    def __repr__(self) -> str:
        return f"RunContext(run_id={self.run_id!r}, engine={self.engine!r})"

    def set_policy(self, label: str, version: int, sha256: str) -> None:
        """Record which policy this run applies."""
        self.policy = {"label": label, "version": version, "sha256": sha256}

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Build one record of this run (not emitted)."""
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        rec: dict[str, Any] = {
            "record_id": str(uuid.uuid4()),
            "run_id": self.run_id,
            "event": event,
            "time": now_rfc3339(),
            "engine": self.engine,
            "engine_version": self.engine_version,
            "policy": self.policy,
            "principal": self.principal,
        }
        rec.update(fields)
        return rec

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        """Build and emit one record."""
        rec = self.record(event, **fields)
        self.sink.emit(rec)
        return rec

    def started(self) -> dict[str, Any]:
        """Emit ``run.started``."""
        return self.emit("run.started")

    def policy_fetched(self, source: str) -> dict[str, Any]:
        """Emit ``policy.fetched`` (where the policy came from: a file, a coordinator URL)."""
        return self.emit("policy.fetched", source=source)

    def completed(self, counters: Any) -> dict[str, Any]:
        """Emit ``run.completed`` with counts (a :class:`~cape_pipelines.core.Counters`)."""
        self._finished = True
        return self.emit("run.completed", **counters.to_dict())

    def failed(self, exc: BaseException, counters: Any | None = None) -> dict[str, Any]:
        """Emit ``run.failed`` with the error's type and message (no values, no keys)."""
        self._finished = True
        fields = counters.to_dict() if counters is not None else {}
        return self.emit("run.failed", error=error_info(exc), **fields)


def _local_principal() -> str:
    try:
        import getpass

        return f"local:{getpass.getuser()}"
    except Exception:
        return "local:unknown"
