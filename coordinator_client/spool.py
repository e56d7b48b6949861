"""A durable audit sink: every record is on disk before ``emit`` returns, then delivered.

Records are written one file each into ``<spool>/pending`` (temporary file,
fsync, atomic rename, fsync of the directory), and a background thread posts
them in batches to ``POST /v1/audit``, deleting each file only after the
coordinator has acknowledged it. Failures are retried with exponential backoff
and jitter. Because the coordinator skips record ids it already holds, a batch
re-sent after a crash or a lost acknowledgement is stored once: records are
delivered exactly once even across process restarts (a new sink on the same
spool directory delivers what an earlier process left behind). A record the
coordinator refuses as malformed is moved to ``<spool>/rejected`` and logged.

A sink can be pickled, because Beam ships it inside its DoFns to the workers
that emit a run's records. The copy carries the coordinator's URL, the token
(as a pickled plan carries its keys: protect the pickles alike) and the spool
directory; it starts no thread, and delivers each record it spools at once,
in the emitting call. A record it cannot deliver stays in the spool, where the
original sink (or any later sink on the same directory) delivers it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import AuthError, CoordinatorError, Unavailable

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("coordinator_client.spool")

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolSink:
    """An audit :class:`~cape_pipelines.audit.Sink`: spooled to disk, delivered in the background.

    >>> sink = client.audit_sink()          # doctest: +SKIP
    >>> sink.emit(record); sink.flush(10)   # doctest: +SKIP
    """

    def __init__(
        self,
        client: Client,
        spool_dir: str | os.PathLike[str],
        *,
        batch_size: int = 500,
        min_backoff: float = 0.2,
        max_backoff: float = 30.0,
        poll_interval: float = 1.0,
    ):
        self._setup(client, spool_dir, batch_size, min_backoff, max_backoff, poll_interval)
        self._thread: threading.Thread | None = threading.Thread(
            target=self._run, name="cape-audit-spool", daemon=True
        )
        self._thread.start()

    def _setup(
        self,
        client: Client,
        spool_dir: str | os.PathLike[str],
        batch_size: int,
        min_backoff: float,
        max_backoff: float,
        poll_interval: float,
    ) -> None:
        self.client = client
        self.spool_dir = Path(spool_dir)
        self.pending = self.spool_dir / "pending"
        self.rejected = self.spool_dir / "rejected"
        self.pending.mkdir(parents=True, exist_ok=True)
        self.rejected.mkdir(parents=True, exist_ok=True)
        self.batch_size = batch_size
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.poll_interval = poll_interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._counter = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "url": self.client.url,
            "token": self.client._token,
            "timeout": self.client.timeout,
            "spool_dir": str(self.spool_dir),
            "options": (self.batch_size, self.min_backoff, self.max_backoff, self.poll_interval),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        from .client import Client

        # An empty pinned key: this copy only posts records, it never fetches a policy,
        # so it must not depend on the worker's CAPE_COORDINATOR_PUBLIC_KEY.
        client = Client(
            state["url"],
            state["token"],
            public_key="",
            spool_dir=state["spool_dir"],
            timeout=state["timeout"],
        )
        self._setup(client, state["spool_dir"], *state["options"])
        self._thread = None

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._stop.is_set()

    def __repr__(self) -> str:
        return f"SpoolSink({str(self.spool_dir)!r}, pending={self.pending_count()})"

    def emit(self, record: Mapping[str, Any]) -> None:
        """Write ``record`` durably to the spool; delivery happens in the background."""
        record_id = record.get("record_id")
        if not isinstance(record_id, str) or not record_id:
            raise ValueError("an audit record needs a record_id")
        data = json.dumps(dict(record), sort_keys=True, separators=(",", ":"), default=str)
        with self._lock:
            self._counter += 1
            safe_id = _SAFE.sub("_", record_id)[:80]
            stem = f"{time.time_ns():020d}-{os.getpid()}-{self._counter:06d}-{safe_id}"
        tmp = self.pending / f".{stem}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        path = self.pending / f"{stem}.json"
        os.replace(tmp, path)
        _fsync_dir(self.pending)
        if self._thread is None:
            self._deliver_now([path])
        else:
            self._wake.set()

    def pending_count(self) -> int:
        """Records spooled and not yet acknowledged by the coordinator."""
        return sum(1 for _ in self.pending.glob("*.json"))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every spooled record is delivered; False if ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = self.min_backoff
        while self.pending_count():
            if self._thread is None:
                # A worker's copy has no thread: it delivers here, in the caller.
                if self._deliver_now(sorted(self.pending.glob("*.json"))[: self.batch_size]):
                    backoff = self.min_backoff
                    continue
                if deadline is not None and time.monotonic() + backoff >= deadline:
                    return False
                time.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            if not self._thread.is_alive():
                return False
            self._wake.set()
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self, timeout: float | None = 10.0) -> None:
        """Deliver what is spooled for up to ``timeout`` s, then stop; the rest stays spooled."""
        self.flush(timeout)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        else:
            self.client.session.close()

    def _deliver_now(self, files: list[Path]) -> bool:
        """Deliver ``files`` in the calling thread; False (they stay spooled) if that failed."""
        try:
            self._deliver(files)
        except (Unavailable, AuthError) as exc:
            log.warning("audit records stay spooled in %s for later: %s", self.pending, exc)
            return False
        except Exception as exc:
            log.error("audit delivery error (%s); the records stay spooled", type(exc).__name__)
            return False
        return True

    # ---- the delivery thread ----------------------------------------------------------

    def _run(self) -> None:
        backoff = self.min_backoff
        while not self._stop.is_set():
            files = sorted(self.pending.glob("*.json"))[: self.batch_size]
            if not files:
                self._wake.wait(self.poll_interval)
                self._wake.clear()
                continue
            try:
                self._deliver(files)
                backoff = self.min_backoff
            except (Unavailable, AuthError) as exc:
                log.warning("audit delivery failed, retrying in %.1f s: %s", backoff, exc)
                self._stop.wait(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self.max_backoff)
            except Exception as exc:
                # The thread must survive anything; the records stay spooled.
                log.error("audit delivery error (%s); retrying", type(exc).__name__)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    def _load(self, files: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
        out = []
        for path in files:
            try:
                out.append((path, json.loads(path.read_text(encoding="utf-8"))))
            except FileNotFoundError:
                continue
            except (OSError, ValueError):
                log.error("spooled audit record %s is unreadable; moved to rejected/", path.name)
                self._reject(path)
        return out

    def _deliver(self, files: list[Path]) -> None:
        loaded = self._load(files)
        if not loaded:
            return
        try:
            self.client.post_audit([rec for _, rec in loaded])
        except (Unavailable, AuthError):
            raise
        except CoordinatorError:
            if len(loaded) == 1:
                log.error(
                    "coordinator refused audit record %s; moved to rejected/", loaded[0][0].name
                )
                self._reject(loaded[0][0])
                return
            # Find the refused record(s) by sending one at a time; the rest are delivered.
            for path, _ in loaded:
                self._deliver([path])
            return
        for path, _ in loaded:
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def _reject(self, path: Path) -> None:
        try:
            os.replace(path, self.rejected / path.name)
        except FileNotFoundError:
            pass
