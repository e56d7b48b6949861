"""Logging for ``cape coordinator serve``: uvicorn's own logs, with no request data.

uvicorn logs the traceback of an exception that escapes the app ("Exception in
ASGI application"), and an exception's message can quote what a request sent
(a driver error naming a value, a parser error showing the input). The filter
here keeps the line and the exception's type, and drops its message and
traceback; the access log (off unless ``--access-log``) shows method, path and
status, never a body.
"""

from __future__ import annotations

import copy
import logging
from typing import Any


class NoData(logging.Filter):
    """Replace an attached exception by its type name; never print its message or stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is not None:
            kind = record.exc_info[0].__name__
            record.msg = f"{record.getMessage()} ({kind}; details withheld)"
            record.args = None
            record.exc_info = None
            record.exc_text = None
            record.stack_info = None
        return True


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's default logging configuration with :class:`NoData` on every handler."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["cape_no_data"] = {"()": f"{__name__}.NoData"}
    for handler in config.get("handlers", {}).values():
        handler.setdefault("filters", []).append("cape_no_data")
    return config
