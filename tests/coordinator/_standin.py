"""A stand-in coordinator on loopback for the client's side of the issue 9 contract.

It serves a label's active policy with the contract's headers (the canonical
policy JSON as the body; ``ETag``, ``X-Cape-Policy-Version``,
``X-Cape-Policy-Envelope`` and ``X-Cape-Signature`` signed with a real Ed25519
key over ``cape.policy-envelope.v1\\n`` + the envelope), lets a test swap in any
validly signed copy (as a man in the middle would), and answers ``POST
/v1/audit`` atomically per batch, with the refusal bodies of the contract, so
the spool's splitting can be watched request by request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cape_pipelines.policy import canonical_json

PREFIX = b"cape.policy-envelope.v1\n"


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def envelope_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def keyed_doc(label: str, version: int, key: str = "k1") -> dict[str, Any]:
    """A policy of ``label``/``version`` that drops ssn and perturbs age with key ``key``."""
    return {
        "label": label,
        "version": version,
        "rules": [
            {"match": {"name": "ssn"}, "actions": ["drop"]},
            {
                "match": {"name": "age"},
                "actions": [
                    {
                        "transform": {
                            "type": "numeric-perturbation",
                            "min": -2,
                            "max": 2,
                            "key": {"secret": key},
                        }
                    }
                ],
            },
        ],
    }


class Served:
    """One response for ``GET /v1/policies/{label}/active``: body and headers."""

    def __init__(self, body: bytes, headers: dict[str, str]):
        self.body = body
        self.headers = headers


class StandIn:
    """The loopback stand-in: ``policies[label]`` is what it serves; ``audit`` decides batches."""

    def __init__(self) -> None:
        self.signer = Ed25519PrivateKey.generate()
        self.public_key = b64e(
            self.signer.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        )
        self.policies: dict[str, Served] = {}
        self.keys: dict[str, dict[str, dict[str, str]]] = {}
        self.stored: list[dict[str, Any]] = []
        self.batches: list[int] = []
        self.refuse: Callable[[list[dict[str, Any]]], tuple[int, dict[str, Any]] | None] = (
            lambda _records: None
        )
        self.status_override: int | None = None
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ---- what it serves ---------------------------------------------------------------

    def sign(
        self,
        document: dict[str, Any],
        *,
        seq: int,
        label: str | None = None,
        version: int | None = None,
        body: bytes | None = None,
        prefix: bytes = PREFIX,
    ) -> Served:
        """A validly signed response for ``document`` (fields overridable, to forge)."""
        body = canonical_json(document) if body is None else body
        envelope = envelope_json(
            {
                "label": document["label"] if label is None else label,
                "version": document["version"] if version is None else version,
                "activation_seq": seq,
                "activated_at": f"2026-11-30T01:02:{seq:02d}.000000Z",
                "sha256": hashlib.sha256(body).hexdigest(),
            }
        )
        headers = {
            "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
            "X-Cape-Policy-Version": str(document["version"]),
            "X-Cape-Policy-Envelope": b64e(envelope),
            "X-Cape-Signature": b64e(self.signer.sign(prefix + envelope)),
        }
        return Served(body, headers)

    def activate(self, document: dict[str, Any], seq: int) -> Served:
        served = self.sign(document, seq=seq)
        self.policies[document["label"]] = served
        return served

    # ---- the HTTP server ----------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @contextmanager
    def running(self) -> Iterator[StandIn]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                parts = self.path.strip("/").split("/")
                if standin.status_override is not None:
                    self._send(standin.status_override, b'{"error":{"code":"x","message":"x"}}')
                elif parts[:2] == ["v1", "policies"] and parts[-1] == "active":
                    served = standin.policies.get(parts[2])
                    if served is None:
                        self._send(404, b'{"error":{"code":"not_found","message":"none"}}')
                    elif self.headers.get("If-None-Match") == served.headers["ETag"]:
                        self._send(304, b"", served.headers)
                    else:
                        self._send(200, served.body, served.headers)
                elif parts[:2] == ["v1", "labels"] and parts[-1] == "keys":
                    keys = standin.keys.get(parts[2], {})
                    self._send(200, json.dumps({"keys": keys}).encode())
                else:
                    self._send(404, b'{"error":{"code":"not_found","message":"no route"}}')

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                records = json.loads(self.rfile.read(length))["records"]
                with standin._lock:
                    standin.batches.append(len(records))
                    if standin.status_override is not None:
                        status = standin.status_override
                        self._send(status, b'{"error":{"code":"x","message":"refused"}}')
                        return
                    refused = standin.refuse(records)
                    if refused is not None:
                        # The batch is atomic: nothing of it is stored.
                        self._send(refused[0], json.dumps(refused[1]).encode())
                        return
                    ids = {r["record_id"] for r in standin.stored}
                    fresh = [r for r in records if r["record_id"] not in ids]
                    standin.stored.extend(fresh)
                body = {"accepted": len(fresh), "duplicates": len(records) - len(fresh)}
                self._send(200, json.dumps(body).encode())

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
            thread.join(timeout=10)
