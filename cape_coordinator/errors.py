"""The one error type the coordinator's service layer raises, mapped to an HTTP answer.

Each carries an HTTP status, a stable machine-readable ``code`` and a one-line
message that names the problem without echoing request data or key material.
"""

from __future__ import annotations

from typing import Any

from cape_pipelines.errors import CapeError


class ApiError(CapeError):
    """A refused request: ``status`` (4xx), ``code`` (stable) and a one-line ``message``."""

    def __init__(self, status: int, code: str, message: str, **details: Any):
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        """The JSON error body: ``{"error": {"code", "message", ...details}}``."""
        return {"error": {"code": self.code, "message": self.message, **self.details}}


def not_found(what: str) -> ApiError:
    """404 naming what is missing (a label, a version, a token id: never data)."""
    return ApiError(404, "not_found", f"{what} not found")
