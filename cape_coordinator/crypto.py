"""Key material of the coordinator: master key, secret sealing, signing key, API tokens.

The master key (32 random bytes) lives outside the database, in a key file
beside it with mode 0600 or in ``CAPE_COORDINATOR_MASTER_KEY``. It seals, with
AES-256-GCM, every named secret and the Ed25519 signing key stored in the
database; each ciphertext is bound to what it is (its name and version) by the
associated data, so sealed rows cannot be swapped. API tokens are random and
only their SHA-256 is stored; a token is ``<id>.<secret>`` so the lookup is by
id and the secret is compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cape_pipelines.errors import CapeError

MASTER_KEY_ENV = "CAPE_COORDINATOR_MASTER_KEY"
_NONCE_BYTES = 12


class CoordinatorSetupError(CapeError):
    """The coordinator's database or key files are missing, unreadable or do not match."""


def b64e(data: bytes) -> str:
    """URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: str) -> bytes:
    """Inverse of :func:`b64e`; also accepts standard base64 with padding."""
    text = text.strip()
    try:
        return base64.urlsafe_b64decode(
            text.replace("+", "-").replace("/", "_") + "=" * (-len(text) % 4)
        )
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None


class MasterKey:
    """The AES-256-GCM key that seals secrets at rest; its repr shows nothing."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes):
        if len(key) != 32:
            raise CoordinatorSetupError("the master key must be 32 bytes")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "<MasterKey hidden>"

    def seal(self, plaintext: bytes, context: str) -> bytes:
        """nonce || ciphertext||tag, bound to ``context`` (what the secret is)."""
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, context.encode("utf-8"))

    def open(self, sealed: bytes, context: str) -> bytes:
        """Inverse of :meth:`seal`; a wrong key, context or edited bytes raise."""
        try:
            return self._aead.decrypt(
                sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], context.encode("utf-8")
            )
        except InvalidTag:
            raise CoordinatorSetupError(
                f"cannot decrypt {context.split(':', 1)[0]}: wrong master key or edited row"
            ) from None


def create_master_key_file(path: Path) -> bytes:
    """Write a new random master key to ``path`` (mode 0600, never overwritten)."""
    key = os.urandom(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise CoordinatorSetupError(f"key file {path} already exists; not overwriting it") from None
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(b64e(key) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return key


def load_master_key(path: Path | None) -> MasterKey:
    """The master key from ``CAPE_COORDINATOR_MASTER_KEY`` if set, else from the key file."""
    env = os.environ.get(MASTER_KEY_ENV)
    if env:
        try:
            return MasterKey(b64d(env))
        except ValueError:
            raise CoordinatorSetupError(f"{MASTER_KEY_ENV} is not base64 of 32 bytes") from None
    if path is None:
        raise CoordinatorSetupError(f"no key file given and {MASTER_KEY_ENV} is not set")
    try:
        mode = path.stat().st_mode & 0o777
        text = path.read_text(encoding="ascii")
    except OSError as exc:
        raise CoordinatorSetupError(f"cannot read key file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise CoordinatorSetupError(f"key file {path} is readable by others; chmod 600 it")
    try:
        return MasterKey(b64d(text))
    except ValueError:
        raise CoordinatorSetupError(f"key file {path} does not hold base64 of 32 bytes") from None


def new_signing_key() -> tuple[Ed25519PrivateKey, bytes]:
    """A fresh Ed25519 key and its raw 32-byte private bytes (to be sealed)."""
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return key, raw


def signing_key_from_raw(raw: bytes) -> Ed25519PrivateKey:
    """Rebuild the signing key from its unsealed raw bytes."""
    return Ed25519PrivateKey.from_private_bytes(raw)


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte public key, URL-safe base64: what clients pin."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return b64e(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def verify_signature(public: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is ``public``'s signature of ``data``."""
    try:
        public.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def new_token() -> tuple[str, str, str]:
    """(token id, full token to hand out once, hash of its secret to store)."""
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return token_id, f"cape_{token_id}.{secret}", hash_secret(secret)


def hash_secret(secret: str) -> str:
    """SHA-256 hex of a token's secret part (tokens have 256 bits of entropy: no KDF needed)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def split_token(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token, else None."""
    if not token.startswith("cape_") or "." not in token:
        return None
    token_id, _, secret = token[len("cape_") :].partition(".")
    if not token_id or not secret or len(token) > 200:
        return None
    return token_id, secret


def secret_matches(secret: str, stored_hash: str) -> bool:
    """Constant-time comparison of a presented secret with the stored hash."""
    return hmac.compare_digest(hash_secret(secret), stored_hash)
