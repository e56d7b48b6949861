"""The web console, served by the coordinator itself under ``/ui``.

Server-rendered HTML (Jinja2 with autoescaping on every template) over the same
service methods and role matrix as the ``/v1`` API, so a page shows and offers
only what its user's role may do there. Templates, CSS, the one small script
(the policy editor's validate-as-you-type) and the charts (SVG drawn on the
server) are package data: nothing is fetched from elsewhere and nothing is
built at install time. Sessions, CSRF and the security headers are described in
:mod:`cape_coordinator.console.sessions` and :mod:`cape_coordinator.console.views`.
"""

from __future__ import annotations

from fastapi import FastAPI


def mount_console(app: FastAPI) -> None:
    """Serve the console under ``/ui`` of ``app`` (whose state holds the coordinator)."""
    from .views import install

    install(app)


__all__ = ["mount_console"]
