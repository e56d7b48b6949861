"""The thin client of the Cape coordinator: policies, keys, audit delivery, administration.

Requests go through one :class:`~coordinator_client.transport.Transport` (URL,
token, timeouts), which the audit spool shares without ever holding a client. A
policy is returned only after its signed envelope checked out: the Ed25519
signature over ``cape.policy-envelope.v1\\n`` + the envelope verifies against the
pinned key, and the envelope names the label asked for, the served version and
the sha256 of the served bytes. The highest activation sequence seen per label
is kept on disk next to the policy cache, and an older activation (or the same
one with other bytes) is refused as a rollback. Verified policies are cached by
ETag; when the coordinator cannot be reached, the cached copy is re-checked the
same way and used, with a :class:`CoordinatorWarning`, only if its last
successful online check is younger than ``policy_max_age``. Keys are kept in
memory only, unless the operator opts in to the encrypted
:class:`~coordinator_client.keycache.KeyCache`.

>>> client = Client("http://127.0.0.1:8686", token, public_key=PINNED)   # doctest: +SKIP
>>> policy, resolver = client.policy_and_keys("customers")              # doctest: +SKIP

Why one module over 500 lines: :class:`Client` mirrors the coordinator's API,
one short method per endpoint, next to the policy verification every fetch
goes through; the transport, the audit spool and the key cache already live in
their own modules.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import requests
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cape_pipelines.errors import PolicyError
from cape_pipelines.keys import CoordinatorKeys, KeyProvider, KeyResolver, env_var_name
from cape_pipelines.policy import Policy, canonical_json, load_policy

from ._b64 import b64d
from .errors import (
    AuthError,
    CoordinatorError,
    CoordinatorWarning,
    NotFound,
    PolicyRefused,
    SignatureError,
    Unavailable,
)
from .keycache import KeyCache, KeyCacheError
from .spool import SpoolSink
from .transport import Timeout, Transport

log = logging.getLogger("coordinator_client")

PUBLIC_KEY_ENV = "CAPE_COORDINATOR_PUBLIC_KEY"
MAX_AGE_ENV = "CAPE_POLICY_MAX_AGE"
DEFAULT_POLICY_MAX_AGE = 24 * 3600.0
ENVELOPE_PREFIX = b"cape.policy-envelope.v1\n"
_ENVELOPE_FIELDS = {"label", "version", "activation_seq", "activated_at", "sha256"}
# A cached copy checked "in the future" by more than this was edited (or the clock jumped).
_CLOCK_SLACK = 300.0

__all__ = ["Client", "PolicyFetch", "load_public_key"]


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


@dataclass(frozen=True)
class PolicyFetch:
    """A verified policy and how it was obtained.

    ``offline`` is True when it came from the local cache because the coordinator
    could not be reached; ``checked_at`` is the Unix time of the last successful
    online check of that copy; ``activation_seq`` is the signed activation number.
    """

    policy: Policy
    offline: bool
    checked_at: float
    activation_seq: int


def _max_age(value: float | None) -> float | None:
    if value is not None:
        return None if value <= 0 else float(value)
    text = os.environ.get(MAX_AGE_ENV)
    if not text:
        return DEFAULT_POLICY_MAX_AGE
    try:
        seconds = float(text)
    except ValueError:
        raise CoordinatorError(f"{MAX_AGE_ENV} must be a number of seconds, not {text!r}") from None
    return None if seconds <= 0 else seconds


def _span(seconds: float) -> str:
    """A duration for a message: ``45 s``, ``10 min``, ``2.0 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _default_dir(kind: str, url: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cape-pipelines" / kind / hashlib.sha256(url.encode()).hexdigest()[:16]


class Client:
    """A connection to one coordinator as one principal (its API token).

    ``policy_max_age`` (seconds; default ``CAPE_POLICY_MAX_AGE`` or 24 hours; 0
    for no limit) bounds how old the last online check of a cached policy may be
    for it to be used offline. ``key_cache`` (a :class:`KeyCache`, opt-in) keeps
    the label's keys sealed on disk for runs during an outage.
    """

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
        policy_max_age: float | None = None,
        key_cache: KeyCache | None = None,
    ):
        self.transport = Transport(url, token, timeout, session=session)
        self.url = self.transport.url
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
        self.policy_max_age = _max_age(policy_max_age)
        self.key_cache = key_cache
        self._sinks: list[SpoolSink] = []
        self._default_sink: SpoolSink | None = None
        self._offline: dict[str, bool] = {}

    @property
    def timeout(self) -> Timeout:
        """The (connect, read) timeouts of every request."""
        return self.transport.timeout

    @property
    def session(self) -> requests.Session:
        """The HTTP session of the transport."""
        return self.transport.session

    def __repr__(self) -> str:
        return f"Client({self.url!r}, token=<hidden>)"

    def close(self) -> None:
        """Close the audit sinks (delivering what they can) and the HTTP session."""
        for sink in self._sinks:
            sink.close()
        self.transport.close()

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
        return self.transport.request(
            method, path, json_body=json_body, data=data, params=params, headers=headers, ok=ok
        )

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    # ---- identity -----------------------------------------------------------------------

    def whoami(self) -> dict[str, Any]:
        """The calling token's name, role and labels."""
        return cast("dict[str, Any]", self._json("GET", "/v1/whoami"))

    def signing_key(self) -> str:
        """The coordinator's signing public key as it reports it (pin it out of band)."""
        return cast("str", self._json("GET", "/v1/signing-key")["public_key"])

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
        return cast("dict[str, Any]", self._json("POST", "/v1/tokens", json_body=body))

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        """Revoke a token by id (admin)."""
        return cast("dict[str, Any]", self._json("POST", f"/v1/tokens/{token_id}/revoke"))

    def list_tokens(self) -> list[dict[str, Any]]:
        """Every token's description (admin)."""
        return cast("list[dict[str, Any]]", self._json("GET", "/v1/tokens"))

    # ---- policies -----------------------------------------------------------------------

    def push_policy(self, document: Mapping[str, Any]) -> dict[str, Any]:
        """Push a new draft version (author); the coordinator assigns its version."""
        return cast("dict[str, Any]", self._json("POST", "/v1/policies", data=_push_body(document)))

    def submit_policy(self, label: str, version: int) -> dict[str, Any]:
        """draft -> in_review (author)."""
        return cast(
            "dict[str, Any]",
            self._json("POST", f"/v1/policies/{label}/versions/{int(version)}/submit"),
        )

    def approve_policy(self, label: str, version: int) -> dict[str, Any]:
        """in_review -> active (a reviewer who is not the author)."""
        return cast(
            "dict[str, Any]",
            self._json("POST", f"/v1/policies/{label}/versions/{int(version)}/approve"),
        )

    def reject_policy(self, label: str, version: int, reason: str) -> dict[str, Any]:
        """in_review -> rejected, with a reason (reviewer)."""
        return cast(
            "dict[str, Any]",
            self._json(
                "POST",
                f"/v1/policies/{label}/versions/{int(version)}/reject",
                json_body={"reason": reason},
            ),
        )

    def rollback_policy(self, label: str, version: int, reason: str) -> dict[str, Any]:
        """superseded -> active again, with a reason (reviewer): a new, higher activation."""
        return cast(
            "dict[str, Any]",
            self._json(
                "POST",
                f"/v1/policies/{label}/versions/{int(version)}/rollback",
                json_body={"reason": reason},
            ),
        )

    def policy_history(self, label: str) -> list[dict[str, Any]]:
        """Every version of a label with its state."""
        return cast("list[dict[str, Any]]", self._json("GET", f"/v1/policies/{label}/versions"))

    def show_policy(self, label: str, version: int) -> dict[str, Any]:
        """One version's metadata and document."""
        return cast(
            "dict[str, Any]", self._json("GET", f"/v1/policies/{label}/versions/{int(version)}")
        )

    def diff_policy(self, label: str, old: int, new: int) -> str:
        """Unified diff of two versions' canonical YAML."""
        body = self._json("GET", f"/v1/policies/{label}/diff", params={"from": old, "to": new})
        return cast("str", body["diff"])

    def list_policies(self) -> list[dict[str, Any]]:
        """Every label with its latest and active versions."""
        return cast("list[dict[str, Any]]", self._json("GET", "/v1/policies"))

    def get_policy(self, label: str) -> Policy:
        """The label's active policy, once its signed envelope checked out (see
        :meth:`fetch_policy`)."""
        return self.fetch_policy(label).policy

    def served_offline(self, label: str) -> bool:
        """True if the last :meth:`fetch_policy` of ``label`` used the cache during an outage."""
        return self._offline.get(label, False)

    def fetch_policy(self, label: str) -> PolicyFetch:
        """The label's active policy and how it was obtained; nothing unverified is returned.

        The served envelope's signature must verify against the pinned key, and
        the envelope must name ``label``, the served version and the sha256 of
        the served bytes; an activation older than the newest already seen for
        the label (or the same activation with other bytes) is a rollback. Any of
        these raises :class:`PolicyRefused` (:class:`SignatureError` for a bad
        signature) and nothing is cached. If the coordinator cannot be reached,
        the cached copy passes the same checks and must have been confirmed
        online within ``policy_max_age``; it is returned with a warning.
        """
        if self.public_key is None:
            raise SignatureError(
                "no pinned public key: pass public_key= or set CAPE_COORDINATOR_PUBLIC_KEY"
            )
        path = self.cache_dir / f"{label}.json"
        cached = self._read_cache(path)
        # A copy without an envelope (cached by an older client) is not worth a 304.
        headers = {"If-None-Match": cached["etag"]} if cached and cached.get("envelope") else {}
        try:
            resp = self.request(
                "GET", f"/v1/policies/{label}/active", headers=headers, ok=(200, 304)
            )
        except Unavailable:
            if cached is None:
                raise Unavailable(
                    f"cannot reach the coordinator at {self.url}, and no verified copy of "
                    f"policy {label} is cached in {self.cache_dir}"
                ) from None
            return self._offline_copy(label, cached, path)
        except AuthError as exc:
            self._forget_keys(label, exc)
            raise
        if resp.status_code == 304 and cached is not None:
            served = {k: cached.get(k) for k in ("body", "etag", "envelope", "signature")}
            if resp.headers.get("X-Cape-Policy-Envelope"):
                # The current envelope of the same bytes (say, re-activated by a rollback).
                served["envelope"] = resp.headers["X-Cape-Policy-Envelope"]
                served["signature"] = resp.headers.get("X-Cape-Signature", "")
            return self._accept(label, served, path, "cached")
        text = resp.content.decode("utf-8", "replace")
        etag = resp.headers.get("ETag", "")
        if text.encode("utf-8") != resp.content:
            raise PolicyRefused(f"policy {label}: the served document is not UTF-8; refused")
        if etag.strip('"') != hashlib.sha256(resp.content).hexdigest():
            raise SignatureError(f"policy {label}: ETag does not match the served bytes")
        served = {
            "body": text,
            "etag": etag,
            "envelope": resp.headers.get("X-Cape-Policy-Envelope"),
            "signature": resp.headers.get("X-Cape-Signature", ""),
        }
        return self._accept(label, served, path, "served")

    def _accept(self, label: str, served: dict[str, Any], path: Path, what: str) -> PolicyFetch:
        """Check a copy confirmed online, record its activation, cache it, return it."""
        body = served["body"].encode("utf-8")
        with self._label_lock(label):
            policy, envelope = self._checked(label, body, served, what)
            seq = envelope["activation_seq"]
            self._remember(label, envelope)
            now = time.time()
            _atomic_write(path, json.dumps({**served, "checked_at": now}))
        self._offline[label] = False
        return PolicyFetch(policy, False, now, seq)

    def _offline_copy(self, label: str, cached: dict[str, Any], path: Path) -> PolicyFetch:
        with self._label_lock(label):
            policy, envelope = self._checked(
                label, cached["body"].encode("utf-8"), cached, "cached"
            )
        checked_at = cached.get("checked_at")
        if not isinstance(checked_at, int | float) or isinstance(checked_at, bool):
            raise PolicyRefused(
                f"the cached copy of policy {label} ({path}) does not say when it was last "
                "checked online; refused (reach the coordinator once to refresh it)"
            )
        age = time.time() - checked_at
        if age < -_CLOCK_SLACK:
            raise PolicyRefused(
                f"the cached copy of policy {label} ({path}) claims an online check in the "
                "future; refused"
            )
        if self.policy_max_age is not None and age > self.policy_max_age:
            raise PolicyRefused(
                f"coordinator {self.url} unreachable, and the cached copy of policy {label} "
                f"was last checked online {_span(age)} ago, more than the maximum age of "
                f"{_span(self.policy_max_age)} (policy_max_age, --policy-max-age, "
                f"{MAX_AGE_ENV}); refused"
            )
        message = (
            f"coordinator {self.url} unreachable; using cached policy {label} "
            f"version {policy.version} (signature verified, last checked online "
            f"{_span(max(age, 0))} ago)"
        )
        log.warning(message)
        warnings.warn(message, CoordinatorWarning, stacklevel=3)
        self._offline[label] = True
        return PolicyFetch(policy, True, float(checked_at), envelope["activation_seq"])

    def _checked(
        self, label: str, body: bytes, served: Mapping[str, Any], what: str
    ) -> tuple[Policy, dict[str, Any]]:
        """Verify ``body`` against its envelope and signature, and against what was seen."""
        assert self.public_key is not None
        envelope_text = served.get("envelope")
        signature = served.get("signature") or ""
        if not envelope_text:
            # A bare-body signature (an older coordinator, or a copy cached by an older
            # client) says nothing about the activation: it could be any old version.
            raise PolicyRefused(
                f"the {what} policy {label} has no signed envelope (a coordinator or cache "
                "older than this client?), so it cannot be checked against rollback; refused"
            )
        try:
            envelope_bytes = b64d(envelope_text)
            self.public_key.verify(b64d(signature), ENVELOPE_PREFIX + envelope_bytes)
        except (InvalidSignature, ValueError):
            raise SignatureError(
                f"the {what} policy's signature does not verify against the pinned key; refused"
            ) from None
        envelope = _parse_envelope(envelope_bytes, label)
        if envelope["sha256"] != hashlib.sha256(body).hexdigest():
            raise SignatureError(
                f"policy {label}: the {what} policy's bytes do not match the sha256 in its "
                "signed envelope; refused"
            )
        if envelope["label"] != label:
            raise PolicyRefused(
                f"the {what} policy's signed envelope is for label {envelope['label']!r}, "
                f"not {label!r}; refused"
            )
        policy = _load(body, label)
        if policy.version != envelope["version"]:
            raise PolicyRefused(
                f"policy {label}: the {what} document is version {policy.version} but its "
                f"signed envelope says version {envelope['version']}; refused"
            )
        seen = self._read_seen(label)
        if seen is not None:
            if envelope["activation_seq"] < seen["activation_seq"]:
                raise PolicyRefused(
                    f"policy {label}: the {what} copy (version {envelope['version']}, "
                    f"activation {envelope['activation_seq']}) is older than activation "
                    f"{seen['activation_seq']} already seen; refused as a rollback"
                )
            if (
                envelope["activation_seq"] == seen["activation_seq"]
                and envelope["sha256"] != seen["sha256"]
            ):
                raise PolicyRefused(
                    f"policy {label}: the {what} copy claims activation "
                    f"{envelope['activation_seq']} with other bytes than the copy seen before; "
                    "refused"
                )
        return policy, envelope

    def _seen_path(self, label: str) -> Path:
        return self.cache_dir / f"{label}.seen.json"

    def _read_seen(self, label: str) -> dict[str, Any] | None:
        path = self._seen_path(label)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            data = None
        if (
            not isinstance(data, dict)
            or type(data.get("activation_seq")) is not int
            or not isinstance(data.get("sha256"), str)
        ):
            # Failing open here would drop the rollback protection: stop and say where.
            raise PolicyRefused(
                f"the record of the newest activation seen for policy {label} ({path}) is "
                "unreadable; refusing the policy (inspect the file; delete it to trust the "
                "coordinator's next answer)"
            )
        return data

    def _remember(self, label: str, envelope: Mapping[str, Any]) -> None:
        seen = self._read_seen(label)
        if seen is None or envelope["activation_seq"] > seen["activation_seq"]:
            _atomic_write(
                self._seen_path(label),
                json.dumps(
                    {
                        "label": label,
                        "version": envelope["version"],
                        "activation_seq": envelope["activation_seq"],
                        "activated_at": envelope["activated_at"],
                        "sha256": envelope["sha256"],
                    },
                    sort_keys=True,
                ),
            )

    @contextlib.contextmanager
    def _label_lock(self, label: str) -> Iterator[None]:
        """Serialise check-and-record of one label across processes sharing the cache."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.cache_dir / f".{label}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_cache(self, path: Path) -> dict[str, Any] | None:
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
        return cast(
            "dict[str, Any]",
            self._json("POST", "/v1/keys", json_body={"name": name, "labels": list(labels)}),
        )

    def rotate_key(self, name: str) -> dict[str, Any]:
        """Add a new current version of a key (admin); old versions stay readable."""
        return cast("dict[str, Any]", self._json("POST", f"/v1/keys/{name}/rotate"))

    def list_keys(self) -> list[dict[str, Any]]:
        """Every key's name, labels and versions, never material (admin, auditor)."""
        return cast("list[dict[str, Any]]", self._json("GET", "/v1/keys"))

    def get_key_versions(self, label: str) -> dict[str, dict[int, bytes]]:
        """Every version of every key of ``label`` (pipeline tokens of that label).

        With a :class:`KeyCache`, keys fetched online are sealed into it, and when the
        coordinator cannot be reached its unexpired entry is used (with a warning).
        A 401 erases the whole cache, a 403 or 404 the label's entry.
        """
        try:
            body = self._json("GET", f"/v1/labels/{label}/keys")
        except Unavailable:
            cached = self._cached_keys(label)
            if cached is None:
                raise
            return cached
        except (AuthError, NotFound) as exc:
            self._forget_keys(label, exc)
            raise
        versions = {
            name: {int(v): b64d(text) for v, text in item["versions"].items()}
            for name, item in body["keys"].items()
        }
        if self.key_cache is not None:
            self.key_cache.store(self.url, label, self.transport.token, versions)
        return versions

    def _cached_keys(self, label: str) -> dict[str, dict[int, bytes]] | None:
        if self.key_cache is None:
            return None
        found = self.key_cache.load(self.url, label, self.transport.token)
        if found is None:
            return None
        versions, cached_at = found
        message = (
            f"coordinator {self.url} unreachable; using the keys of label {label} from the "
            f"encrypted key cache (cached {_span(max(time.time() - cached_at, 0))} ago)"
        )
        log.warning(message)
        warnings.warn(message, CoordinatorWarning, stacklevel=4)
        return versions

    def _forget_keys(self, label: str, exc: CoordinatorError) -> None:
        """Erase cached keys the coordinator no longer lets this token have."""
        if self.key_cache is None:
            return
        if exc.status == 401:
            self.key_cache.erase(self.url)
        elif exc.status in (403, 404):
            self.key_cache.erase(self.url, label)

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
                try:
                    fetched.update(self.get_key_versions(label))
                except Unavailable:
                    raise Unavailable(_no_key_message(self, label, name)) from None
                except KeyCacheError as exc:
                    raise KeyCacheError(f"{exc} (key {name!r} of label {label})") from None
                done = True
            base, sep, version = name.rpartition("@")
            if sep and version.isdigit():
                return fetched.get(base, {}).get(int(version))
            versions = fetched.get(name)
            return versions[max(versions)] if versions else None

        return f"coordinator {self.url} (label {label})", provide

    def mint_worker_token(self, label: str, expires_in: int | None = None) -> dict[str, Any]:
        """A worker token for ``label`` (this client's token must be a pipeline token of it).

        It reads that label's keys and nothing else, and expires after
        ``expires_in`` seconds (default ``CAPE_WORKER_TOKEN_TTL`` or an hour; at
        most a day, never past this client's token). The result's ``token``
        is shown this once.
        """
        return self._mint(label, "worker-tokens", expires_in)

    def _mint(self, label: str, kind: str, expires_in: int | None) -> dict[str, Any]:
        """POST ``/v1/labels/{label}/{kind}`` with the lifetime (default: the worker TTL)."""
        if expires_in is None:
            expires_in = _worker_token_ttl()
        return cast(
            "dict[str, Any]",
            self._json("POST", f"/v1/labels/{label}/{kind}", json_body={"expires_in": expires_in}),
        )

    def worker_keys(self, label: str, expires_in: int | None = None) -> CoordinatorKeys:
        """A worker-side key provider for ``label``'s keys, with a worker token minted now.

        Engines given ``client=`` ship this in their jobs instead of key bytes.
        """
        minted = self.mint_worker_token(label, expires_in)
        return CoordinatorKeys(self.url, minted["token"], label)

    def mint_audit_token(self, label: str, expires_in: int | None = None) -> dict[str, Any]:
        """An audit-writer token for ``label`` (this client's token must be a pipeline token
        of it): it posts that label's run records and nothing else (no keys, no policies).

        Lifetime as for :meth:`mint_worker_token`. The result's ``token`` is shown this once.
        """
        return self._mint(label, "audit-tokens", expires_in)

    def worker_audit_sink(self, label: str, expires_in: int | None = None) -> SpoolSink:
        """A spool sink for workers that write ``label``'s run records (Beam's), posting with
        an audit-writer token minted now, never this client's token.

        It spools under ``spool_dir/audit-writers/<token id>``: a run is bound to the
        token that sent its first record, so its records must not be picked up by a
        sink with another token. This client delivers what the workers leave there
        while it lives, and on :meth:`close`.
        """
        try:
            minted = self.mint_audit_token(label, expires_in)
        except Unavailable as exc:
            raise Unavailable(
                f"{exc}: the workers' audit-writer token is minted when the pipeline is built; "
                "pass audit= (a file or a sink) to run while the coordinator is down"
            ) from None
        transport = Transport(self.url, minted["token"], self.timeout)
        sink = SpoolSink(transport, self.spool_dir / "audit-writers" / minted["id"])
        self._sinks.append(sink)
        return sink

    def policy_and_keys(self, label: str) -> tuple[Policy, KeyResolver]:
        """The verified active policy of ``label`` and a resolver whose keys come from here."""
        policy = self.get_policy(label)
        return policy, KeyResolver(providers=[self.key_provider(label)])

    # ---- audit and runs ---------------------------------------------------------------

    def post_audit(self, records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
        """Post run records now (no spool); ids already stored are skipped."""
        return self.transport.post_audit(records)

    def audit_sink(self, **options: Any) -> SpoolSink:
        """A durable, retrying audit sink spooling under ``spool_dir`` (see :class:`SpoolSink`)."""
        sink = SpoolSink(self.transport, self.spool_dir, **options)
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
        return cast("list[dict[str, Any]]", self._json("GET", "/v1/audit", params=filters))

    def verify_audit(self, expect: tuple[int, str] | None = None) -> dict[str, Any]:
        """The coordinator's check of the whole chain: ``{intact, count, last_hash, problems}``."""
        params = {"expect_seq": expect[0], "expect_hash": expect[1]} if expect else None
        return cast("dict[str, Any]", self._json("GET", "/v1/audit/verify", params=params))

    def list_runs(
        self, *, status: str | None = None, label: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Pipeline runs with status (running, succeeded, failed, lost)."""
        return cast(
            "list[dict[str, Any]]",
            self._json(
                "GET", "/v1/runs", params={"status": status, "label": label, "limit": limit}
            ),
        )


def _parse_envelope(raw: bytes, label: str) -> dict[str, Any]:
    """The signed envelope's fields, each of the contract's type, or PolicyRefused."""
    try:
        envelope = json.loads(raw)
    except ValueError:
        envelope = None
    if not isinstance(envelope, dict) or set(envelope) != _ENVELOPE_FIELDS:
        raise PolicyRefused(f"policy {label}: the signed envelope is not of the expected form")
    for field in ("version", "activation_seq"):
        if type(envelope[field]) is not int or envelope[field] < 0:
            raise PolicyRefused(f"policy {label}: the signed envelope's {field} is not a number")
    sha = envelope["sha256"]
    if not isinstance(sha, str) or len(sha) != 64 or set(sha) - set("0123456789abcdef"):
        raise PolicyRefused(f"policy {label}: the signed envelope's sha256 is malformed")
    if not isinstance(envelope["label"], str) or not isinstance(envelope["activated_at"], str):
        raise PolicyRefused(f"policy {label}: the signed envelope's label or time is malformed")
    return envelope


WORKER_TOKEN_TTL_ENV = "CAPE_WORKER_TOKEN_TTL"  # noqa: S105 (a variable name)


def _worker_token_ttl() -> int:
    """Seconds a minted worker token lives: ``CAPE_WORKER_TOKEN_TTL``, else an hour."""
    text = os.environ.get(WORKER_TOKEN_TTL_ENV, "").strip()
    if not text:
        return 3600
    try:
        value = int(text)
    except ValueError:
        raise CoordinatorError(
            f"{WORKER_TOKEN_TTL_ENV} must be a whole number of seconds, not {text!r}"
        ) from None
    if value < 1:
        raise CoordinatorError(f"{WORKER_TOKEN_TTL_ENV} must be at least 1 second")
    return value


def _no_key_message(client: Client, label: str, name: str) -> str:
    base = name.rpartition("@")[0] if "@" in name else name
    where = (
        "and the encrypted key cache holds no unexpired keys for it"
        if client.key_cache is not None
        else "and no key cache is set up"
    )
    return (
        f"key {name!r} of policy {label} is not available: the coordinator at {client.url} "
        f"cannot be reached {where}. Give the key locally (--keys-file, or "
        f"{env_var_name(base)}), or opt in to the encrypted key cache before the next outage "
        "(--key-cache DIR with --key-cache-key-file FILE or CAPE_KEY_CACHE_KEY; "
        "Client(key_cache=KeyCache.from_settings(...)))"
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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
