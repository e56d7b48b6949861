"""Loading a policy from a path, a YAML/JSON string or a dict, with every problem reported."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import PolicyError
from ..transforms.base import Transformation, get_transformation_class
from .models import (
    Policy,
    PolicyDocument,
    ResolvedAction,
    ResolvedRule,
    TransformRef,
    document_sha256,
)

PolicySource = str | os.PathLike[str] | Mapping[str, Any] | Policy


def _loc(parts: tuple[Any, ...], prefix: str = "") -> str:
    out = prefix
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "policy"


def _errors(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "field required"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field"
        msg = msg.removeprefix("Value error, ")
        loc = tuple(p for p in err["loc"] if p not in ("function-after[_exactly_one()]",))
        problems.append((_loc(loc, prefix), msg))
    return problems


def _read_source(source: PolicySource) -> tuple[Any, str | None]:
    if isinstance(source, Mapping):
        return dict(source), None
    if isinstance(source, os.PathLike) or (
        isinstance(source, str) and "\n" not in source and not source.lstrip().startswith("{")
    ):
        path = Path(source)
        if not path.exists():
            if isinstance(source, str) and ":" in source:
                return _parse_text(source, None), None
            raise PolicyError([("policy", f"file not found: {path}")], source=str(path))
        return _parse_text(path.read_text(encoding="utf-8"), str(path)), str(path)
    return _parse_text(str(source), None), None


def _parse_text(text: str, where: str | None) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        loc = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "policy"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PolicyError([(loc, f"malformed YAML/JSON: {problem}")], source=where) from None


def build_transformation(type_name: str, params: Mapping[str, Any], where: str) -> Transformation:
    """Build one transformation from its ``type`` and parameters, or raise PolicyError."""
    try:
        cls = get_transformation_class(type_name)
    except KeyError as exc:
        raise PolicyError([(f"{where}.type", exc.args[0])]) from None
    try:
        return cls(**params)
    except ValidationError as exc:
        raise PolicyError(_errors(exc, where)) from None
    except (TypeError, ValueError) as exc:
        raise PolicyError([(where, str(exc))]) from None


def load_policy(source: PolicySource) -> Policy:
    """Load and fully validate a policy.

    ``source`` is a path, a YAML or JSON string, a dict, or an already-loaded
    :class:`Policy` (returned as is). Raises :class:`PolicyError` listing every
    problem with its location, e.g. ``rules[2].actions[0].transform.min: field required``.

    >>> p = load_policy({"label": "demo", "rules": [{"match": {"name": "ssn"}, "actions": ["drop"]}]})
    >>> p.label, len(p.rules)
    ('demo', 1)
    """
    if isinstance(source, Policy):
        return source
    raw, where = _read_source(source)
    if not isinstance(raw, Mapping):
        raise PolicyError([("policy", "a policy must be a mapping (label, rules, ...)")], where)
    try:
        doc = PolicyDocument.model_validate(raw)
    except ValidationError as exc:
        raise PolicyError(_errors(exc), where) from None

    problems: list[tuple[str, str]] = []
    named: dict[str, tuple[str, dict[str, Any], str]] = {}
    for i, nt in enumerate(doc.transformations):
        loc = f"transformations[{i}]"
        if nt.name in named:
            problems.append((f"{loc}.name", f"named transformation {nt.name!r} is defined twice"))
            continue
        named[nt.name] = (nt.type, nt.params, loc)

    built_named: dict[str, Transformation] = {}
    for name, (type_name, params, loc) in named.items():
        try:
            built_named[name] = build_transformation(type_name, params, loc)
        except PolicyError as exc:
            problems.extend(exc.problems)

    rules: list[ResolvedRule] = []
    for r, rule in enumerate(doc.rules):
        rloc = f"rules[{r}]"
        actions: list[ResolvedAction] = []
        for a, action in enumerate(rule.actions):
            aloc = f"{rloc}.actions[{a}].transform"
            ref: TransformRef = action.transform
            try:
                if ref.name is not None:
                    if ref.name not in named:
                        known = ", ".join(sorted(named)) or "none defined"
                        raise PolicyError(
                            [(f"{aloc}.name", f"unknown named transformation {ref.name!r}"
                              f" (known: {known})")]
                        )
                    if ref.name not in built_named:
                        continue
                    t = built_named[ref.name]
                else:
                    assert ref.type is not None
                    t = build_transformation(ref.type, ref.params, aloc)
            except PolicyError as exc:
                problems.extend(exc.problems)
                continue
            if rule.match is None and t.kind == "column":
                problems.append(
                    (aloc, f"{t.type_name} transforms a column, so its rule needs a match")
                )
            if t.kind == "columns" and rule.match is None and not getattr(t, "columns", None):
                problems.append((aloc, "column-redact without a match needs columns"))
            actions.append(ResolvedAction(transform=t, location=aloc, named=ref.name))
        rules.append(
            ResolvedRule(
                match=rule.match,
                actions=actions,
                on_missing_column=rule.on_missing_column or doc.on_missing_column,
                location=rloc,
            )
        )
    if problems:
        raise PolicyError(problems, where)

    policy = Policy(
        label=doc.label,
        version=doc.version,
        description=doc.description,
        on_missing_column=doc.on_missing_column,
        unmatched_columns=doc.unmatched_columns,
        rules=rules,
    )
    policy._document = dict(raw)
    policy._sha256 = document_sha256(policy._document)
    return policy


def policy_json_schema() -> dict[str, Any]:
    """JSON Schema of the policy document, for editors; transformation params by type."""
    from ..transforms.base import known_types

    schema = PolicyDocument.model_json_schema()
    variants = []
    for type_name in known_types():
        cls = get_transformation_class(type_name)
        sub = cls.model_json_schema()
        props = dict(sub.get("properties", {}))
        props["type"] = {"const": type_name}
        variants.append(
            {
                "title": type_name,
                "type": "object",
                "properties": props,
                "required": ["type", *sub.get("required", [])],
                "additionalProperties": False,
                **({"$defs": sub["$defs"]} if "$defs" in sub else {}),
            }
        )
    schema.setdefault("$defs", {})["Transformation"] = {"oneOf": variants}
    schema["title"] = "Cape Pipelines policy"
    return schema
