"""The webhook sink: JSON batches POSTed with an HMAC-SHA256 signature, and its verification.

The body is ``{"sink", "count", "first_seq", "last_seq", "records": [...]}``. Two
headers sign it:

- ``Cape-Webhook-Timestamp``: the sending time, in whole seconds since the epoch;
- ``Cape-Webhook-Signature``: ``v1=`` and the lowercase hex HMAC-SHA256, keyed with
  the shared secret, of ``TIMESTAMP + "." + BODY`` (the body's exact bytes).

A receiver recomputes the HMAC over the bytes it received and compares it in
constant time, and refuses a timestamp further than its tolerance from its clock:
a forged or altered batch fails the first check, a recorded one replayed later the
second. Inside the tolerance a replay only repeats records the receiver already
has, which it drops by ``seq`` as it does any at-least-once duplicate.
:func:`verify_webhook` does all of this for a Python receiver. Any 2xx answer
acknowledges the batch; anything else (redirects included) is a failure retried
by the dispatcher. The secret is never logged, and errors never quote the URL
(it may hold credentials) or the response.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac

from .base import DeliveryError
from .config import WebhookSink

TIMESTAMP_HEADER = "Cape-Webhook-Timestamp"
SIGNATURE_HEADER = "Cape-Webhook-Signature"
BATCH_HEADER = "Cape-Webhook-Batch"
DEFAULT_TOLERANCE_SECONDS = 300


class WebhookVerificationError(Exception):
    """A webhook request that must not be trusted; the message says which check failed."""


def _mac(secret: bytes, timestamp: str, body: bytes) -> hmac.HMAC:
    mac = hmac.HMAC(secret, hashes.SHA256())
    mac.update(timestamp.encode("ascii") + b"." + body)
    return mac


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``Cape-Webhook-Signature`` value for ``body`` sent at ``timestamp``."""
    return "v1=" + _mac(secret, timestamp, body).finalize().hex()


def verify_webhook(
    secret: bytes | str,
    body: bytes,
    timestamp: str | None,
    signature: str | None,
    *,
    tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> dict[str, Any]:
    """Check a received webhook and return its parsed body; raises
    :class:`WebhookVerificationError` for a missing or malformed header, a timestamp
    outside ``tolerance_seconds`` of ``now`` (a replay or a badly set clock), or a
    signature that does not match (forged, altered, or another secret)."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    if not timestamp or not timestamp.isascii() or not timestamp.isdigit():
        raise WebhookVerificationError(f"missing or malformed {TIMESTAMP_HEADER}")
    moment = time.time() if now is None else now
    if abs(moment - int(timestamp)) > tolerance_seconds:
        raise WebhookVerificationError(
            f"{TIMESTAMP_HEADER} is {int(moment - int(timestamp))} s from now, over the"
            f" {tolerance_seconds:g} s tolerance (stale or replayed)"
        )
    if not signature or not signature.startswith("v1="):
        raise WebhookVerificationError(f"missing or malformed {SIGNATURE_HEADER}")
    try:
        given = bytes.fromhex(signature[3:])
    except ValueError:
        raise WebhookVerificationError(f"malformed {SIGNATURE_HEADER}") from None
    try:
        _mac(key, timestamp, body).verify(given)
    except InvalidSignature:
        raise WebhookVerificationError("signature does not match the body") from None
    try:
        parsed = json.loads(body)
    except ValueError:
        raise WebhookVerificationError("body is not JSON") from None
    if not isinstance(parsed, dict):
        raise WebhookVerificationError("body is not a JSON object")
    return parsed


def verify_request(
    secret: bytes | str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> dict[str, Any]:
    """:func:`verify_webhook` with the two headers looked up (case-insensitively)."""
    lower = {k.lower(): v for k, v in headers.items()}
    return verify_webhook(
        secret,
        body,
        lower.get(TIMESTAMP_HEADER.lower()),
        lower.get(SIGNATURE_HEADER.lower()),
        tolerance_seconds=tolerance_seconds,
        now=now,
    )


class WebhookSender:
    """POSTs each batch once; the dispatcher retries with backoff and dead-letters."""

    def __init__(self, config: WebhookSink):
        import requests

        self.config = config
        self._secret = config.secret_bytes()
        self._session = requests.Session()
        # Proxies and credentials from the environment are not wanted for an audit feed.
        self._session.trust_env = False
        if config.ca_file:
            self._session.verify = config.ca_file

    def __repr__(self) -> str:
        return f"WebhookSender({self.config.name!r})"

    def deliver(self, docs: Sequence[Mapping[str, Any]]) -> None:
        import requests

        body = json.dumps(
            {
                "sink": self.config.name,
                "count": len(docs),
                "first_seq": docs[0]["seq"],
                "last_seq": docs[-1]["seq"],
                "records": list(docs),
            },
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode("utf-8")
        stamp = str(int(time.time()))
        headers = {
            **self.config.headers,
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: stamp,
            SIGNATURE_HEADER: sign(self._secret, stamp, body),
            BATCH_HEADER: f"{docs[0]['seq']}-{docs[-1]['seq']}",
        }
        try:
            response = self._session.post(
                self.config.url,
                data=body,
                headers=headers,
                timeout=self.config.timeout_seconds,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            raise DeliveryError(f"webhook: {type(exc).__name__}") from None
        try:
            if not 200 <= response.status_code < 300:
                raise DeliveryError(f"webhook: HTTP {response.status_code}")
        finally:
            response.close()

    def close(self) -> None:
        self._session.close()
