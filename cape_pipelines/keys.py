"""Key references, providers and the key store a plan carries to its workers.

A transformation names its key (``{secret: NAME}``); the provider chain resolves
the name at plan time: explicit ``keys=`` mapping, then ``CAPE_KEY_<NAME>`` in
the environment, then a mounted secret directory (``CAPE_KEYS_DIR``), then
(for pipeline tokens) the coordinator. The resolver remembers where each key
came from, so that a plan shipped to workers can carry a *reference* to the
same place (:class:`EnvKeys`, :class:`SecretFileKeys`, :class:`CoordinatorKeys`)
instead of the bytes; keys that exist only in this process travel to local
workers through a private per-run secret directory (:class:`RunSecrets`) and
are refused for remote ones (see docs/keys.md). Key bytes are never shown in a
repr, a log line, an error message or an audit record.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import secrets
import shutil
import tempfile
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, SecretBytes

from .errors import KeyFormatError, KeyMissingError

log = logging.getLogger(__name__)

_ENV_PREFIX = "CAPE_KEY_"
KEYS_DIR_ENV = "CAPE_KEYS_DIR"
"""A mounted secret directory (one file per key, ``DIR/NAME``) the driver and workers read."""
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

        # The model holds exactly one of ``secret`` and ``inline``.
        assert self.inline is not None
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
    """The provider chain: explicit mapping, environment, secret directory, extra providers.

    :attr:`origins` records, per key name resolved, where it came from
    (``explicit``, ``env``, ``dir:<path>`` or ``provider:<label>``), never the
    bytes. ``worker_sources`` maps a provider's label to a function making the
    :class:`WorkerKeyProvider` through which workers read that provider's keys
    themselves (a coordinator's worker token).
    """

    def __init__(
        self,
        keys: Mapping[str, bytes | str] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        providers: list[tuple[str, KeyProvider]] | None = None,
        worker_sources: Mapping[str, Callable[[], WorkerKeyProvider]] | None = None,
    ):
        self._explicit = dict(keys or {})
        self._environ = os.environ if environ is None else environ
        self._providers = list(providers or [])
        self._run_key: bytes | None = None
        self.origins: dict[str, str] = {}
        self.worker_sources: dict[str, Callable[[], WorkerKeyProvider]] = dict(worker_sources or {})

    def __repr__(self) -> str:
        return f"KeyResolver(explicit={sorted(self._explicit)}, providers={len(self._providers)})"

    def resolve(self, ref: KeyRef) -> bytes:
        """The key bytes for ``ref``; :class:`KeyMissingError` names the key if none has it."""
        if ref.inline is not None:
            return _long_enough(ref.inline.get_secret_value(), "the inline key")
        name = ref.secret
        assert name is not None
        if name in self._explicit:
            self.origins[name] = "explicit"
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
            self.origins[name] = "env"
            return _long_enough(key, f"key {name!r} (from {var})")
        tried = ["keys=", var]
        directory = self._environ.get(KEYS_DIR_ENV)
        if directory:
            tried.append(f"{KEYS_DIR_ENV}={directory}")
            found = SecretFileKeys(directory).fetch(name)
            if found is not None:
                self.origins[name] = f"dir:{directory}"
                return _long_enough(found, f"key {name!r} (from {KEYS_DIR_ENV})")
        for label, provider in self._providers:
            tried.append(label)
            found = provider(name)
            if found is not None:
                self.origins[name] = f"provider:{label}"
                return _long_enough(found, f"key {name!r} (from {label})")
        raise KeyMissingError(name, tried)

    def run_key(self) -> bytes:
        """A random key made once per run, for perturbations with neither seed nor key."""
        if self._run_key is None:
            self._run_key = secrets.token_bytes(32)
        return self._run_key


class KeyStore:
    """Resolved keys by id, carried by a plan to the workers; its repr shows no bytes.

    A store made by :meth:`by_reference` or :meth:`referencing` pickles, for
    the keys it references, only a key *name* and the :class:`WorkerKeyProvider`
    that finds it; the copy a worker unpickles resolves each one once per
    process through that provider (cached in memory) the first time a batch
    needs it. The driver's copy keeps the bytes it resolved. A store with no
    references pickles its bytes: only :func:`ship_keys` with
    ``worker_keys="inline"`` (the explicit opt-in) or a plan that never leaves
    the process makes one.
    """

    __slots__ = ("_keys", "_refs")

    def __init__(self, keys: Mapping[str, bytes] | None = None):
        self._keys: dict[str, bytes] = dict(keys or {})
        self._refs: dict[str, tuple[WorkerKeyProvider, str]] = {}

    def __getitem__(self, key_id: str) -> bytes:
        found = self._keys.get(key_id)
        if found is not None:
            return found
        ref = self._refs.get(key_id)
        if ref is not None:
            value = worker_key(*ref)
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
        return self.referencing({k: (provider, name) for k, name in names.items()})

    def referencing(self, refs: Mapping[str, tuple[WorkerKeyProvider, str]]) -> KeyStore:
        """A copy that ships, per key id in ``refs``, a (provider, name) instead of the bytes."""
        out = KeyStore(self._keys)
        out._refs = dict(refs)
        return out

    @property
    def references(self) -> dict[str, str]:
        """Key id -> key name for the keys resolved on workers (empty: all keys ship)."""
        return {k: name for k, (_, name) in self._refs.items()}

    @property
    def providers(self) -> dict[str, WorkerKeyProvider]:
        """Key id -> the provider workers resolve it through."""
        return {k: provider for k, (provider, _) in self._refs.items()}

    def __getstate__(self) -> Any:
        if not self._refs:
            return self._keys
        shipped = {k: v for k, v in self._keys.items() if k not in self._refs}
        return {"_by_reference": True, "keys": shipped, "refs": self._refs}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict) and state.get("_by_reference") is True:
            self._keys = dict(state["keys"])
            self._refs = dict(state["refs"])
        else:
            self._keys = state
            self._refs = {}


# -- worker-side key providers ------------------------------------------------------------------


class WorkerKeyProvider:
    """Where a worker process finds a key by name; pickled into job graphs, so holds no keys.

    Subclasses implement :meth:`fetch` and :meth:`identity` (what the
    per-process cache is keyed by). ``remote_ok`` says whether workers on
    other machines can use it (a per-run directory on this host cannot).
    """

    remote_ok = True

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

    def describe(self) -> str:
        return "env (CAPE_KEY_<NAME> in the worker's environment)"

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

    def describe(self) -> str:
        return f"secret directory {self.directory}"

    def fetch(self, name: str) -> bytes | None:
        if "/" in name or "\\" in name or name.startswith(".") or "\x00" in name:
            raise KeyFormatError(f"key name {name!r} cannot name a file in a secret directory")
        path = os.path.join(self.directory, name)
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            # Permission denied, a directory: say which file, never its content.
            raise KeyFormatError(
                f"secret file {path} cannot be read ({exc.strerror or type(exc).__name__})"
            ) from None
        return decode_key_text(text, f"secret file {path}")


# Kept alive until closed or the interpreter exits (weakref.finalize then removes them).
_LIVE_RUN_SECRETS: set[RunSecrets] = set()
# tmpfs: the per-run key files never reach a disk. mkdtemp makes a fresh 0700 directory there.
_MEMORY_TMP = "/dev/shm"  # noqa: S108


class RunSecrets(SecretFileKeys):
    """A private per-run secret directory on this host, for keys that exist only in this process.

    Keys given as bytes (``keys=``, ``--key``, ``--keys-file``), inline in a
    policy, or a run's random key have no place a worker could read them from;
    for workers on this host (local engines) each is written to a file readable
    only by this user (directory 0700, files 0600; under ``/dev/shm`` where
    there is one, so the bytes stay in memory) and only the path ships. The
    directory is removed at the end of a run whose end is known (``cape
    apply``: :meth:`close`), else at interpreter exit: a lazy Spark or Dask
    frame can be run again, or chained and run later, as long as the driver
    lives, and Spark holds its pickled copy where Python cannot see it go.
    """

    remote_ok = False

    def __init__(self) -> None:
        base = (
            _MEMORY_TMP if os.path.isdir(_MEMORY_TMP) and os.access(_MEMORY_TMP, os.W_OK) else None
        )
        super().__init__(tempfile.mkdtemp(prefix="cape-run-keys-", dir=base))
        self._count = 0
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.directory, True)
        _LIVE_RUN_SECRETS.add(self)

    def __repr__(self) -> str:
        return f"RunSecrets({self.directory!r})"

    def describe(self) -> str:
        return f"the run's private key directory {self.directory} (on the driver's host)"

    def __reduce__(self) -> Any:
        # Workers get a plain reader of the directory: no finalizer that would remove it.
        return (SecretFileKeys, (self.directory,))

    def add(self, key: bytes) -> str:
        """Write ``key`` to a new 0600 file; returns its name (not derived from the key)."""
        self._count += 1
        name = f"k{self._count}"
        fd = os.open(
            os.path.join(self.directory, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
        )
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(key.hex())
        return name

    def close(self) -> None:
        """Remove the directory and its keys now."""
        _LIVE_RUN_SECRETS.discard(self)
        self._finalizer()


class CoordinatorKeys(WorkerKeyProvider):
    """The label's keys from the coordinator, with a worker token (read-only, that label).

    The token travels in the job graph (it is a credential, not key material:
    :meth:`coordinator_client.Client.worker_keys` mints one scoped to the label,
    able to read its keys and nothing else, that expires); the keys do not.
    ``NAME@3`` resolves to version 3 of ``NAME``, as on the driver.
    """

    def __init__(self, url: str, token: str, label: str):
        self.url = url
        self._token = token
        self.label = label

    def __repr__(self) -> str:
        return f"CoordinatorKeys({self.url!r}, label={self.label!r}, token=<hidden>)"

    def identity(self) -> str:
        return f"coordinator:{self.url}:{self.label}"

    def describe(self) -> str:
        return f"coordinator {self.url} (label {self.label}, worker token)"

    def fetch(self, name: str) -> bytes | None:
        from coordinator_client import Client

        with Client(self.url, self._token) as client:
            _, provide = client.key_provider(self.label)
            return provide(name)


_WORKER_KEYS: dict[tuple[str, str], bytes] = {}
# Long-lived workers (Spark's reused Python workers) see many runs' per-run directories.
_MAX_WORKER_KEYS = 4096


def worker_key(provider: WorkerKeyProvider, name: str) -> bytes:
    """``name``'s key through ``provider``, fetched once per process and kept in memory.

    Errors name the key and the provider, never the key material.
    """
    cache_key = (provider.identity(), name)
    found = _WORKER_KEYS.get(cache_key)
    if found is None:
        try:
            found = provider.fetch(name)
        except KeyMissingError:
            raise
        except Exception as exc:
            raise KeyMissingError(
                name, [f"worker key provider {provider.describe()}: {type(exc).__name__}: {exc}"]
            ) from None
        if not found:
            raise KeyMissingError(name, [f"worker key provider {provider.describe()}"])
        if len(_WORKER_KEYS) >= _MAX_WORKER_KEYS:
            _WORKER_KEYS.clear()
        _WORKER_KEYS[cache_key] = found
    return found


# -- what ships to workers ----------------------------------------------------------------------


@dataclass(frozen=True)
class Workers:
    """Where an engine runs a plan: ``local`` when every worker is a process on this host.

    ``where`` names the engine's place in messages (``spark master local[2]``).
    """

    engine: str
    where: str
    local: bool


INLINE = "inline"
"""``worker_keys="inline"``: the opt-in to ship key bytes in the plan (quick local runs)."""


class KeyShippingError(KeyFormatError):
    """A key exists only on the driver and the engine's workers are elsewhere."""


def shipping_fix(kind: str) -> str:
    """How to give workers a key that exists only on the driver (``kind``: where it came from)."""
    fixes = {
        "explicit": "name it {secret: NAME} and give workers CAPE_KEY_<NAME>, a mounted "
        f"secret directory ({KEYS_DIR_ENV}) or a coordinator",
        "inline": "replace the policy's inline key with {secret: NAME} and give workers "
        f"CAPE_KEY_<NAME>, a mounted secret directory ({KEYS_DIR_ENV}) or a coordinator",
        "run": "give the perturbation a seed, or a key {secret: NAME} the workers can read",
    }
    return fixes.get(kind, fixes["explicit"])


def reference_for(
    origin: str, resolver: KeyResolver, minted: dict[str, WorkerKeyProvider]
) -> WorkerKeyProvider | None:
    """The provider workers can read a key of ``origin`` from, or None (only here)."""
    if origin == "env":
        return EnvKeys()
    if origin.startswith("dir:"):
        return SecretFileKeys(origin[len("dir:") :])
    if origin.startswith("provider:"):
        label = origin[len("provider:") :]
        make = resolver.worker_sources.get(label)
        if make is None:
            return None
        if label not in minted:
            minted[label] = make()
        return minted[label]
    return None


class ShippedKeys:
    """What a SQL function carries instead of a :class:`KeyResolver`: references by key name.

    A SQL function names its key in the query, so which keys it will need is
    known only on the worker. The driver therefore ships a reference for every
    key it was given (``keys=``, ``CAPE_KEY_*``): for local workers the run's
    private directory, for remote ones nothing for ``keys=`` (refused) and
    ``CAPE_KEY_<NAME>`` in the worker's environment; then, for any name, the
    ``fallbacks`` (a mounted secret directory). Never the bytes.
    """

    def __init__(
        self,
        named: Mapping[str, tuple[WorkerKeyProvider, str]],
        by_env_var: Mapping[str, tuple[WorkerKeyProvider, str]],
        fallbacks: list[WorkerKeyProvider],
    ):
        self._named = dict(named)
        self._by_env_var = dict(by_env_var)
        self._fallbacks = list(fallbacks)

    def __repr__(self) -> str:
        return f"ShippedKeys(names={sorted(self._named)}, providers={len(self._fallbacks)})"

    def resolve(self, ref: KeyRef) -> bytes:
        """``ref``'s key through its reference, once per process; errors name key and places."""
        if ref.inline is not None:
            return _long_enough(ref.inline.get_secret_value(), "the inline key")
        name = ref.secret
        assert name is not None
        found = self._named.get(name) or self._by_env_var.get(env_var_name(name))
        if found is not None:
            return _long_enough(worker_key(*found), f"key {name!r}")
        tried = [found_in.describe() for found_in in self._fallbacks]
        for provider in self._fallbacks:
            try:
                return _long_enough(worker_key(provider, name), f"key {name!r}")
            except KeyMissingError:
                continue
        raise KeyMissingError(name, ["keys=", env_var_name(name), *tried])


def shipped_keys(
    keys: Mapping[str, bytes | str] | None,
    environ: Mapping[str, str],
    workers: Workers,
) -> ShippedKeys:
    """The :class:`ShippedKeys` for ``keys`` and the ``CAPE_KEY_*`` variables in ``environ``.

    Bytes go to a :class:`RunSecrets` directory for local workers; for remote
    ones ``keys=`` raises :class:`KeyShippingError` (name it and give the
    workers ``CAPE_KEY_<NAME>``, a mounted directory or a coordinator) and the
    environment's keys are read from each worker's own environment.
    """
    resolver = KeyResolver(keys, environ=environ)
    named: dict[str, tuple[WorkerKeyProvider, str]] = {}
    by_env_var: dict[str, tuple[WorkerKeyProvider, str]] = {}
    fallbacks: list[WorkerKeyProvider] = []
    directory = environ.get(KEYS_DIR_ENV)
    if keys and not workers.local:
        raise KeyShippingError(
            f"keys= given as bytes exist only in this process, and {workers.engine}'s workers "
            f"at {workers.where} are not on this host: {shipping_fix('explicit')}"
        )
    secrets: RunSecrets | None = None
    if workers.local:
        for name in keys or {}:
            secrets = secrets or RunSecrets()
            named[name] = (secrets, secrets.add(resolver.resolve(KeyRef(secret=name))))
        for var, text in environ.items():
            if not var.startswith(_ENV_PREFIX) or var == KEYS_DIR_ENV:
                continue
            try:
                key = decode_key_text(text, f"environment variable {var}")
            except KeyFormatError:
                continue  # not a key (or not one of ours): a worker asking for it gets "missing"
            secrets = secrets or RunSecrets()
            by_env_var[var] = (secrets, secrets.add(key))
    else:
        fallbacks.append(EnvKeys())
    if directory:
        fallbacks.append(SecretFileKeys(directory))
    return ShippedKeys(named, by_env_var, fallbacks)
