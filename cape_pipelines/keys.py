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
        return KeyRef(inline=SecretBytes(value.encode("utf-8")))
    if isinstance(value, bytes):
        return KeyRef(inline=SecretBytes(value))
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
            return KeyRef(inline=SecretBytes(material))
    raise ValueError("key must be {secret: NAME}, a string, or {type: secret, value: <base64>}")


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
            return ref.inline.get_secret_value()
        name = ref.secret
        assert name is not None
        if name in self._explicit:
            value = self._explicit[name]
            if isinstance(value, str):
                return decode_key_text(value, f"explicit key {name!r}")
            if not isinstance(value, bytes | bytearray | memoryview):
                raise KeyFormatError(
                    f"explicit key {name!r} must be bytes or a hex/'base64:' string, "
                    f"not {type(value).__name__}"
                )
            if not value:
                raise KeyFormatError(f"explicit key {name!r} is empty")
            return bytes(value)
        var = env_var_name(name)
        if var in self._environ:
            return decode_key_text(self._environ[var], f"environment variable {var}")
        tried = ["keys=", var]
        for label, provider in self._providers:
            tried.append(label)
            found = provider(name)
            if found is not None:
                return found
        raise KeyMissingError(name, tried)

    def run_key(self) -> bytes:
        """A random key made once per run, for perturbations with neither seed nor key."""
        if self._run_key is None:
            self._run_key = secrets.token_bytes(32)
        return self._run_key


class KeyStore:
    """Resolved keys by id, carried by a plan to the workers; its repr shows no bytes."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[str, bytes] | None = None):
        self._keys: dict[str, bytes] = dict(keys or {})

    def __getitem__(self, key_id: str) -> bytes:
        return self._keys[key_id]

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __setitem__(self, key_id: str, value: bytes) -> None:
        self._keys[key_id] = value

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"<KeyStore: {len(self._keys)} key(s) hidden>"

    __str__ = __repr__

    def __getstate__(self) -> dict[str, bytes]:
        return self._keys

    def __setstate__(self, state: dict[str, bytes]) -> None:
        self._keys = state
