"""The client's exception types: one base, and the few cases callers handle differently."""

from __future__ import annotations

from cape_pipelines.errors import CapeError


class CoordinatorError(CapeError):
    """The coordinator refused a request or could not be used; ``status`` and ``code`` say why.

    The message is one line, fit to print as the reason a command failed.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        self.status = status
        self.code = code
        super().__init__(" ".join(message.split()))


class Unavailable(CoordinatorError):
    """The coordinator could not be reached, or failed (5xx): worth retrying later."""


class AuthError(CoordinatorError):
    """The token is missing, invalid, expired or revoked (401), or its role may not (403)."""


class NotFound(CoordinatorError):
    """No such label, version, key or token (404)."""


class PolicyRefused(CoordinatorError):
    """A policy failed a check and is not used: a bad signature, an envelope for another
    label or version, a rollback to an older activation, or a cached copy past its
    maximum age."""


class SignatureError(PolicyRefused):
    """A policy's Ed25519 signature does not verify against the pinned key, or the bytes
    are not the ones signed: it is not used."""


class CoordinatorWarning(UserWarning):
    """A policy was served from the local cache because the coordinator was unreachable."""
