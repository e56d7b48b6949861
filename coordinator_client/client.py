"""The thin client of the Cape coordinator: policies, keys, audit delivery, administration.

One ``requests`` session with timeouts. A policy is returned only after its
Ed25519 signature has been verified against the pinned public key; verified
policies are cached on disk by ETag, and when the coordinator cannot be reached
the last verified policy is used (re-verified, with a :class:`CoordinatorWarning`).
Key material is kept in memory only, never in the cache or a log line.

>>> client = Client("http://127.0.0.1:8686", token, public_key=PINNED)   # doctest: +SKIP
>>> policy, resolver = client.policy_and_keys("customers")              # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import requests
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cape_pipelines.errors import PolicyError
from cape_pipelines.keys import KeyProvider, KeyResolver
from cape_pipelines.policy import Policy, canonical_json, load_policy

from ._b64 import b64d
from .errors import (
    AuthError,
    CoordinatorError,
    CoordinatorWarning,
    NotFound,
    SignatureError,
    Unavailable,
)
from .spool import SpoolSink

log = logging.getLogger("coordinator_client")

PUBLIC_KEY_ENV = "CAPE_COORDINATOR_PUBLIC_KEY"
Timeout = float | tuple[float, float]


def load_public_key(value: Ed25519PublicKey | bytes | str) -> Ed25519PublicKey:
    """An Ed25519 public key from a key object, raw 32 bytes, base64 text or PEM."""
    if isinstance(value, Ed25519PublicKey):
        return value
    if isinstance(value, bytes) and len(value) == 32:
        return Ed25519PublicKey.from_public_bytes(value)
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    if "BEGIN PUBLIC KEY" in text:
        key = serialization.load_pem_public_key(text.encode("ascii"))
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("the pinned public key is not an Ed25519 key")
        return key
    raw = b64d(text)
    if len(raw) != 32:
        raise ValueError("the pinned public key must be 32 bytes (URL-safe base64)")
    return Ed25519PublicKey.from_public_bytes(raw)


def _default_dir(kind: str, url: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cape-pipelines" / kind / hashlib.sha256(url.encode()).hexdigest()[:16]


class Client:
    """A connection to one coordinator as one principal (its API token)."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        public_key: Ed25519PublicKey | bytes | str | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        timeout: Timeout = (3.05, 30.0),
        session: requests.Session | None = None,
    ):
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise CoordinatorError(f"coordinator URL must start with http:// or https://: {url}")
        self._token = token
        pinned = public_key if public_key is not None else os.environ.get(PUBLIC_KEY_ENV)
        try:
            self.public_key = load_public_key(pinned) if pinned else None
        except ValueError as exc:
            raise CoordinatorError(f"invalid pinned public key: {exc}") from None
        self.spool_dir = Path(spool_dir) if spool_dir else _default_dir("spool", self.url)
        self.cache_dir = (
            Path(cache_dir)
            if cache_dir
            else (self.spool_dir / "policies" if spool_dir else _default_dir("policies", self.url))
        )
        self.timeout = timeout
        self.session = session or requests.Session()
        self._sinks: list[SpoolSink] = []
        self._default_sink: SpoolSink | None = None

    def __repr__(self) -> str:
        return f"Client({self.url!r}, token=<hidden>)"

    def close(self) -> None:
        """Close the audit sinks (delivering what they can) and the HTTP session."""
        for sink in self._sinks:
            sink.close()
        self.session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- HTTP -------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        ok: Sequence[int] = (200, 201),
    ) -> requests.Response:
        """One request; a refusal raises the matching :class:`CoordinatorError`."""
        hdrs = dict(headers or {})
        if self._token:
            hdrs["Authorization"] = f"Bearer {self._token}"
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        try:
            resp = self.session.request(
                method,
                self.url + path,
                json=json_body,
                data=data,
                params={k: v for k, v in (params or {}).items() if v is not None},
                headers=hdrs,
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            raise Unavailable(
                f"cannot reach the coordinator at {self.url} ({type(exc).__name__})"
            ) from None
        if resp.status_code in ok:
            return resp
        raise _error(resp)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    # ---- identity -----------------------------------------------------------------------

    def whoami(self) -> dict[str, Any]:
        """The calling token's name, role and labels."""
        return self._json("GET", "/v1/whoami")

    def signing_key(self) -> str:
        """The coordinator's signing public key as it reports it (pin it out of band)."""
        return self._json("GET", "/v1/signing-key")["public_key"]

    # ---- tokens -------------------------------------------------------------------------

    def create_token(
        self,
        name: str,
        role: str,
        *,
        labels: Sequence[str] = (),
        expires_in: int | None = None,
    ) -> dict[str, Any]:
        """Make a token (admin); the result's ``token`` is shown this once."""
        body = {"name": name, "role": role, "labels": list(labels), "expires_in": expires_in}
        return self._json("POST", "/v1/tokens", json_body=body)

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        """Revoke a token by id (admin)."""
        return self._json("POST", f"/v1/tokens/{token_id}/revoke")

    def list_tokens(self) -> list[dict[str, Any]]:
        """Every token's description (admin)."""
        return self._json("GET", "/v1/tokens")

    # ---- policies -----------------------------------------------------------------------

    def push_policy(self, document: Mapping[str, Any]) -> dict[str, Any]:
        """Push a new draft version (author); the coordinator assigns its version."""
        return self._json("POST", "/v1/policies", data=_push_body(document))

    def submit_policy(self, label: str, version: int) -> dict[str, Any]:
        """draft -> in_review (author)."""
        return self._json("POST", f"/v1/policies/{label}/versions/{int(version)}/submit")

    def approve_policy(self, label: str, version: int) -> dict[str, Any]:
        """in_review -> active (a reviewer who is not the author)."""
        return self._json("POST", f"/v1/policies/{label}/versions/{int(version)}/approve")

    def reject_policy(self, label: str, version: int, reason: str) -> dict[str, Any]:
        """in_review -> rejected, with a reason (reviewer)."""
        return self._json(
            "POST",
            f"/v1/policies/{label}/versions/{int(version)}/reject",
            json_body={"reason": reason},
        )

    def policy_history(self, label: str) -> list[dict[str, Any]]:
        """Every version of a label with its state."""
        return self._json("GET", f"/v1/policies/{label}/versions")

    def show_policy(self, label: str, version: int) -> dict[str, Any]:
        """One version's metadata and document."""
        return self._json("GET", f"/v1/policies/{label}/versions/{int(version)}")

    def diff_policy(self, label: str, old: int, new: int) -> str:
        """Unified diff of two versions' canonical YAML."""
        body = self._json("GET", f"/v1/policies/{label}/diff", params={"from": old, "to": new})
        return body["diff"]

    def list_policies(self) -> list[dict[str, Any]]:
        """Every label with its latest and active versions."""
        return self._json("GET", "/v1/policies")

    def get_policy(self, label: str) -> Policy:
        """The label's active policy, after its signature verified against the pinned key.

        A policy that does not verify raises :class:`SignatureError` and is never
        returned or cached. If the coordinator cannot be reached, the last verified
        policy in the cache is re-verified and returned with a warning.
        """
        if self.public_key is None:
            raise SignatureError(
                "no pinned public key: pass public_key= or set CAPE_COORDINATOR_PUBLIC_KEY"
            )
        cache = self.cache_dir / f"{label}.json"
        cached = self._read_cache(cache)
        headers = {"If-None-Match": cached["etag"]} if cached else {}
        try:
            resp = self.request(
                "GET", f"/v1/policies/{label}/active", headers=headers, ok=(200, 304)
            )
        except Unavailable:
            if cached is None:
                raise
            body = self._verified(cached["body"].encode("utf-8"), cached["signature"], "cached")
            policy = _load(body, label)
            message = (
                f"coordinator {self.url} unreachable; using cached policy {label} "
                f"version {policy.version} (signature verified)"
            )
            log.warning(message)
            warnings.warn(message, CoordinatorWarning, stacklevel=2)
            return policy
        if resp.status_code == 304 and cached is not None:
            body = self._verified(cached["body"].encode("utf-8"), cached["signature"], "cached")
            return _load(body, label)
        signature = resp.headers.get("X-Cape-Signature", "")
        body = self._verified(resp.content, signature, "served")
        etag = resp.headers.get("ETag", "")
        if etag.strip('"') != hashlib.sha256(body).hexdigest():
            raise SignatureError(f"policy {label}: ETag does not match the served bytes")
        policy = _load(body, label)
        _atomic_write(
            cache,
            json.dumps({"etag": etag, "signature": signature, "body": body.decode("utf-8")}),
        )
        return policy

    def _verified(self, body: bytes, signature: str, what: str) -> bytes:
        assert self.public_key is not None
        try:
            self.public_key.verify(b64d(signature), body)
        except (InvalidSignature, ValueError):
            raise SignatureError(
                f"the {what} policy's signature does not verify against the pinned key; refused"
            ) from None
        return body

    def _read_cache(self, path: Path) -> dict[str, str] | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("policy cache %s is unreadable; ignoring it", path)
            return None
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), str) for k in ("etag", "signature", "body")
        ):
            log.warning("policy cache %s is malformed; ignoring it", path)
            return None
        return data

    # ---- keys ---------------------------------------------------------------------------

    def create_key(self, name: str, labels: Sequence[str]) -> dict[str, Any]:
        """Make a random 32-byte key on the coordinator for pipelines of ``labels`` (admin)."""
        return self._json("POST", "/v1/keys", json_body={"name": name, "labels": list(labels)})

    def rotate_key(self, name: str) -> dict[str, Any]:
        """Add a new current version of a key (admin); old versions stay readable."""
        return self._json("POST", f"/v1/keys/{name}/rotate")

    def list_keys(self) -> list[dict[str, Any]]:
        """Every key's name, labels and versions, never material (admin, auditor)."""
        return self._json("GET", "/v1/keys")

    def get_key_versions(self, label: str) -> dict[str, dict[int, bytes]]:
        """Every version of every key of ``label`` (pipeline tokens of that label)."""
        body = self._json("GET", f"/v1/labels/{label}/keys")
        return {
            name: {int(v): b64d(text) for v, text in item["versions"].items()}
            for name, item in body["keys"].items()
        }

    def get_keys(self, label: str) -> dict[str, bytes]:
        """The current version of each key of ``label``: ``{name: bytes}``."""
        return {
            name: versions[max(versions)] for name, versions in self.get_key_versions(label).items()
        }

    def key_provider(self, label: str) -> tuple[str, KeyProvider]:
        """A provider for :class:`~cape_pipelines.keys.KeyResolver` (``providers=[...]``).

        ``NAME`` resolves to the current version, ``NAME@3`` to version 3 (to reverse
        tokens made before a rotation). Keys are fetched once, on first use.
        """
        fetched: dict[str, dict[int, bytes]] = {}
        done = False

        def provide(name: str) -> bytes | None:
            nonlocal done
            if not done:
                fetched.update(self.get_key_versions(label))
                done = True
            base, sep, version = name.rpartition("@")
            if sep and version.isdigit():
                return fetched.get(base, {}).get(int(version))
            versions = fetched.get(name)
            return versions[max(versions)] if versions else None

        return f"coordinator {self.url} (label {label})", provide

    def policy_and_keys(self, label: str) -> tuple[Policy, KeyResolver]:
        """The verified active policy of ``label`` and a resolver whose keys come from here."""
        policy = self.get_policy(label)
        return policy, KeyResolver(providers=[self.key_provider(label)])

    # ---- audit and runs ---------------------------------------------------------------

    def post_audit(self, records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
        """Post run records now (no spool); ids already stored are skipped."""
        data = canonical_json({"records": [dict(r) for r in records]})
        return self._json("POST", "/v1/audit", data=data)

    def audit_sink(self, **options: Any) -> SpoolSink:
        """A durable, retrying audit sink spooling under ``spool_dir`` (see :class:`SpoolSink`)."""
        sink = SpoolSink(self, self.spool_dir, **options)
        self._sinks.append(sink)
        return sink

    def default_audit_sink(self) -> SpoolSink:
        """The sink every run through this client shares (engines given ``client=`` use it).

        Made on first use, and again if it was closed: one delivery thread per
        client, however many runs.
        """
        if self._default_sink is None or self._default_sink.closed:
            self._default_sink = self.audit_sink()
        return self._default_sink

    def list_audit(self, **filters: Any) -> list[dict[str, Any]]:
        """Chain entries filtered by run_id, label, event, since, until, after_seq, limit."""
        return self._json("GET", "/v1/audit", params=filters)

    def verify_audit(self, expect: tuple[int, str] | None = None) -> dict[str, Any]:
        """The coordinator's check of the whole chain: ``{intact, count, last_hash, problems}``."""
        params = {"expect_seq": expect[0], "expect_hash": expect[1]} if expect else None
        return self._json("GET", "/v1/audit/verify", params=params)

    def list_runs(
        self, *, status: str | None = None, label: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Pipeline runs with status (running, succeeded, failed, lost)."""
        return self._json(
            "GET", "/v1/runs", params={"status": status, "label": label, "limit": limit}
        )


def _push_body(document: Mapping[str, Any]) -> bytes:
    # canonical_json turns YAML dates into strings; requests' json= would refuse them.
    return canonical_json({"document": dict(document)})


def _load(body: bytes, label: str) -> Policy:
    try:
        document = json.loads(body)
    except ValueError:
        raise CoordinatorError(f"policy {label}: the served document is not JSON") from None
    if not isinstance(document, dict) or document.get("label") != label:
        raise CoordinatorError(f"the coordinator served a policy for another label than {label}")
    try:
        return load_policy(document)
    except PolicyError as exc:
        raise CoordinatorError(f"policy {label} does not load: {exc.problems[:3]}") from None


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _error(resp: requests.Response) -> CoordinatorError:
    status = resp.status_code
    code, message, problems = None, resp.reason or "error", None
    try:
        err = resp.json().get("error", {})
        code, message = err.get("code"), err.get("message", message)
        problems = err.get("problems")
    except (ValueError, AttributeError):
        pass
    if problems:
        message += ": " + "; ".join(f"{p.get('loc')}: {p.get('msg')}" for p in problems[:20])
    text = f"coordinator refused ({status} {code or 'error'}): {message}"
    if status >= 500:
        return Unavailable(f"coordinator failed ({status}): {message}", status=status, code=code)
    if status in (401, 403):
        return AuthError(text, status=status, code=code)
    if status == 404:
        return NotFound(text, status=status, code=code)
    return CoordinatorError(text, status=status, code=code)
