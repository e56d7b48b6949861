"""SIGTERM and SIGHUP handled exactly like Ctrl-C while a ``cape`` command runs.

Orchestrators (Kubernetes, Airflow, systemd) stop a job with SIGTERM; raising
:class:`Terminated` (a KeyboardInterrupt) in the main thread lets every
cleanup that handles Ctrl-C (temporary output removed, ``run.failed``
recorded) handle it too.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


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
