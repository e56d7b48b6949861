"""Coverage of a dataset's tagged columns by a policy: what a reviewer must see before approving.

A catalog tags columns (``pii.email``, ``financial.iban`` ...); a policy covers a
tagged column when one of its column rules matches it (by name, names, regex or
tag, exactly as :func:`cape_pipelines.plan.build_plan` would bind it) or when the
policy drops every column no rule matches (``unmatched_columns: drop``) or refuses
them (``error``). The report lists the tagged columns left uncovered and the
column rules that match no column of the dataset, so a policy written before a
column was tagged, or for another dataset, shows as such. It reads no data and
no key: it runs on a schema and the catalog's tags, in the CLI (``cape policy
plan --dataset``) and in the coordinator's review.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .policy.load import PolicySource, load_policy

__all__ = ["Coverage", "coverage_report"]


@dataclass(frozen=True)
class Coverage:
    """Which tagged columns a policy covers, which it leaves uncovered, and idle rules."""

    covered: dict[str, list[int]] = field(default_factory=dict)
    uncovered: dict[str, list[str]] = field(default_factory=dict)
    unmatched_rules: list[int] = field(default_factory=list)
    unmatched_columns: str = "keep"

    @property
    def complete(self) -> bool:
        """Whether every tagged column is covered."""
        return not self.uncovered

    def to_dict(self) -> dict[str, Any]:
        """JSON form: rule numbers count from 1, as the plan's messages do."""
        return {
            "complete": self.complete,
            "covered": {c: [i + 1 for i in rs] for c, rs in sorted(self.covered.items())},
            "uncovered": [{"column": c, "tags": t} for c, t in sorted(self.uncovered.items())],
            "unmatched_rules": [i + 1 for i in self.unmatched_rules],
            "unmatched_columns": self.unmatched_columns,
        }

    def lines(self) -> list[str]:
        """The report in words, one finding a line."""
        out = [
            f"uncovered: column {c!r} tagged {', '.join(t)} matches no rule"
            for c, t in sorted(self.uncovered.items())
        ]
        out += [
            f"unused: rule {i + 1} matches no column of the dataset" for i in self.unmatched_rules
        ]
        if not out:
            out.append(f"complete: all {len(self.covered)} tagged columns are covered")
        return out


def coverage_report(
    policy: PolicySource,
    columns: Sequence[str],
    column_tags: Mapping[str, Sequence[str]],
) -> Coverage:
    """Coverage of ``columns`` (tagged by ``column_tags``) by ``policy``.

    >>> doc = {"label": "d", "rules": [{"match": {"tag": "pii.email"}, "actions": ["drop"]}]}
    >>> r = coverage_report(doc, ["mail", "phone"], {"mail": ["pii.email"], "phone": ["pii.phone"]})
    >>> r.uncovered
    {'phone': ['pii.phone']}
    """
    pol = load_policy(policy)
    hits: dict[str, list[int]] = {c: [] for c in columns}
    unmatched_rules: list[int] = []
    for i, rule in enumerate(pol.rules):
        m = rule.match
        if m is None:  # a row rule (filter): it covers no column and is not idle
            continue
        if m.name is not None or m.names is not None:
            names = [m.name] if m.name is not None else list(m.names or [])
            targets = [c for c in columns if c in names]
        elif m.regex is not None:
            rx = re.compile(m.regex)
            targets = [c for c in columns if rx.fullmatch(c)]
        else:
            targets = [c for c in columns if m.tag in column_tags.get(c, ())]
        if not targets:
            unmatched_rules.append(i)
        for c in targets:
            hits[c].append(i)
    covered: dict[str, list[int]] = {}
    uncovered: dict[str, list[str]] = {}
    for c in columns:
        tags = sorted(set(column_tags.get(c, ())))
        if not tags:
            continue
        # A column no rule matches is dropped (or refused) by those settings: not exposed.
        if hits[c] or pol.unmatched_columns in ("drop", "error"):
            covered[c] = hits[c]
        else:
            uncovered[c] = tags
    return Coverage(covered, uncovered, unmatched_rules, pol.unmatched_columns)
