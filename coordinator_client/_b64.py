"""URL-safe base64 without padding, as the coordinator writes keys and signatures."""

from __future__ import annotations

import base64
import binascii


def b64d(text: str) -> bytes:
    """Decode URL-safe or standard base64, padded or not; ValueError if it is neither."""
    text = text.strip()
    try:
        return base64.urlsafe_b64decode(
            text.replace("+", "-").replace("/", "_") + "=" * (-len(text) % 4)
        )
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
