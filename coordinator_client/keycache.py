"""An opt-in encrypted cache of a label's coordinator keys, for runs during an outage.

Keys are memory-only by default: a pipeline restarted while the coordinator is
down has its cached (signed) policy but no keys. An operator who wants such
runs to proceed opts in with a directory and a 32-byte wrapping key of their
own (a file or ``CAPE_KEY_CACHE_KEY``; never stored by the cache). Each label's
keys are then kept in one file, sealed with AES-256-GCM from ``cryptography``:
a fresh 96-bit nonce per write, and the coordinator URL, the label, a hash of
the token and the creation and expiry times bound as associated data, so an
edited expiry, a file copied to another label, or another token's use fails to
decrypt. Entries expire after a TTL; files are 0600 in a 0700 directory; the
plaintext keys are never written anywhere. The client erases a label's entry
when the coordinator says its keys are no longer allowed (403/404), and every
entry when it says the token is invalid (401).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cape_pipelines.errors import CapeError

from ._b64 import b64d

FORMAT = "cape.key-cache.v1"
KEY_ENV = "CAPE_KEY_CACHE_KEY"
KEY_FILE_ENV = "CAPE_KEY_CACHE_KEY_FILE"
DIR_ENV = "CAPE_KEY_CACHE_DIR"
TTL_ENV = "CAPE_KEY_CACHE_TTL"
DEFAULT_TTL = 24 * 3600.0

Versions = dict[str, dict[int, bytes]]


class KeyCacheError(CapeError):
    """The key cache is misconfigured, or one of its files does not decrypt."""


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _wrapping_key(text: str | bytes, where: str) -> bytes:
    """32 bytes from hex, ``base64:...`` text, or (from a file) exactly 32 raw bytes."""
    if isinstance(text, bytes):
        if len(text) == 32:
            return text
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise KeyCacheError(f"{where}: not 32 raw bytes, hex or base64: text") from None
    text = text.strip()
    try:
        if text.startswith("base64:"):
            key = base64.b64decode(text[len("base64:") :], validate=True)
        else:
            key = bytes.fromhex(text)
    except (binascii.Error, ValueError):
        raise KeyCacheError(f"{where}: neither hex nor 'base64:'-prefixed base64") from None
    if len(key) != 32:
        raise KeyCacheError(f"{where}: the wrapping key must be 32 bytes, not {len(key)}")
    return key


class KeyCache:
    """Sealed per-label key files under ``directory``, readable for ``ttl`` seconds.

    >>> cache = KeyCache.from_settings("/var/cache/cape-keys")   # doctest: +SKIP
    >>> Client(url, token, public_key=PINNED, key_cache=cache)   # doctest: +SKIP
    """

    def __init__(
        self, directory: str | os.PathLike[str], wrapping_key: bytes, *, ttl: float = DEFAULT_TTL
    ):
        if len(wrapping_key) != 32:
            raise KeyCacheError("the key cache's wrapping key must be 32 bytes")
        if not ttl > 0:
            raise KeyCacheError("the key cache's TTL must be a positive number of seconds")
        self.directory = Path(directory)
        self.ttl = float(ttl)
        self._aead = AESGCM(wrapping_key)

    def __repr__(self) -> str:
        return f"KeyCache({str(self.directory)!r}, ttl={self.ttl:g}, wrapping_key=<hidden>)"

    def __getstate__(self) -> None:
        raise TypeError("a KeyCache holds a wrapping key and is never pickled")

    @classmethod
    def from_settings(
        cls,
        directory: str | os.PathLike[str] | None = None,
        *,
        key_file: str | os.PathLike[str] | None = None,
        ttl: float | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> KeyCache:
        """A cache from explicit settings or ``CAPE_KEY_CACHE_DIR``, ``CAPE_KEY_CACHE_KEY``
        (hex or ``base64:``), ``CAPE_KEY_CACHE_KEY_FILE`` and ``CAPE_KEY_CACHE_TTL``."""
        env = os.environ if environ is None else environ
        directory = directory or env.get(DIR_ENV)
        if not directory:
            raise KeyCacheError(f"the key cache needs a directory (or {DIR_ENV})")
        key_file = key_file or env.get(KEY_FILE_ENV)
        if key_file:
            try:
                key = _wrapping_key(Path(key_file).read_bytes(), f"key cache key file {key_file}")
            except OSError as exc:
                raise KeyCacheError(
                    f"cannot read the key cache key file {key_file}: {exc.strerror}"
                ) from None
        elif env.get(KEY_ENV):
            key = _wrapping_key(env[KEY_ENV], f"environment variable {KEY_ENV}")
        else:
            raise KeyCacheError(
                f"the key cache needs a 32-byte wrapping key: a file (--key-cache-key-file, "
                f"{KEY_FILE_ENV}) or {KEY_ENV} (hex or base64:)"
            )
        if ttl is None and env.get(TTL_ENV):
            try:
                ttl = float(env[TTL_ENV])
            except ValueError:
                raise KeyCacheError(f"{TTL_ENV} must be a number of seconds") from None
        return cls(directory, key, ttl=DEFAULT_TTL if ttl is None else ttl)

    def _path(self, scope: str, label: str) -> Path:
        digest = hashlib.sha256(f"{scope}\x00{label}".encode()).hexdigest()[:32]
        return self.directory / f"{digest}.keys"

    @staticmethod
    def _aad(scope: str, label: str, token: str | None, created: float, expires: float) -> bytes:
        return json.dumps(
            {
                "format": FORMAT,
                "scope": scope,
                "label": label,
                "token_sha256": hashlib.sha256((token or "").encode()).hexdigest(),
                "created_at": created,
                "expires_at": expires,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode("ascii")

    def store(self, scope: str, label: str, token: str | None, versions: Versions) -> None:
        """Seal ``versions`` (name -> version -> key bytes) for ``label``; replaces the entry."""
        created = time.time()
        expires = created + self.ttl
        plain = json.dumps(
            {name: {str(v): _b64e(k) for v, k in vs.items()} for name, vs in versions.items()},
            sort_keys=True,
        ).encode("ascii")
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, plain, self._aad(scope, label, token, created, expires))
        entry = {
            "format": FORMAT,
            "label": label,
            "created_at": created,
            "expires_at": expires,
            "nonce": _b64e(nonce),
            "ciphertext": _b64e(sealed),
        }
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        path = self._path(scope, label)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            json.dump(entry, fh, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def load(self, scope: str, label: str, token: str | None) -> tuple[Versions, float] | None:
        """The sealed keys of ``label`` and when they were cached, or None if there are none
        or they expired (an expired entry is erased). A file that does not decrypt raises."""
        path = self._path(scope, label)
        try:
            entry = json.loads(path.read_text(encoding="ascii"))
            created, expires = float(entry["created_at"]), float(entry["expires_at"])
            nonce, sealed = b64d(entry["nonce"]), b64d(entry["ciphertext"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            raise KeyCacheError(f"key cache file {path} is malformed; not used") from None
        if time.time() >= expires:
            path.unlink(missing_ok=True)
            return None
        try:
            plain = self._aead.decrypt(
                nonce, sealed, self._aad(scope, label, token, created, expires)
            )
        except InvalidTag:
            raise KeyCacheError(
                f"key cache file {path} does not decrypt (edited, another token, or another "
                "wrapping key); not used"
            ) from None
        data = json.loads(plain)
        versions = {name: {int(v): b64d(k) for v, k in vs.items()} for name, vs in data.items()}
        return versions, created

    def erase(self, scope: str, label: str | None = None) -> None:
        """Remove ``label``'s entry, or (``label=None``) every entry in the directory."""
        if label is not None:
            self._path(scope, label).unlink(missing_ok=True)
            return
        if self.directory.is_dir():
            for path in self.directory.glob("*.keys"):
                path.unlink(missing_ok=True)
