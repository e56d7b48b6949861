"""The thin client of the Cape coordinator: signed policies, keys, durable audit delivery.

>>> from coordinator_client import Client
>>> client = Client("http://127.0.0.1:8686", "cape_...", public_key="...")  # doctest: +SKIP
>>> policy, keys = client.policy_and_keys("customers")                     # doctest: +SKIP
"""

from .client import Client, PolicyFetch, load_public_key
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
from .transport import Transport

__all__ = [
    "AuthError",
    "Client",
    "CoordinatorError",
    "CoordinatorWarning",
    "KeyCache",
    "KeyCacheError",
    "NotFound",
    "PolicyFetch",
    "PolicyRefused",
    "SignatureError",
    "SpoolSink",
    "Transport",
    "Unavailable",
    "load_public_key",
]
