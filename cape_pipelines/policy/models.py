"""Pydantic models of the policy format (POLICY.md), a superset of cape-python's.

The raw document is validated in two passes by :func:`cape_pipelines.load_policy`:
the structure here, then each transformation's parameters against its class in
the registry, so that one :class:`~cape_pipelines.PolicyError` lists every problem.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from ..transforms.base import Transformation

LABEL_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")

OnMissing = Literal["error", "skip"]
Unmatched = Literal["keep", "drop", "error"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Match(_Model):
    """Which columns a rule applies to: exactly one of name, names, regex, tag."""

    name: str | None = None
    names: list[str] | None = None
    regex: str | None = None
    tag: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Match:
        given = [k for k in ("name", "names", "regex", "tag") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("match takes exactly one of name, names, regex, tag")
        if self.names is not None and not self.names:
            raise ValueError("names must list at least one column")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex does not compile: {exc}") from None
        return self

    def describe(self) -> str:
        """A short human-readable form, for plans and messages."""
        for k in ("name", "names", "regex", "tag"):
            v = getattr(self, k)
            if v is not None:
                return f"{k}={v}"
        return ""


class TransformRef(BaseModel):
    """An action's ``transform``: a named transformation, or a ``type`` with its parameters."""

    model_config = ConfigDict(frozen=True, extra="allow")

    name: str | None = None
    type: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> TransformRef:
        if (self.name is None) == (self.type is None):
            raise ValueError("transform takes exactly one of name (a named transformation) or type")
        if self.name is not None and self.model_extra:
            raise ValueError(
                "a transform by name takes no parameters; "
                f"found {', '.join(sorted(self.model_extra))}"
            )
        return self

    @property
    def params(self) -> dict[str, Any]:
        """The transformation's parameters (everything but name and type)."""
        return dict(self.model_extra or {})


class Action(_Model):
    """One step of a rule: ``{transform: ...}`` or the shorthand ``drop``."""

    transform: TransformRef


class NamedTransformation(BaseModel):
    """A reusable transformation declared under ``transformations:``."""

    model_config = ConfigDict(frozen=True, extra="allow")

    name: str = Field(min_length=1)
    type: str = Field(min_length=1)

    @property
    def params(self) -> dict[str, Any]:
        """The transformation's parameters (everything but name and type)."""
        return dict(self.model_extra or {})


class Rule(_Model):
    """A ``match`` (absent for row-level rules) and the actions to run in order."""

    match: Match | None = None
    actions: list[Action] = Field(min_length=1)
    on_missing_column: OnMissing | None = None

    @field_validator("actions", mode="before")
    @classmethod
    def _drop_shorthand(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"transform": {"type": "column-redact"}} if a == "drop" else a for a in value]
        return value


class RiskSection(_Model):
    """``risk:``: measure re-identification risk of the output, optionally suppress small classes.

    Rows equal on every quasi-identifier form an equivalence class; a class
    of fewer than ``k`` rows is reported (``action: report``) or removed
    (``action: suppress``). ``sensitive`` adds the (distinct) l-diversity of
    that column; ``l`` is its target. Columns are named as they are in the
    output (after every rule), which is where the figure is measured.
    """

    quasi_identifiers: list[str] = Field(min_length=1)
    sensitive: str | None = None
    k: int = Field(ge=2)
    l: int | None = Field(default=None, ge=2)  # noqa: E741  (the name the literature uses)
    action: Literal["report", "suppress"] = "report"
    on_missing_column: OnMissing | None = None

    @model_validator(mode="after")
    def _columns(self) -> RiskSection:
        seen: set[str] = set()
        for i, c in enumerate(self.quasi_identifiers):
            if not c:
                raise ValueError(f"quasi_identifiers[{i}] is empty")
            if c in seen:
                raise ValueError(f"quasi_identifiers[{i}]: column {c!r} is listed twice")
            seen.add(c)
        if self.sensitive is not None and self.sensitive in seen:
            raise ValueError(f"sensitive column {self.sensitive!r} is also a quasi-identifier")
        if self.l is not None and self.sensitive is None:
            raise ValueError("l needs a sensitive column")
        return self


class PolicyDocument(_Model):
    """The structure of a policy file, before transformation parameters are checked."""

    label: str
    version: int = Field(default=1, ge=1)
    description: str | None = None
    id: str | None = None
    on_missing_column: OnMissing = "error"
    unmatched_columns: Unmatched = "keep"
    transformations: list[NamedTransformation] = Field(default_factory=list)
    rules: list[Rule] = Field(min_length=1)
    risk: RiskSection | None = None

    @field_validator("label")
    @classmethod
    def _label(cls, value: str) -> str:
        if not LABEL_RE.fullmatch(value):
            raise ValueError("label must match [a-z0-9][a-z0-9._-]{0,127}")
        return value


class ResolvedAction(BaseModel):
    """An action with its transformation built and validated, and where it came from."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    transform: Transformation
    location: str
    named: str | None = None


class ResolvedRule(BaseModel):
    """A rule whose actions are built transformations."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    match: Match | None
    actions: list[ResolvedAction]
    on_missing_column: OnMissing
    location: str


class Policy(BaseModel):
    """A loaded, fully validated policy: what plans are built from.

    Build one with :func:`cape_pipelines.load_policy`; ``sha256`` identifies the
    exact document (canonical JSON) in audit records.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    label: str
    version: int
    description: str | None
    on_missing_column: OnMissing
    unmatched_columns: Unmatched
    rules: list[ResolvedRule]
    risk: RiskSection | None = None
    _document: dict[str, Any] = PrivateAttr(default_factory=dict)
    _sha256: str = PrivateAttr(default="")

    def __repr__(self) -> str:
        return f"Policy(label={self.label!r}, version={self.version}, rules={len(self.rules)})"

    __str__ = __repr__

    @property
    def sha256(self) -> str:
        """SHA-256 of the canonical JSON of the source document."""
        return self._sha256

    @property
    def document(self) -> dict[str, Any]:
        """The source document as loaded (may hold inline key material: do not log it)."""
        return self._document

    def canonical_bytes(self) -> bytes:
        """The canonical JSON bytes of the document (what ``sha256`` and signatures cover)."""
        return canonical_json(self._document)


def canonical_json(document: Any) -> bytes:
    """Canonical JSON: sorted keys, no insignificant white space, UTF-8."""
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    ).encode("utf-8")


def document_sha256(document: Any) -> str:
    """SHA-256 hex of :func:`canonical_json`."""
    return hashlib.sha256(canonical_json(document)).hexdigest()
