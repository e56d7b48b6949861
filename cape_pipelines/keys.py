"""Key references, providers and the key store a plan carries to its workers.

A transformation names its key (``{secret: NAME}``); the provider chain resolves
the name at plan time: explicit ``keys=`` mapping, then ``CAPE_KEY_<NAME>`` in
the environment, then (for pipeline tokens) the coordinator. Key bytes are
never shown in a repr, a log line, an error message or an audit record.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import secrets
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, SecretBytes

from .errors import KeyFormatError, KeyMissingError

log = logging.getLogger(__name__)

_ENV_PREFIX = "CAPE_KEY_"
# Shorter keys can be searched exhaustively (or guessed: cape-python examples
# used words like "secret_key"); 16 bytes is the 128-bit floor of NIST SP 800-131A.
MIN_KEY_BYTES = 16


def _long_enough(key: bytes, what: str) -> bytes:
    if len(key) < MIN_KEY_BYTES:
        raise KeyFormatError(
            f"{what} is {len(key)} byte(s); keys must be at least {MIN_KEY_BYTES} bytes "
            "(generate one with: python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return key


class KeyRef(BaseModel):
    """Where a transformation's key comes from: a named secret or (compat) inline bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    secret: str | None = None
    inline: SecretBytes | None = None

    def __repr__(self) -> str:
        if self.secret is not None:
            return f"KeyRef(secret={self.secret!r})"
        return "KeyRef(inline=<hidden>)"

    __str__ = __repr__

    @property
    def id(self) -> str:
        """A stable identifier of this reference that holds no key material."""
        if self.secret is not None:
            return f"secret:{self.secret}"
        import hashlib

        digest = hashlib.sha256(b"cape-inline-key-id\x00" + self.inline.get_secret_value())
        return "inline:" + digest.hexdigest()[:16]


def parse_key_ref(value: Any) -> KeyRef:
    """Normalise the key forms POLICY.md accepts into a :class:`KeyRef`.

    ``{secret: NAME}``; cape-python's plain string (its UTF-8 bytes) and
    ``{type: secret, value: <base64>}``. Raises ``ValueError`` with a message
    that never contains the key.
    """
    if isinstance(value, KeyRef):
        return value
    if isinstance(value, str):
        log.warning("policy holds inline key material; use {secret: NAME} instead")
        return KeyRef(inline=SecretBytes(_inline_long_enough(value.encode("utf-8"))))
    if isinstance(value, bytes):
        return KeyRef(inline=SecretBytes(_inline_long_enough(value)))
    if isinstance(value, Mapping):
        if set(value) == {"secret"} and isinstance(value["secret"], str) and value["secret"]:
            return KeyRef(secret=value["secret"])
        if value.get("type") == "secret" and "value" in value:
            if set(value) - {"type", "value", "name"}:
                raise ValueError("a {type: secret} key takes only 'value'")
            raw = value["value"]
            if not isinstance(raw, str):
                raise ValueError("a {type: secret} key's value must be a base64 string")
            try:
                material = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                try:
                    material = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
                except (binascii.Error, ValueError):
                    raise ValueError("a {type: secret} key's value is not valid base64") from None
            log.warning("policy holds inline key material; use {secret: NAME} instead")
            return KeyRef(inline=SecretBytes(_inline_long_enough(material)))
    raise ValueError("key must be {secret: NAME}, a string, or {type: secret, value: <base64>}")


def _inline_long_enough(key: bytes) -> bytes:
    try:
        return _long_enough(key, "the inline key")
    except KeyFormatError as exc:
        # A ValueError here becomes a PolicyError at the key's location, at validate time.
        raise ValueError(str(exc)) from None


def env_var_name(name: str) -> str:
    """The environment variable that holds key ``name`` (``CAPE_KEY_<NAME>``)."""
    return _ENV_PREFIX + re.sub(r"[-.]", "_", name).upper()


def decode_key_text(text: str, where: str) -> bytes:
    """Decode a key written as hex, or as base64 prefixed ``base64:``."""
    text = text.strip()
    try:
        if text.startswith("base64:"):
            key = base64.b64decode(text[len("base64:") :], validate=True)
        else:
            key = bytes.fromhex(text)
    except (binascii.Error, ValueError):
        raise KeyFormatError(f"{where} is neither hex nor 'base64:'-prefixed base64") from None
    if not key:
        raise KeyFormatError(f"{where} is empty")
    return key


KeyProvider = Callable[[str], bytes | None]


class KeyResolver:
    """The provider chain: explicit mapping, environment, then any extra providers."""

    def __init__(
        self,
        keys: Mapping[str, bytes | str] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        providers: list[tuple[str, KeyProvider]] | None = None,
    ):
        self._explicit = dict(keys or {})
        self._environ = os.environ if environ is None else environ
        self._providers = list(providers or [])
        self._run_key: bytes | None = None

    def __repr__(self) -> str:
        return f"KeyResolver(explicit={sorted(self._explicit)}, providers={len(self._providers)})"

    def resolve(self, ref: KeyRef) -> bytes:
        """The key bytes for ``ref``; :class:`KeyMissingError` names the key if none has it."""
        if ref.inline is not None:
            return _long_enough(ref.inline.get_secret_value(), "the inline key")
        name = ref.secret
        assert name is not None
        if name in self._explicit:
            value = self._explicit[name]
            if isinstance(value, str):
                return _long_enough(
                    decode_key_text(value, f"explicit key {name!r}"), f"key {name!r}"
                )
            if not isinstance(value, bytes | bytearray | memoryview):
                raise KeyFormatError(
                    f"explicit key {name!r} must be bytes or a hex/'base64:' string, "
                    f"not {type(value).__name__}"
                )
            if not value:
                raise KeyFormatError(f"explicit key {name!r} is empty")
            return _long_enough(bytes(value), f"key {name!r}")
        var = env_var_name(name)
        if var in self._environ:
            key = decode_key_text(self._environ[var], f"environment variable {var}")
            return _long_enough(key, f"key {name!r} (from {var})")
        tried = ["keys=", var]
        for label, provider in self._providers:
            tried.append(label)
            found = provider(name)
            if found is not None:
                return _long_enough(found, f"key {name!r} (from {label})")
        raise KeyMissingError(name, tried)

    def run_key(self) -> bytes:
        """A random key made once per run, for perturbations with neither seed nor key."""
        if self._run_key is None:
            self._run_key = secrets.token_bytes(32)
        return self._run_key


class KeyStore:
    """Resolved keys by id, carried by a plan to the workers; its repr shows no bytes.

    By default a pickled store carries the key bytes (a plan shipped to Spark
    executors, Dask workers or Beam's job graph holds them). A store made by
    :meth:`by_reference` pickles only key *names* and a
    :class:`WorkerKeyProvider`; the copy a worker unpickles resolves each name
    once per process through that provider (cached in memory) the first time a
    batch needs it. Keys with no name (inline in the policy, derived from a
    seed, or a run's random key) still travel as bytes.
    """

    __slots__ = ("_keys", "_provider", "_refs")

    def __init__(self, keys: Mapping[str, bytes] | None = None):
        self._keys: dict[str, bytes] = dict(keys or {})
        self._refs: dict[str, str] = {}
        self._provider: WorkerKeyProvider | None = None

    def __getitem__(self, key_id: str) -> bytes:
        found = self._keys.get(key_id)
        if found is not None:
            return found
        if self._provider is not None and key_id in self._refs:
            value = worker_key(self._provider, self._refs[key_id])
            self._keys[key_id] = value
            return value
        raise KeyError(key_id)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys or key_id in self._refs

    def __setitem__(self, key_id: str, value: bytes) -> None:
        self._keys[key_id] = value

    def __len__(self) -> int:
        return len(set(self._keys) | set(self._refs))

    def __repr__(self) -> str:
        return f"<KeyStore: {len(self)} key(s) hidden>"

    __str__ = __repr__

    def by_reference(self, names: Mapping[str, str], provider: WorkerKeyProvider) -> KeyStore:
        """A copy that ships ``names`` (key id -> key name) instead of those keys' bytes.

        The bytes stay in this process (the driver still uses them); ids not in
        ``names`` keep travelling as bytes.
        """
        out = KeyStore(self._keys)
        out._refs = dict(names)
        out._provider = provider
        return out

    @property
    def references(self) -> dict[str, str]:
        """Key id -> key name for the keys resolved on workers (empty: all keys ship)."""
        return dict(self._refs)

    def __getstate__(self) -> Any:
        if self._provider is None:
            return self._keys
        shipped = {k: v for k, v in self._keys.items() if k not in self._refs}
        return {
            "_by_reference": True,
            "keys": shipped,
            "refs": self._refs,
            "provider": self._provider,
        }

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict) and state.get("_by_reference") is True:
            self._keys = dict(state["keys"])
            self._refs = dict(state["refs"])
            self._provider = state["provider"]
        else:
            self._keys = state
            self._refs = {}
            self._provider = None


# -- worker-side key providers ------------------------------------------------------------------


class WorkerKeyProvider:
    """Where a worker process finds a key by name; pickled into job graphs, so holds no keys.

    Subclasses implement :meth:`fetch` and :meth:`identity` (what the
    per-process cache is keyed by).
    """

    def identity(self) -> str:
        raise NotImplementedError

    def fetch(self, name: str) -> bytes | None:
        raise NotImplementedError

    def describe(self) -> str:
        return self.identity()


class EnvKeys(WorkerKeyProvider):
    """``CAPE_KEY_<NAME>`` in each worker's environment (hex or ``base64:...``)."""

    def __repr__(self) -> str:
        return "EnvKeys()"

    def identity(self) -> str:
        return "env"

    def fetch(self, name: str) -> bytes | None:
        var = env_var_name(name)
        text = os.environ.get(var)
        return None if text is None else decode_key_text(text, f"environment variable {var}")


class SecretFileKeys(WorkerKeyProvider):
    """One file per key in a mounted secret directory (``DIR/NAME``, hex or ``base64:...``)."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = os.fspath(directory)

    def __repr__(self) -> str:
        return f"SecretFileKeys({self.directory!r})"

    def identity(self) -> str:
        return f"file:{self.directory}"

    def fetch(self, name: str) -> bytes | None:
        if "/" in name or name.startswith("."):
            raise KeyFormatError(f"key name {name!r} cannot name a file in a secret directory")
        path = os.path.join(self.directory, name)
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read().strip()
        except FileNotFoundError:
            return None
        return decode_key_text(text, f"secret file {path}")


class CoordinatorKeys(WorkerKeyProvider):
    """The label's keys from the coordinator, with a worker token (read-only, that label).

    The token travels in the job graph (it is a credential, not key material:
    scope it to the label and give it a short expiry); the keys do not.
    """

    def __init__(self, url: str, token: str, label: str):
        self.url = url
        self._token = token
        self.label = label

    def __repr__(self) -> str:
        return f"CoordinatorKeys({self.url!r}, label={self.label!r}, token=<hidden>)"

    def identity(self) -> str:
        return f"coordinator:{self.url}:{self.label}"

    def fetch(self, name: str) -> bytes | None:
        from coordinator_client import Client

        with Client(self.url, self._token) as client:
            keys = client.get_keys(self.label)
        return keys.get(name)


_WORKER_KEYS: dict[tuple[str, str], bytes] = {}


def worker_key(provider: WorkerKeyProvider, name: str) -> bytes:
    """``name``'s key through ``provider``, fetched once per process and kept in memory."""
    cache_key = (provider.identity(), name)
    found = _WORKER_KEYS.get(cache_key)
    if found is None:
        found = provider.fetch(name)
        if not found:
            raise KeyMissingError(name, [f"worker key provider {provider.describe()}"])
        _WORKER_KEYS[cache_key] = found
    return found
