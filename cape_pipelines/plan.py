"""A policy bound to a schema: every check that can fail is done here, before data is read.

:func:`build_plan` resolves which rule hits which column, checks every input
type, compiles row conditions, resolves every key, and derives the output
schema. A :class:`Plan` is picklable and holds only what the workers need.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .errors import CapeError, KeyFormatError, KeyMissingError, PlanError
from .keys import KeyResolver, KeyStore
from .policy.load import PolicySource, load_policy
from .policy.models import Policy, ResolvedRule, RiskSection
from .transforms.base import ColumnDrop, ColumnTransformation, RowFilter
from .transforms.risk import RiskCheck


@dataclass(frozen=True)
class ColumnStep:
    """Replace ``column`` with ``transform`` applied to it."""

    column: str
    transform: ColumnTransformation
    key_id: str | None
    input_type: pa.DataType
    output_type: pa.DataType
    location: str


@dataclass(frozen=True)
class DropStep:
    """Remove ``columns``."""

    columns: tuple[str, ...]
    location: str


@dataclass(frozen=True)
class FilterStep:
    """Keep only rows where ``condition`` is false (true or null removes the row)."""

    condition: str
    keep: pc.Expression
    columns: tuple[str, ...]
    location: str


Step = ColumnStep | DropStep | FilterStep


@dataclass
class Plan:
    """A policy bound to one input schema, with keys resolved. Build with :func:`build_plan`."""

    label: str
    version: int
    sha256: str
    input_schema: pa.Schema
    output_schema: pa.Schema
    steps: list[Step]
    keys: KeyStore
    column_actions: dict[str, list[str]]
    untouched: list[str]
    dropped: list[str]
    used_columns: list[str]
    _state: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)
    # The policy's risk: section bound to the output (None: no risk measured).
    risk: RiskCheck | None = None

    def __repr__(self) -> str:
        return (
            f"Plan(label={self.label!r}, version={self.version}, steps={len(self.steps)}, "
            f"keys={self.keys!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_state"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def step_state(self, index: int) -> dict[str, Any]:
        """The per-process memo of step ``index`` (see ``ColumnContext.state``)."""
        return self._state.setdefault(index, {})

    @property
    def filters_rows(self) -> bool:
        """Whether the plan can remove rows."""
        return any(isinstance(s, FilterStep) for s in self.steps)

    @property
    def transformed_columns(self) -> dict[str, str]:
        """Output column -> the transformation types applied to it, joined with ``+``."""
        out: dict[str, list[str]] = {}
        for s in self.steps:
            if isinstance(s, ColumnStep):
                out.setdefault(s.column, []).append(s.transform.type_name)
        return {c: "+".join(t) for c, t in out.items() if c in self.output_schema.names}

    def describe(self) -> list[dict[str, Any]]:
        """One entry per input column: what happens to it (for ``cape policy plan``)."""
        rows = []
        for f in self.input_schema:
            name = f.name
            if name in self.dropped:
                status = "dropped"
            elif name in self.column_actions:
                status = "transformed"
            else:
                status = "untouched"
            out_type = (
                str(self.output_schema.field(name).type)
                if name in self.output_schema.names
                else None
            )
            rows.append(
                {
                    "column": name,
                    "input_type": str(f.type),
                    "status": status,
                    "actions": self.column_actions.get(name, []),
                    "output_type": out_type,
                }
            )
        for s in self.steps:
            if isinstance(s, FilterStep):
                rows.append(
                    {
                        "column": None,
                        "input_type": None,
                        "status": "row-filter",
                        "actions": [f"{s.location}: row-redact where {s.condition}"],
                        "output_type": None,
                    }
                )
        return rows


def _targets(
    rule: ResolvedRule,
    current: dict[str, pa.DataType],
    column_tags: Mapping[str, Sequence[str]],
) -> tuple[list[str], list[str]]:
    """The columns a rule hits now, and the named ones that are missing."""
    m = rule.match
    if m is None:
        return [], []
    if m.name is not None or m.names is not None:
        names = [m.name] if m.name is not None else list(m.names or [])
        return [n for n in names if n in current], [n for n in names if n not in current]
    if m.regex is not None:
        rx = re.compile(m.regex)
        return [c for c in current if rx.fullmatch(c)], []
    return [c for c in current if m.tag in column_tags.get(c, ())], []


def build_plan(
    policy: PolicySource,
    schema: pa.Schema,
    *,
    keys: Mapping[str, bytes | str] | None = None,
    resolver: KeyResolver | None = None,
    column_tags: Mapping[str, Sequence[str]] | None = None,
) -> Plan:
    """Bind ``policy`` to ``schema``; raise :class:`PlanError` naming the rule and column.

    >>> import pyarrow as pa
    >>> plan = build_plan({"label": "d", "rules": [{"match": {"name": "a"}, "actions": ["drop"]}]},
    ...                   pa.schema([("a", pa.int64()), ("b", pa.string())]))
    >>> plan.output_schema.names
    ['b']
    """
    pol: Policy = load_policy(policy)
    resolver = resolver or KeyResolver(keys)
    tags = column_tags or {}
    current: dict[str, pa.DataType] = {f.name: f.type for f in schema}
    if len(current) != len(schema):
        dupes = sorted({n for n in schema.names if schema.names.count(n) > 1})
        raise PlanError(f"input has duplicate column names: {', '.join(dupes)}")
    steps: list[Step] = []
    store = KeyStore()
    matched: set[str] = set()
    actions: dict[str, list[str]] = {}
    dropped: list[str] = []
    used: set[str] = set()

    for rule in pol.rules:
        targets, missing = _targets(rule, current, tags)
        if missing and rule.on_missing_column == "error":
            where = (
                "dropped by an earlier rule"
                if any(m in schema.names for m in missing)
                else ("not in the data")
            )
            raise PlanError(
                f"{rule.location}.match: column(s) {', '.join(map(repr, missing))} {where} "
                f"(columns: {', '.join(current) or 'none'}); "
                "set on_missing_column: skip to allow this"
            )
        matched.update(targets)
        for action in rule.actions:
            t = action.transform
            loc = action.location
            try:
                if isinstance(t, ColumnTransformation):
                    for ctx_col in t.context_columns():
                        if ctx_col not in current:
                            raise PlanError(f"context column {ctx_col!r} is not in the data")
                        used.add(ctx_col)
                    key_id = None
                    if targets:
                        key = t.resolve_key(resolver)
                        if key is not None:
                            key_id = loc
                            store[key_id] = key
                    for col in targets:
                        if col not in current:
                            raise PlanError(f"column {col!r} was removed by an earlier action")
                        in_type = current[col]
                        out_type = t.output_type(in_type, col)
                        steps.append(ColumnStep(col, t, key_id, in_type, out_type, loc))
                        current[col] = out_type
                        used.add(col)
                        actions.setdefault(col, []).append(
                            f"{loc}: {t.type_name}" + (f" ({action.named})" if action.named else "")
                        )
                elif isinstance(t, ColumnDrop):
                    explicit = list(t.columns or [])
                    cols = explicit or list(targets)
                    gone = [c for c in cols if c not in current]
                    if gone and rule.on_missing_column == "error":
                        raise PlanError(
                            f"column-redact: column(s) {', '.join(map(repr, gone))} not in the "
                            f"data (columns: {', '.join(current) or 'none'}); "
                            "set on_missing_column: skip to allow this"
                        )
                    cols = [c for c in cols if c in current]
                    if cols:
                        steps.append(DropStep(tuple(cols), loc))
                        for c in cols:
                            del current[c]
                            dropped.append(c)
                            matched.add(c)
                            actions.setdefault(c, []).append(f"{loc}: column-redact")
                elif isinstance(t, RowFilter):
                    cond = t.parsed
                    cur_schema = pa.schema(list(current.items()))
                    expr = cond.to_expression(cur_schema)
                    read = tuple(sorted(cond.columns()))
                    used.update(c for c in read if c in schema.names)
                    steps.append(FilterStep(t.condition, ~expr, read, loc))
            except (KeyMissingError, KeyFormatError) as exc:
                # Keep the type (callers catch a missing key specifically); add the location.
                exc.args = (f"{loc}: {exc}",)
                raise exc from None
            except CapeError as exc:
                raise PlanError(f"{loc}: {exc}") from None

    unmatched = [c for c in current if c not in matched and c in schema.names]
    if pol.unmatched_columns == "error" and unmatched:
        raise PlanError(
            "unmatched_columns: error, and no rule covers column(s) "
            + ", ".join(map(repr, unmatched))
        )
    if pol.unmatched_columns == "drop" and unmatched:
        steps.append(DropStep(tuple(unmatched), "unmatched_columns"))
        for c in unmatched:
            del current[c]
            dropped.append(c)
        unmatched = []
    if not current:
        raise PlanError("the policy drops every column; nothing would be written")

    risk = _bind_risk(pol.risk, pol.on_missing_column, schema, current) if pol.risk else None

    out_fields = []
    for name, typ in current.items():
        if name in schema.names:
            src = schema.field(name)
            out_fields.append(pa.field(name, typ, nullable=True, metadata=src.metadata))
        else:
            out_fields.append(pa.field(name, typ))
    return Plan(
        label=pol.label,
        version=pol.version,
        sha256=pol.sha256,
        input_schema=schema,
        output_schema=pa.schema(out_fields),
        steps=steps,
        keys=store,
        column_actions=actions,
        untouched=[c for c in current if c not in actions],
        dropped=dropped,
        used_columns=[c for c in schema.names if c in used],
        risk=risk,
    )


def _bind_risk(
    section: RiskSection,
    default_missing: str,
    schema: pa.Schema,
    output: Mapping[str, pa.DataType],
) -> RiskCheck | None:
    """The ``risk:`` section over the output columns; an absent column is an error naming it,
    or (``on_missing_column: skip``) left out of the measurement."""
    on_missing = section.on_missing_column or default_missing

    def present(column: str, where: str) -> bool:
        if column in output:
            typ = output[column]
            if pa.types.is_nested(typ) or pa.types.is_null(typ):
                raise PlanError(
                    f"{where}: column {column!r} is {typ} in the output, whose values cannot "
                    "form equivalence classes; name a scalar column"
                )
            return True
        if column in schema.names:
            raise PlanError(
                f"{where}: column {column!r} is removed by the policy; risk is measured on "
                f"the output (columns: {', '.join(output)})"
            )
        if on_missing == "error":
            raise PlanError(
                f"{where}: column {column!r} is not in the data (columns: "
                f"{', '.join(schema.names)}); set on_missing_column: skip to allow this"
            )
        return False

    qis = tuple(
        c
        for i, c in enumerate(section.quasi_identifiers)
        if present(c, f"risk.quasi_identifiers[{i}]")
    )
    sensitive = section.sensitive
    if sensitive is not None and not present(sensitive, "risk.sensitive"):
        sensitive = None
    if not qis:
        # on_missing_column: skip, and none of the quasi-identifiers is here: nothing to measure.
        return None
    return RiskCheck(
        quasi_identifiers=qis,
        sensitive=sensitive,
        k=section.k,
        l=section.l if sensitive is not None else None,
        action=section.action,
    )
