"""Exception types raised by Cape Pipelines.

Every error names the problem and where it is (a policy location, a column, a
file and row), and never carries key material or data values beyond what is
needed to find the problem.
"""

from __future__ import annotations

from collections.abc import Sequence


class CapeError(Exception):
    """Base class of every error raised by Cape Pipelines."""


class PolicyError(CapeError, ValueError):
    """A policy is malformed; ``problems`` lists each problem with its location.

    The message shows every problem, one per line, as ``location: message``.
    """

    def __init__(self, problems: Sequence[tuple[str, str]] | str, source: str | None = None):
        if isinstance(problems, str):
            problems = [("policy", problems)]
        self.problems: list[tuple[str, str]] = list(problems)
        self.source = source
        head = f"invalid policy{f' {source}' if source else ''}"
        lines = [f"  {loc}: {msg}" for loc, msg in self.problems]
        super().__init__(f"{head} ({len(self.problems)} problem(s)):\n" + "\n".join(lines))


class PlanError(CapeError, ValueError):
    """A policy cannot be applied to a dataset's schema (missing column, wrong type)."""


class KeyMissingError(CapeError, LookupError):
    """No key provider has the named key."""

    def __init__(self, name: str, tried: Sequence[str] = ()):
        self.key_name = name
        where = f" (tried: {', '.join(tried)})" if tried else ""
        super().__init__(f"key {name!r} not found{where}")


class KeyFormatError(CapeError, ValueError):
    """Key material is present but not in a form that can be decoded."""


class TransformError(CapeError, ValueError):
    """A transformation failed on the data (for example a token that does not authenticate)."""


class DataError(CapeError, ValueError):
    """Input data cannot be read (malformed CSV row, unreadable file)."""
