"""Progress reporting: engine code calls a plain ``(rows) -> None`` callback; the bar is the CLI's.

Engines and the run loop never see a terminal object: they report rows read
through a :data:`ProgressFn`. :class:`Progress` is one such callback, a
one-line bar drawn on a terminal and silent elsewhere.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO

ProgressFn = Callable[[int], None]
"""Called with the number of input rows read since the last call."""


def no_progress(rows: int) -> None:
    """A :data:`ProgressFn` that ignores what it is told."""


class Progress:
    """A one-line progress bar on a terminal; silent when the stream is not one."""

    def __init__(self, stream: IO[str] | None, total: int | None, label: str = "cape apply"):
        self.stream = stream
        self.total = total
        self.label = label
        self.rows = 0
        self._last = 0.0
        self._shown = False

    @classmethod
    def auto(cls, total: int | None, enabled: bool | None = None) -> Progress:
        """A bar on stderr if ``enabled`` (None: only when stderr is a terminal)."""
        stream = sys.stderr
        if enabled is None:
            enabled = bool(getattr(stream, "isatty", lambda: False)())
        return cls(stream if enabled else None, total)

    def update(self, rows: int) -> None:
        """Count ``rows`` more rows read; redraw at most a few times a second."""
        self.rows += rows
        if self.stream is None:
            return
        now = time.monotonic()
        if now - self._last >= 0.2:
            self._last = now
            self._draw()

    def _draw(self) -> None:
        assert self.stream is not None
        if self.total:
            frac = min(1.0, self.rows / self.total)
            width = 30
            filled = int(frac * width)
            bar = "#" * filled + "-" * (width - filled)
            line = f"{self.label} [{bar}] {frac:4.0%} {self.rows:,}/{self.total:,} rows"
        else:
            line = f"{self.label} {self.rows:,} rows"
        self.stream.write("\r" + line)
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        """Draw the final state and end the line (only if anything was drawn)."""
        if self.stream is None:
            return
        self._draw()
        self.stream.write("\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __call__(self, rows: int) -> None:
        """Make the bar itself a :data:`ProgressFn`."""
        self.update(rows)


__all__ = ["Progress", "ProgressFn", "no_progress"]
