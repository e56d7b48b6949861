"""A durable audit sink: every record is on disk before ``emit`` returns, then delivered.

Records are written one file each into ``<spool>/pending`` (temporary file,
fsync, atomic rename, fsync of the directory), and a background thread posts
them in batches to ``POST /v1/audit``, deleting each file only after the
coordinator has acknowledged it. Because the coordinator stores a batch whole or
not at all and acknowledges an identical resend as a duplicate, a batch re-sent
after a crash or a lost acknowledgement is stored once: records are delivered
exactly once even across process restarts (a new sink on the same spool
directory delivers what an earlier process left behind).

One bad record must never stall the others, so a refused multi-record batch
(any 4xx but 401 and 429, or a 5xx but 502, 503 and 504) is split in halves, and the halves sent on
their own, until the refused records are alone. A record refused alone is tried
again, alone and after the others, in later rounds; after ``max_tries`` refusals it is moved to
``<spool>/rejected`` with a ``.reason.json`` file beside it (status, code,
message). A lone 5xx only counts as a try when the coordinator accepted other
records since that record's previous try: a coordinator failing every request
is an outage, and records wait for it rather than being rejected. An
unreachable coordinator, a 429, 502, 503 or 504 is retried whole with
exponential backoff and jitter; a 401 (token revoked or expired) stops delivery and keeps everything
spooled for a sink with a valid token.

The sink owns a :class:`~coordinator_client.transport.Transport` (URL, token,
timeout) and never a client. A sink can be pickled, because Beam ships it inside
its DoFns to the workers that emit a run's records: the copy carries the
transport and the spool directory (the token is in it: Beam ships a sink made by
:meth:`~coordinator_client.Client.worker_audit_sink`, whose token may only post
the label's records), no pinned key and no key material. It
starts no thread, and delivers each record it spools at once, in the emitting
call. A record it cannot deliver stays in the spool, where the original sink (or
any later sink on the same directory) delivers it.
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
from typing import Any

from .errors import CoordinatorError
from .transport import Transport

log = logging.getLogger("coordinator_client.spool")

_SAFE = re.compile(r"[^A-Za-z0-9._-]")
# Overloaded, or a proxy in front of a coordinator that is down: no record's fault.
_OUTAGE = frozenset({429, 502, 503, 504})


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Later(Exception):
    """The coordinator is unreachable, overloaded (429) or failing everything: retry later."""


class _Stop(Exception):
    """The token was refused (401): stop delivering, keep everything spooled."""


class _Round:
    """What one delivery round did: records acknowledged, records refused alone."""

    def __init__(self) -> None:
        self.accepted = 0
        self.refused: list[tuple[Path, CoordinatorError]] = []
        self.failing_alone = 0  # lone 5xx answers while nothing was accepted


class SpoolSink:
    """An audit :class:`~cape_pipelines.audit.Sink`: spooled to disk, delivered in the background.

    ``transport`` is a :class:`Transport` (or anything with one as ``.transport``,
    such as a :class:`~coordinator_client.Client`).

    >>> sink = client.audit_sink()          # doctest: +SKIP
    >>> sink.emit(record); sink.flush(10)   # doctest: +SKIP
    """

    def __init__(
        self,
        transport: Transport | Any,
        spool_dir: str | os.PathLike[str],
        *,
        batch_size: int = 500,
        min_backoff: float = 0.2,
        max_backoff: float = 30.0,
        poll_interval: float = 1.0,
        max_tries: int = 5,
    ):
        if not isinstance(transport, Transport):
            transport = transport.transport
        if max_tries < 1:
            raise ValueError("max_tries must be at least 1")
        self._setup(
            transport, spool_dir, (batch_size, min_backoff, max_backoff, poll_interval, max_tries)
        )
        self._thread: threading.Thread | None = threading.Thread(
            target=self._run, name="cape-audit-spool", daemon=True
        )
        self._thread.start()

    def _setup(
        self, transport: Transport, spool_dir: str | os.PathLike[str], options: tuple[Any, ...]
    ) -> None:
        self.transport = transport
        self.spool_dir = Path(spool_dir)
        self.pending = self.spool_dir / "pending"
        self.rejected = self.spool_dir / "rejected"
        self.pending.mkdir(parents=True, exist_ok=True)
        self.rejected.mkdir(parents=True, exist_ok=True)
        self._options = options
        self.batch_size, self.min_backoff, self.max_backoff, self.poll_interval = options[:4]
        self.max_tries: int = options[4]
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._counter = 0
        self._lock = threading.Lock()
        self._accepted_total = 0
        # file name -> (tries so far, _accepted_total at the last try)
        self._tries: dict[str, tuple[int, int]] = {}
        self.stopped: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {
            "transport": self.transport,
            "spool_dir": str(self.spool_dir),
            "options": self._options,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._setup(state["transport"], state["spool_dir"], tuple(state["options"]))
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

    def rejected_count(self) -> int:
        """Records the coordinator refused ``max_tries`` times, kept in ``rejected/``."""
        return sum(1 for p in self.rejected.glob("*.json") if not p.name.endswith(".reason.json"))

    def _batch(self) -> list[Path]:
        return sorted(self.pending.glob("*.json"))[: self.batch_size]

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every spooled record is delivered or rejected; False if ``timeout`` ran
        out first, or delivery stopped (a 401: see :attr:`stopped`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = self.min_backoff
        while self.pending_count():
            if self.stopped is not None:
                return False
            if self._thread is None:
                # A worker's copy has no thread: it delivers here, in the caller.
                if self._deliver_now(self._batch()):
                    backoff = self.min_backoff
                    continue
                if self.stopped is not None:
                    return False
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
            self.transport.close()

    def _deliver_now(self, files: list[Path]) -> bool:
        """One delivery round in the calling thread; False if records are still waiting."""
        try:
            return self._round(files)
        except _Later as exc:
            log.warning("audit records stay spooled in %s for later: %s", self.pending, exc)
        except _Stop as exc:
            self._stopped(exc)
        except Exception as exc:
            log.error("audit delivery error (%s); the records stay spooled", type(exc).__name__)
        return False

    def _stopped(self, exc: Exception) -> None:
        self.stopped = str(exc)
        log.error(
            "audit delivery stopped, the token was refused (%s); records stay spooled in %s",
            exc,
            self.pending,
        )

    # ---- the delivery thread ----------------------------------------------------------

    def _run(self) -> None:
        backoff = self.min_backoff
        while not self._stop.is_set():
            files = self._batch()
            if not files:
                self._wake.wait(self.poll_interval)
                self._wake.clear()
                continue
            try:
                clean = self._round(files)
            except _Stop as exc:
                self._stopped(exc)
                return
            except _Later as exc:
                log.warning("audit delivery failed, retrying in %.1f s: %s", backoff, exc)
                clean = False
            except Exception as exc:
                # The thread must survive anything; the records stay spooled.
                log.error("audit delivery error (%s); retrying", type(exc).__name__)
                clean = False
            if clean:
                backoff = self.min_backoff
                continue
            self._stop.wait(backoff * random.uniform(0.5, 1.0))
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
                self._reject(path, {"status": None, "code": "unreadable", "tries": 0})
        return out

    def _round(self, files: list[Path]) -> bool:
        """Send ``files`` (split around refused records); True if none is left waiting."""
        loaded = self._load(files)
        if not loaded:
            return True
        outcome = _Round()
        # Records already refused alone go alone again, after the others, so the good
        # ones are not split over again every round (and show the coordinator works).
        suspects = [item for item in loaded if item[0].name in self._tries]
        rest = [item for item in loaded if item[0].name not in self._tries]
        if rest:
            self._send(rest, outcome)
        for item in suspects:
            self._send([item], outcome)
        for path, exc in outcome.refused:
            tries, mark = self._tries.get(path.name, (0, -1))
            server_fault = exc.status is None or exc.status >= 500
            if server_fault and self._accepted_total <= max(mark, 0):
                # Nothing was accepted since this record's last try: the coordinator may be
                # failing everything, so this is no evidence against the record.
                continue
            tries += 1
            self._tries[path.name] = (tries, self._accepted_total)
            if tries >= self.max_tries:
                reason = {"status": exc.status, "code": exc.code, "message": str(exc)}
                log.error(
                    "coordinator refused audit record %s %d times (%s); moved to rejected/",
                    path.name,
                    tries,
                    exc.code or exc.status,
                )
                self._reject(path, {**reason, "tries": tries})
        return not outcome.refused

    def _send(self, items: list[tuple[Path, dict[str, Any]]], outcome: _Round) -> None:
        try:
            self.transport.post_audit([rec for _, rec in items])
        except CoordinatorError as exc:
            if exc.status == 401:
                raise _Stop(str(exc)) from None
            if exc.status is None or exc.status in _OUTAGE:
                raise _Later(str(exc)) from None
            if len(items) > 1:
                half = len(items) // 2
                self._send(items[:half], outcome)
                self._send(items[half:], outcome)
                return
            if exc.status >= 500 and outcome.accepted == 0:
                outcome.failing_alone += 1
                if outcome.failing_alone > 2:
                    # Record after record fails on its own: likely the coordinator. Stop
                    # this round, but remember these as suspects: next round they go last,
                    # alone, so they cannot keep the records behind them from being tried.
                    for path, _ in [*outcome.refused, items[0]]:
                        self._tries.setdefault(path.name, (0, self._accepted_total))
                    raise _Later(str(exc)) from None
            outcome.refused.append((items[0][0], exc))
            return
        outcome.accepted += len(items)
        self._accepted_total += len(items)
        for path, _ in items:
            self._tries.pop(path.name, None)
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def _reject(self, path: Path, reason: dict[str, Any]) -> None:
        target = self.rejected / path.name
        note = self.rejected / (path.name[: -len(".json")] + ".reason.json")
        reason = {**reason, "rejected_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tmp = note.with_name(f".{note.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(reason, fh, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, note)
        try:
            os.replace(path, target)
        except FileNotFoundError:
            note.unlink(missing_ok=True)
            return
        self._tries.pop(path.name, None)
        _fsync_dir(self.rejected)
        _fsync_dir(self.pending)
