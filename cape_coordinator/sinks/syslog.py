"""The syslog sink: RFC 5424 messages over UDP, TCP (RFC 6587 octet counting) or a unix socket.

Each record is one message: ``<PRI>1 TIMESTAMP HOST APP PROCID MSGID [SD] BOM JSON``.
The facility defaults to 13 (log audit); the severity is warning for events that
report a failure (``*.failed``, ``*.lost``, ``*.refused``, ``*.rejected``,
``*.denied``) and informational otherwise. MSGID is the event name, TIMESTAMP the
record's own time, and the structured data (SD-ID ``cape@32473`` unless
configured) carries ``seq``, ``id`` (the record id), ``event``, ``kind`` and, when
present, ``label``, ``run`` and ``sender``, so a SIEM can route and deduplicate
without parsing the JSON text. Syslog has no acknowledgement: a batch counts as
delivered once the kernel took it (TCP and unix stream: written to a connection
that was open; a connection the receiver closed is noticed and reopened before the
next batch). UDP and unix datagrams may be lost in the network; datagrams longer
than ``max_datagram_bytes`` have their text cut (the structured data with the ids
is kept, and ``truncated="true"`` says so).
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from .base import DeliveryError, document_json
from .config import SyslogSink

_BOM = b"\xef\xbb\xbf"
_FAILURE_EVENTS = {"failed", "lost", "refused", "rejected", "denied"}


def _printable(text: str, limit: int) -> str:
    """Printable US-ASCII only (RFC 5424 header fields), at most ``limit`` characters."""
    out = "".join(c if "!" <= c <= "~" else "_" for c in text)[:limit]
    return out or "-"


def _param(value: object) -> str:
    """An SD-PARAM value with '"', '\\' and ']' escaped (RFC 5424 section 6.3.3)."""
    text = str(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def severity(event: str) -> int:
    """4 (warning) for events that report a failure, 6 (informational) otherwise."""
    return 4 if event.rsplit(".", 1)[-1] in _FAILURE_EVENTS else 6


def format_message(
    config: SyslogSink, doc: Mapping[str, Any], hostname: str, max_bytes: int | None = None
) -> bytes:
    """One RFC 5424 message for a delivered document; with ``max_bytes``, the JSON text is
    cut so that the whole message fits (and the structured data says it was)."""
    event = str(doc["event"])
    pri = config.facility * 8 + severity(event)
    header = (
        f"<{pri}>1 {doc['time']} {hostname} {config.app_name} {os.getpid()} "
        f"{_printable(event, 32)} "
    )
    params = [("seq", doc["seq"]), ("id", doc["record_id"]), ("event", event)]
    params.append(("kind", doc["kind"]))
    for name, key in (("label", "label"), ("run", "run_id"), ("sender", "sender")):
        if doc.get(key) is not None:
            params.append((name, doc[key]))
    text = document_json(doc).encode("utf-8")

    def build(extra: str, body: bytes) -> bytes:
        sd = f"[{config.sd_id} " + " ".join(f'{k}="{_param(v)}"' for k, v in params) + extra + "]"
        return (header + sd + " ").encode("utf-8") + _BOM + body

    message = build("", text)
    if max_bytes is None or len(message) <= max_bytes:
        return message
    head = build(' truncated="true"', b"")
    room = max(0, max_bytes - len(head))
    cut = text[:room].decode("utf-8", errors="ignore").encode("utf-8")
    return head + cut


class SyslogSender:
    """Sends each batch over one socket, opened lazily and reopened after an error."""

    def __init__(self, config: SyslogSink):
        self.config = config
        self.hostname = config.hostname or _printable(socket.gethostname(), 255)
        self._sock: socket.socket | None = None

    def _stream(self) -> bool:
        return self.config.transport == "tcp" or (
            self.config.transport == "unix" and self.config.socket_type == "stream"
        )

    def _connect(self) -> socket.socket:
        cfg = self.config
        if cfg.transport == "tcp":
            sock = socket.create_connection((cfg.host, cfg.port), timeout=cfg.timeout_seconds)
        elif cfg.transport == "udp":
            info = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(info[0], socket.SOCK_DGRAM)
            sock.settimeout(cfg.timeout_seconds)
            sock.connect(info[4])
        else:
            kind = socket.SOCK_STREAM if cfg.socket_type == "stream" else socket.SOCK_DGRAM
            sock = socket.socket(socket.AF_UNIX, kind)
            sock.settimeout(cfg.timeout_seconds)
            try:
                sock.connect(str(cfg.socket_path))
            except OSError:
                sock.close()
                raise
        return sock

    def _peer_closed(self, sock: socket.socket) -> bool:
        """Whether a stream's receiver has closed (or reset) the connection."""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            return sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def deliver(self, docs: Sequence[Mapping[str, Any]]) -> None:
        stream = self._stream()
        limit = None if stream else self.config.max_datagram_bytes
        messages = [format_message(self.config, doc, self.hostname, limit) for doc in docs]
        try:
            if self._sock is not None and stream and self._peer_closed(self._sock):
                self._drop()
            if self._sock is None:
                self._sock = self._connect()
            if stream:
                self._sock.sendall(b"".join(b"%d " % len(m) + m for m in messages))
            else:
                for message in messages:
                    self._sock.send(message)
        except OSError as exc:
            self._drop()
            where = (
                f"{self.config.host}:{self.config.port}"
                if self.config.transport != "unix"
                else str(self.config.socket_path)
            )
            reason = exc.strerror or type(exc).__name__
            raise DeliveryError(f"syslog {self.config.transport} {where}: {reason}") from None

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def close(self) -> None:
        self._drop()
