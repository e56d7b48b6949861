"""The JSONL sink: one delivered document per line, rotated by size and age.

A batch is written with one ``write`` (and ``fsync``) after the rotation check, so
rotation only ever happens between whole lines: a rotated file never ends in half
a record. A crash in the middle of a write can leave a partial last line; it is
cut off when the file is next opened (its records were not acknowledged, so the
dispatcher writes them again). Rotated files are ``PATH.1`` (newest) to
``PATH.keep``; the current file's start time is the modification time of a small
marker file beside it (``.NAME.started``), so age-based rotation survives restarts.
Files are created with mode 0600: they hold the whole audit trail.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import DeliveryError, document_json
from .config import JsonlSink


class JsonlWriter:
    """Appends batches to ``config.path``, rotating before a batch when due."""

    def __init__(self, config: JsonlSink):
        self.config = config
        self.path = Path(config.path)
        self.marker = self.path.with_name(f".{self.path.name}.started")
        self._repaired = False

    def deliver(self, docs: Sequence[Mapping[str, Any]]) -> None:
        data = "".join(document_json(doc) + "\n" for doc in docs).encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self._repaired:
                self._cut_partial_line()
                self._repaired = True
            if self._rotation_due(len(data)):
                self._rotate()
            if not self.marker.exists():
                self.marker.touch(mode=0o600)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if self.config.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise DeliveryError(f"cannot write {self.path}: {exc.strerror}") from None

    def close(self) -> None:
        return None

    def _cut_partial_line(self) -> None:
        """Drop an unterminated last line left by a crash mid-write."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size == 0:
            return
        with open(self.path, "rb+") as fh:
            fh.seek(size - 1)
            if fh.read(1) == b"\n":
                return
            # Walk back to the last newline (a line is one document: bounded by the batch).
            pos = size
            while pos > 0:
                step = min(65536, pos)
                fh.seek(pos - step)
                chunk = fh.read(step)
                cut = chunk.rfind(b"\n")
                if cut >= 0:
                    fh.truncate(pos - step + cut + 1)
                    return
                pos -= step
            fh.truncate(0)

    def _rotation_due(self, incoming: int) -> bool:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return False
        if size == 0:
            return False
        if size + incoming > self.config.max_bytes:
            return True
        if self.config.rotate_seconds is not None:
            try:
                started = self.marker.stat().st_mtime
            except FileNotFoundError:
                self.marker.touch(mode=0o600)
                return False
            return time.time() - started >= self.config.rotate_seconds
        return False

    def _rotate(self) -> None:
        keep = self.config.keep
        oldest = self.path.with_name(f"{self.path.name}.{keep}")
        if oldest.exists():
            oldest.unlink()
        for n in range(keep - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{n}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        # A new file starts now: reset the marker's time.
        self.marker.unlink(missing_ok=True)
        self.marker.touch(mode=0o600)
