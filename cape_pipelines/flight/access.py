"""Who may read what through the Flight service: a bearer token, checked per stream.

The service never decides on its own whether a caller may see a label's data.
:class:`CoordinatorAccess` hands each stream's bearer token to the
coordinator (as a ``coordinator_client.Client``): the token must be a pipeline
token for the label; the label's active policy comes back only with a valid
Ed25519 signature, keys come through the same token, and the stream's audit
records go to the coordinator's durable spool. :class:`StaticAccess` is the
offline variant (policies from files, keys from the environment or a
resolver, tokens from a fixed table) for a single host or a test. Either way
key material stays inside the service process: it is used to build the plan
and nothing the service sends (data, errors, flight infos) contains it.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow.flight as flight

from ..audit import AuditTarget
from ..errors import CapeError
from ..keys import KeyResolver
from ..policy.load import PolicySource, load_policy
from ..policy.models import Policy


@dataclass(frozen=True)
class Grant:
    """What one stream may use: the verified policy, its key resolver, where records go."""

    policy: Policy
    resolver: KeyResolver | None
    audit: AuditTarget
    source: str | None = None


class Access(Protocol):
    """Decides, per stream, whether ``token`` may read ``label`` and with which policy."""

    def grant(self, token: str | None, label: str) -> Grant: ...

    def close(self) -> None: ...


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class StaticAccess:
    """Policies by label, a fixed token table, keys from ``keys``/``resolver`` (no coordinator).

    ``tokens`` maps each accepted bearer token to the labels it may read;
    ``None`` accepts any caller (only sensible on loopback). Tokens are
    compared in constant time, by their SHA-256.
    """

    def __init__(
        self,
        policies: Mapping[str, PolicySource] | Sequence[PolicySource],
        *,
        tokens: Mapping[str, Sequence[str]] | None = None,
        keys: Mapping[str, bytes | str] | None = None,
        resolver: KeyResolver | None = None,
        audit: AuditTarget = None,
    ) -> None:
        loaded = [
            load_policy(p)
            for p in (policies.values() if isinstance(policies, Mapping) else policies)
        ]
        self.policies = {p.label: p for p in loaded}
        self._tokens = (
            None if tokens is None else {_digest(t): frozenset(ls) for t, ls in tokens.items()}
        )
        self._resolver = resolver if resolver is not None else KeyResolver(keys)
        self.audit = audit

    def __repr__(self) -> str:
        return f"StaticAccess(labels={sorted(self.policies)})"

    def grant(self, token: str | None, label: str) -> Grant:
        if self._tokens is not None:
            labels = None
            if token is not None:
                presented = _digest(token)
                for known, allowed in self._tokens.items():
                    if hmac.compare_digest(known, presented):
                        labels = allowed
            if labels is None:
                raise flight.FlightUnauthenticatedError("cape: missing or unknown bearer token")
            if label not in labels:
                raise flight.FlightUnauthorizedError(
                    f"cape: this token may not read label {label!r}"
                )
        policy = self.policies.get(label)
        if policy is None:
            raise flight.FlightServerError(f"cape: no policy for label {label!r}")
        return Grant(policy, self._resolver, self.audit)

    def close(self) -> None:
        return None


def flight_error(exc: BaseException, label: str) -> flight.FlightError:
    """The Flight error a caller gets for a refused policy, token or plan (no key material).

    401 from the coordinator: unauthenticated; 403: unauthorized; an unknown
    label or a policy whose signature does not verify: a server error saying
    the policy was refused; an unreachable coordinator: unavailable.
    """
    if isinstance(exc, flight.FlightError):
        return exc
    try:
        from coordinator_client.errors import AuthError, NotFound, SignatureError, Unavailable
    except ImportError:  # the client is an optional part of the install
        return flight.FlightServerError(f"cape: refused: {exc}")
    if isinstance(exc, AuthError):
        if exc.status == 403:
            return flight.FlightUnauthorizedError(
                f"cape: the coordinator refused label {label!r} to this token: {exc}"
            )
        return flight.FlightUnauthenticatedError(f"cape: the coordinator refused the token: {exc}")
    if isinstance(exc, NotFound):
        return flight.FlightServerError(
            f"cape: refused: no active policy or keys for label {label!r} on the coordinator"
        )
    if isinstance(exc, SignatureError):
        return flight.FlightServerError(
            f"cape: refused: the policy for label {label!r} failed verification: {exc}"
        )
    if isinstance(exc, Unavailable):
        return flight.FlightUnavailableError(f"cape: coordinator unavailable: {exc}")
    return flight.FlightServerError(f"cape: refused (label {label!r}): {exc}")


class CoordinatorAccess:
    """Each stream's token goes to the coordinator: policy, keys and audit through it.

    One ``coordinator_client.Client`` per distinct token (its own spool and
    policy cache directory under ``state_dir``, named by the token's SHA-256),
    so a caller's audit records are delivered with the caller's own token.
    ``public_key`` pins the coordinator's policy-signing key; without it the
    client refuses to run policies (see ``coordinator_client``).
    """

    def __init__(
        self,
        url: str,
        *,
        public_key: Any = None,
        state_dir: str | Path,
        client_factory: Any = None,
    ) -> None:
        self.url = url
        self.public_key = public_key
        self.state_dir = Path(state_dir)
        self._factory = client_factory
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CoordinatorAccess({self.url!r})"

    def _client(self, token: str) -> Any:
        digest = _digest(token)
        with self._lock:
            client = self._clients.get(digest)
            if client is None:
                if self._factory is not None:
                    client = self._factory(token)
                else:
                    from coordinator_client import Client

                    client = Client(
                        self.url,
                        token,
                        public_key=self.public_key,
                        spool_dir=self.state_dir / digest[:24],
                    )
                self._clients[digest] = client
            return client

    def grant(self, token: str | None, label: str) -> Grant:
        if not token:
            raise flight.FlightUnauthenticatedError("cape: missing bearer token")
        client = self._client(token)
        try:
            policy = client.get_policy(label)
            provider = client.key_provider(label)
        except CapeError as exc:
            raise flight_error(exc, label) from None
        where = f"coordinator {client.url} label {policy.label} version {policy.version}"
        return Grant(
            policy, KeyResolver(None, providers=[provider]), client.default_audit_sink(), where
        )

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()
