"""Real receivers on loopback for the audit sink tests: syslog (UDP, TCP, unix sockets)
with an RFC 5424 parser, a webhook server that verifies the HMAC with the documented
helper and can be stopped and restarted on its port, and an OTLP/HTTP collector
stand-in that decodes the protobuf request with the ``opentelemetry-proto`` messages."""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cape_coordinator.sinks.webhook import WebhookVerificationError, verify_request

BOM = b"\xef\xbb\xbf"


def wait_for(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``check`` until true (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ---- RFC 5424 --------------------------------------------------------------------------------

_HEADER = re.compile(
    rb"^<(?P<pri>\d{1,3})>(?P<version>[1-9]\d{0,2}) (?P<timestamp>\S+) (?P<hostname>\S+)"
    rb" (?P<app>\S+) (?P<procid>\S+) (?P<msgid>\S+) "
)


def parse_rfc5424(raw: bytes) -> dict[str, Any]:
    """Parse one RFC 5424 message strictly enough to catch a malformed one."""
    m = _HEADER.match(raw)
    if m is None:
        raise ValueError(f"not an RFC 5424 header: {raw[:80]!r}")
    out: dict[str, Any] = {k: v.decode("ascii") for k, v in m.groupdict().items()}
    for field in ("hostname", "app", "procid", "msgid"):
        if not all(33 <= b <= 126 for b in out[field].encode()):
            raise ValueError(f"{field} is not printable US-ASCII")
    rest = raw[m.end() :]
    sd: dict[str, dict[str, str]] = {}
    if rest.startswith(b"-"):
        i = 1
    else:
        i = 0
        while i < len(rest) and rest[i : i + 1] == b"[":
            j = i + 1
            while rest[j : j + 1] not in (b" ", b"]"):
                j += 1
            sd_id = rest[i + 1 : j].decode("ascii")
            params: dict[str, str] = {}
            while rest[j : j + 1] == b" ":
                k = rest.index(b"=", j)
                name = rest[j + 1 : k].decode("ascii")
                if rest[k + 1 : k + 2] != b'"':
                    raise ValueError("SD-PARAM value not quoted")
                value = bytearray()
                p = k + 2
                while True:
                    c = rest[p : p + 1]
                    if c == b"\\" and rest[p + 1 : p + 2] in (b'"', b"\\", b"]"):
                        value += rest[p + 1 : p + 2]
                        p += 2
                    elif c == b'"':
                        break
                    elif c in (b"", b"]"):
                        raise ValueError("unterminated or unescaped SD-PARAM value")
                    else:
                        value += c
                        p += 1
                params[name] = value.decode("utf-8")
                j = p + 1
            if rest[j : j + 1] != b"]":
                raise ValueError("SD-ELEMENT not closed")
            sd[sd_id] = params
            i = j + 1
    out["sd"] = sd
    msg = rest[i:]
    if msg.startswith(b" "):
        msg = msg[1:]
        if msg.startswith(BOM):
            msg = msg[len(BOM) :]
        out["msg"] = msg.decode("utf-8")
    else:
        out["msg"] = None
    return out


class SyslogReceiver:
    """A syslog server on loopback: ``udp``, ``tcp``, ``unix-dgram`` or ``unix-stream``.
    Stream transports are parsed with RFC 6587 octet counting."""

    def __init__(self, transport: str):
        self.transport = transport
        self.messages: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.port = 0
        self.path: str | None = None
        self._dir = tempfile.mkdtemp(prefix="cs")
        self.sock: socket.socket | None = None

    def start(self) -> SyslogReceiver:
        self._stop.clear()
        if self.transport == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", self.port))
        elif self.transport == "tcp":
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", self.port))
            s.listen(8)
        else:
            self.path = os.path.join(self._dir, "log.sock")
            if os.path.exists(self.path):
                os.unlink(self.path)
            kind = socket.SOCK_DGRAM if self.transport == "unix-dgram" else socket.SOCK_STREAM
            s = socket.socket(socket.AF_UNIX, kind)
            s.bind(self.path)
            if kind == socket.SOCK_STREAM:
                s.listen(8)
        s.settimeout(0.2)
        if self.transport in ("udp", "tcp"):
            self.port = s.getsockname()[1]
        self.sock = s
        target = self._datagrams if self.transport in ("udp", "unix-dgram") else self._accept
        self._spawn(target, s)
        return self

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _take(self, raw: bytes) -> None:
        self.raw.append(raw)
        self.messages.append(parse_rfc5424(raw))

    def _datagrams(self, s: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                data = s.recv(70000)
            except TimeoutError:
                continue
            except OSError:
                return
            self._take(data)

    def _accept(self, s: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = s.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(0.2)
            self._spawn(self._stream, conn)

    def _stream(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while True:
                    space = buf.find(b" ")
                    if space < 0:
                        break
                    length = int(buf[:space])
                    if len(buf) < space + 1 + length:
                        break
                    self._take(buf[space + 1 : space + 1 + length])
                    buf = buf[space + 1 + length :]

    def stop(self) -> None:
        self._stop.set()
        if self.sock is not None:
            self.sock.close()
        for t in self._threads:
            t.join(5)
        self._threads.clear()
        self.sock = None


# ---- webhook ---------------------------------------------------------------------------------


class WebhookReceiver:
    """An HTTP server that verifies each batch's signature and keeps records by ``seq``.
    ``status`` forces an answer (e.g. 500), ``hold`` makes requests wait on an event."""

    def __init__(self, secret: str, tolerance: float = 300, tls: Any = None):
        self.secret = secret
        self.tls = tls
        self.tolerance = tolerance
        self.by_seq: dict[int, dict[str, Any]] = {}
        self.received = 0
        self.batches: list[dict[str, Any]] = []
        self.rejected: list[str] = []
        self.status = 200
        self.hold: threading.Event | None = None
        self.held = threading.Event()
        self.port = 0
        self.httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}/audit"

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                return

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if receiver.hold is not None:
                    receiver.held.set()
                    receiver.hold.wait(60)
                try:
                    batch = verify_request(
                        receiver.secret,
                        dict(self.headers.items()),
                        body,
                        tolerance_seconds=receiver.tolerance,
                    )
                except WebhookVerificationError as exc:
                    receiver.rejected.append(str(exc))
                    self.send_response(401)
                    self.end_headers()
                    return
                if receiver.status != 200:
                    self.send_response(receiver.status)
                    self.end_headers()
                    return
                with receiver._lock:
                    receiver.batches.append({"headers": dict(self.headers.items()), **batch})
                    for doc in batch["records"]:
                        receiver.received += 1
                        receiver.by_seq[doc["seq"]] = doc
                self.send_response(204)
                self.end_headers()

        ThreadingHTTPServer.allow_reuse_address = True
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        if self.tls is not None:
            self.httpd.socket = self.tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
        if self._thread is not None:
            self._thread.join(5)


# ---- OTLP/HTTP -------------------------------------------------------------------------------


class OtlpReceiver:
    """An OTLP/HTTP logs endpoint: decodes ``ExportLogsServiceRequest`` and answers with
    an ``ExportLogsServiceResponse`` (or ``status``)."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.content_types: list[str] = []
        self.status = 200
        self.port = 0
        self.httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/logs"

    def start(self) -> OtlpReceiver:
        from opentelemetry.proto.collector.logs.v1 import logs_service_pb2

        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                return

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/v1/logs" or receiver.status != 200:
                    self.send_response(404 if self.path != "/v1/logs" else receiver.status)
                    self.end_headers()
                    return
                request = logs_service_pb2.ExportLogsServiceRequest()
                request.ParseFromString(body)
                receiver.requests.append(request)
                receiver.content_types.append(self.headers.get("Content-Type", ""))
                out = logs_service_pb2.ExportLogsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        ThreadingHTTPServer.allow_reuse_address = True
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def log_records(self) -> list[tuple[Any, Any, Any]]:
        """(resource, scope, log record) for every record received."""
        out = []
        for request in self.requests:
            for rl in request.resource_logs:
                for sl in rl.scope_logs:
                    for rec in sl.log_records:
                        out.append((rl.resource, sl.scope, rec))
        return out

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


def any_value(value: Any) -> Any:
    """A protobuf AnyValue as Python."""
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def jsonl_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSONL file, parsed (a half line fails the parse)."""
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), f"{path} ends in half a record"
    return [json.loads(line) for line in text.splitlines()]


def tls_context(directory: Path) -> tuple[Any, Path]:
    """A server TLS context for 127.0.0.1 with a certificate from a throwaway CA made here,
    and the CA's certificate file (what a client must trust)."""
    import datetime
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cape test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file = directory / "server.pem"
    cert_file.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file)
    return context, ca_file
