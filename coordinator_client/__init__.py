"""The thin client of the Cape coordinator: signed policies, keys, durable audit delivery.

>>> from coordinator_client import Client
>>> client = Client("http://127.0.0.1:8686", "cape_...", public_key="...")  # doctest: +SKIP
>>> policy, keys = client.policy_and_keys("customers")                     # doctest: +SKIP
"""

from .client import Client, load_public_key
from .errors import (
    AuthError,
    CoordinatorError,
    CoordinatorWarning,
    NotFound,
    SignatureError,
    Unavailable,
)
from .spool import SpoolSink

__all__ = [
    "AuthError",
    "Client",
    "CoordinatorError",
    "CoordinatorWarning",
    "NotFound",
    "SignatureError",
    "SpoolSink",
    "Unavailable",
    "load_public_key",
]
