"""The HTTP transport to one coordinator as one principal: URL, token, timeout, one session.

The client and the audit spool both send requests through a :class:`Transport`;
neither imports the other (the spool only needs ``post_audit``). A transport
pickles to exactly its URL, token and timeout, never a session, a pinned key,
a cache or any key material, so a spool sink shipped to a Beam worker carries
only what it needs to post records. Refusals become the matching
:class:`~coordinator_client.errors.CoordinatorError` with the status and the
server's error code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import requests

from cape_pipelines.policy import canonical_json

from .errors import AuthError, CoordinatorError, NotFound, Unavailable

Timeout = float | tuple[float, float]


class Transport:
    """``requests`` to one coordinator URL with one bearer token and timeouts."""

    def __init__(
        self,
        url: str,
        token: str | None,
        timeout: Timeout = (3.05, 30.0),
        *,
        session: requests.Session | None = None,
    ):
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise CoordinatorError(f"coordinator URL must start with http:// or https://: {url}")
        self.token = token
        self.timeout = timeout
        self._session = session

    def __repr__(self) -> str:
        return f"Transport({self.url!r}, token=<hidden>)"

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "token": self.token, "timeout": self.timeout}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.url = state["url"]
        self.token = state["token"]
        self.timeout = state["timeout"]
        self._session = None

    @property
    def session(self) -> requests.Session:
        """The HTTP session, made on first use (a copy from a pickle makes its own)."""
        if self._session is None:
            self._session = requests.Session()
        return self._session

    def close(self) -> None:
        """Close the HTTP session (a later request opens a new one)."""
        if self._session is not None:
            self._session.close()
            self._session = None

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        ok: Sequence[int] = (200, 201),
    ) -> requests.Response:
        """One request; a refusal raises the matching :class:`CoordinatorError`."""
        hdrs = dict(headers or {})
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        try:
            resp = self.session.request(
                method,
                self.url + path,
                json=json_body,
                data=data,
                params={k: v for k, v in (params or {}).items() if v is not None},
                headers=hdrs,
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            raise Unavailable(
                f"cannot reach the coordinator at {self.url} ({type(exc).__name__})"
            ) from None
        if resp.status_code in ok:
            return resp
        raise error_from(resp)

    def post_audit(self, records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
        """``POST /v1/audit`` of one batch; the coordinator stores all of it or none."""
        data = canonical_json({"records": [dict(r) for r in records]})
        result: dict[str, int] = self.request("POST", "/v1/audit", data=data).json()
        return result


def error_from(resp: requests.Response) -> CoordinatorError:
    """The :class:`CoordinatorError` a refused response means (status, code, one-line message)."""
    status = resp.status_code
    code, message, problems = None, resp.reason or "error", None
    try:
        err = resp.json().get("error", {})
        code, message = err.get("code"), err.get("message", message)
        problems = err.get("problems")
    except (ValueError, AttributeError):
        pass
    if problems:
        message += ": " + "; ".join(f"{p.get('loc')}: {p.get('msg')}" for p in problems[:20])
    text = f"coordinator refused ({status} {code or 'error'}): {message}"
    if status >= 500:
        return Unavailable(f"coordinator failed ({status}): {message}", status=status, code=code)
    if status in (401, 403):
        return AuthError(text, status=status, code=code)
    if status == 404:
        return NotFound(text, status=status, code=code)
    return CoordinatorError(text, status=status, code=code)
