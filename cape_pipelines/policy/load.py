"""Loading a policy from a path, a YAML/JSON string or a dict, with every problem reported."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import PolicyError
from ..transforms.base import ColumnDrop, ColumnTransformation, Transformation
from ..transforms.registry import get_transformation_class, known_types
from .models import (
    Policy,
    PolicyDocument,
    ResolvedAction,
    ResolvedRule,
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
        elif err["type"] == "model_type" and "Action" in msg:
            msg = "an action is {transform: {...}} or the word drop"
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


def _mark(node: yaml.Node) -> str:
    return f"line {node.start_mark.line + 1}, column {node.start_mark.column + 1}"


def _duplicate_keys(loader: yaml.SafeLoader, root: yaml.Node) -> list[tuple[str, str]]:
    """Every mapping key given twice anywhere in the document, with both places.

    YAML (and ``json.loads``) keep the last of two equal keys, so a second
    ``rules:`` block would silently replace the first one a reviewer read. The
    walk is iterative so that a deeply nested document cannot exhaust the stack.
    """
    problems: list[tuple[str, str]] = []
    stack: list[tuple[yaml.Node, tuple[Any, ...]]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, (*path, i)) for i, child in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                if isinstance(key_node, yaml.ScalarNode):
                    key = (key_node.tag, loader.construct_object(key_node))
                    shown = key[1]
                else:
                    key = (key_node.tag, yaml.serialize(key_node))
                    shown = "(complex key)"
                first = seen.get(key)
                if first is not None:
                    problems.append(
                        (
                            _loc((*path, shown)) if isinstance(shown, str) else _loc(path),
                            f"duplicate key {shown!r} at {_mark(first)} and {_mark(key_node)}; "
                            "give each key once",
                        )
                    )
                else:
                    seen[key] = key_node
                stack.append((value_node, (*path, shown)))
    problems.sort(key=lambda p: _natural_key(p[0]))
    return problems


def _parse_text(text: str, where: str | None) -> Any:
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        duplicates = _duplicate_keys(loader, root)
        if duplicates:
            raise PolicyError(duplicates, source=where)
        return loader.construct_document(root)
    except RecursionError:
        # PyYAML composes and constructs recursively; a policy is a few levels deep.
        raise PolicyError(
            [("policy", "the document is nested too deeply to be a policy")], source=where
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        loc = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "policy"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PolicyError([(loc, f"malformed YAML/JSON: {problem}")], source=where) from None
    finally:
        loader.dispose()


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


def _natural_key(location: str) -> list[Any]:
    """Sort key putting ``rules[2]`` before ``rules[10]``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", location)]


def _split_ref(ref: Mapping[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    params = {k: v for k, v in ref.items() if k not in ("name", "type")}
    return ref.get("name"), ref.get("type"), params


def _build_named(raw: Any) -> tuple[dict[str, Transformation], set[str], list[tuple[str, str]]]:
    """Pass 2 over ``transformations:``: build each well-formed entry, collect problems."""
    built: dict[str, Transformation] = {}
    declared: set[str] = set()
    problems: list[tuple[str, str]] = []
    if not isinstance(raw, list):
        return built, declared, problems
    for i, item in enumerate(raw):
        loc = f"transformations[{i}]"
        if not isinstance(item, Mapping):
            continue
        name, type_name, params = _split_ref(item)
        if not isinstance(name, str) or not name or not isinstance(type_name, str) or not type_name:
            continue
        if name in declared:
            problems.append((f"{loc}.name", f"named transformation {name!r} is defined twice"))
            continue
        declared.add(name)
        try:
            built[name] = build_transformation(type_name, params, loc)
        except PolicyError as exc:
            problems.extend(exc.problems)
    return built, declared, problems


def _build_actions(
    raw_rules: Any, built_named: Mapping[str, Transformation], declared: set[str]
) -> tuple[dict[tuple[int, int], Transformation], list[tuple[str, str]]]:
    """Pass 2 over every rule's actions: build each well-formed transform, collect problems."""
    built: dict[tuple[int, int], Transformation] = {}
    problems: list[tuple[str, str]] = []
    if not isinstance(raw_rules, list):
        return built, problems
    for r, rule in enumerate(raw_rules):
        if not isinstance(rule, Mapping) or not isinstance(rule.get("actions"), list):
            continue
        has_match = rule.get("match") is not None
        dropped_at: int | None = None
        for a, action in enumerate(rule["actions"]):
            aloc = f"rules[{r}].actions[{a}].transform"
            if dropped_at is not None:
                problems.append(
                    (
                        f"rules[{r}].actions[{a}]",
                        f"actions[{dropped_at}] already removed the rule's columns",
                    )
                )
                continue
            if action == "drop":
                action = {"transform": {"type": "column-redact"}}
            if not isinstance(action, Mapping) or not isinstance(action.get("transform"), Mapping):
                continue
            name, type_name, params = _split_ref(action["transform"])
            t: Transformation | None = None
            if isinstance(name, str) and type_name is None:
                if name not in declared:
                    known = ", ".join(sorted(declared)) or "none defined"
                    problems.append(
                        (f"{aloc}.name", f"unknown named transformation {name!r} (known: {known})")
                    )
                    continue
                t = built_named.get(name)
            elif isinstance(type_name, str) and name is None:
                try:
                    t = build_transformation(type_name, params, aloc)
                except PolicyError as exc:
                    problems.extend(exc.problems)
                    continue
            if t is None:
                continue
            if not has_match and isinstance(t, ColumnTransformation):
                problems.append(
                    (aloc, f"{t.type_name} transforms a column, so its rule needs a match")
                )
                continue
            if not has_match and isinstance(t, ColumnDrop) and not t.columns:
                problems.append((aloc, "column-redact without a match needs columns"))
                continue
            built[(r, a)] = t
            if has_match and t.kind == "columns" and not getattr(t, "columns", None):
                dropped_at = a
    return built, problems


def load_policy(source: PolicySource) -> Policy:
    """Load and fully validate a policy.

    ``source`` is a path, a YAML or JSON string, a dict, or an already-loaded
    :class:`Policy` (returned as is). Raises :class:`PolicyError` listing every
    problem of both passes (the document's structure, then each
    transformation's parameters) with its location, e.g.
    ``rules[2].actions[0].transform.min: field required``.

    >>> p = load_policy({"label": "demo",
    ...                  "rules": [{"match": {"name": "ssn"}, "actions": ["drop"]}]})
    >>> p.label, len(p.rules)
    ('demo', 1)
    """
    if isinstance(source, Policy):
        return source
    raw, where = _read_source(source)
    if not isinstance(raw, Mapping):
        raise PolicyError([("policy", "a policy must be a mapping (label, rules, ...)")], where)
    problems: list[tuple[str, str]] = []
    doc: PolicyDocument | None = None
    try:
        doc = PolicyDocument.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_errors(exc))
    built_named, declared, named_problems = _build_named(raw.get("transformations"))
    built_actions, action_problems = _build_actions(raw.get("rules"), built_named, declared)
    problems.extend(named_problems)
    problems.extend(action_problems)
    if problems or doc is None:
        unique = list(dict.fromkeys(problems))
        unique.sort(key=lambda p: _natural_key(p[0]))
        raise PolicyError(unique, where)

    rules: list[ResolvedRule] = []
    for r, rule in enumerate(doc.rules):
        actions = [
            ResolvedAction(
                transform=built_actions[(r, a)],
                location=f"rules[{r}].actions[{a}].transform",
                named=action.transform.name,
            )
            for a, action in enumerate(rule.actions)
        ]
        rules.append(
            ResolvedRule(
                match=rule.match,
                actions=actions,
                on_missing_column=rule.on_missing_column or doc.on_missing_column,
                location=f"rules[{r}]",
            )
        )
    policy = Policy(
        label=doc.label,
        version=doc.version,
        description=doc.description,
        on_missing_column=doc.on_missing_column,
        unmatched_columns=doc.unmatched_columns,
        rules=rules,
        risk=doc.risk,
    )
    policy._document = dict(raw)
    policy._sha256 = document_sha256(policy._document)
    return policy


_KEY_SCHEMA: dict[str, Any] = {
    "description": "A key: {secret: NAME} resolved at run time (keys=, CAPE_KEY_<NAME>, "
    "coordinator); inline forms are accepted for cape-python compatibility only.",
    "anyOf": [
        {
            "type": "object",
            "properties": {"secret": {"type": "string", "minLength": 1}},
            "required": ["secret"],
            "additionalProperties": False,
        },
        {"type": "string", "description": "inline key material (cape-python; discouraged)"},
        {
            "type": "object",
            "properties": {
                "type": {"const": "secret"},
                "value": {"type": "string", "description": "base64 key material"},
                "name": {"type": "string"},
            },
            "required": ["type", "value"],
            "additionalProperties": False,
        },
    ],
}


def _replace_refs(node: Any, old: str, new: str) -> Any:
    if isinstance(node, dict):
        return {
            k: (new if k == "$ref" and v == old else _replace_refs(v, old, new))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_replace_refs(v, old, new) for v in node]
    return node


def _variant(type_name: str, defs: dict[str, Any], *, named: bool) -> dict[str, Any]:
    """One transformation's parameters as an object schema (with ``name`` when ``named``)."""
    sub = get_transformation_class(type_name).model_json_schema()
    for def_name, body in sub.pop("$defs", {}).items():
        target = def_name
        if def_name in defs and defs[def_name] != body:
            target = f"{type_name}.{def_name}"
            sub = _replace_refs(sub, f"#/$defs/{def_name}", f"#/$defs/{target}")
        defs[target] = body
    props: dict[str, Any] = {}
    required = ["type"]
    if named:
        props["name"] = {"type": "string", "minLength": 1}
        required.insert(0, "name")
    props["type"] = {"const": type_name}
    props.update(sub.get("properties", {}))
    required += [r for r in sub.get("required", []) if r not in required]
    out: dict[str, Any] = {
        "title": type_name,
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
    }
    if sub.get("description"):
        out["description"] = sub["description"]
    return out


def policy_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the policy document, for editors and ``cape policy schema``.

    Each transformation ``type`` is a variant with its own parameters, so an
    editor can complete and check them; ``key`` takes the forms POLICY.md lists.
    """
    schema = PolicyDocument.model_json_schema()
    defs: dict[str, Any] = schema.setdefault("$defs", {})
    types = known_types()
    defs["Transformation"] = {"oneOf": [_variant(t, defs, named=False) for t in types]}
    defs["NamedTransformation"] = {"oneOf": [_variant(t, defs, named=True) for t in types]}
    defs["TransformRef"] = {
        "anyOf": [
            {
                "type": "object",
                "title": "named transformation",
                "properties": {"name": {"type": "string", "minLength": 1}},
                "required": ["name"],
                "additionalProperties": False,
            },
            {"$ref": "#/$defs/Transformation"},
        ]
    }
    defs["Rule"]["properties"]["actions"]["items"] = {
        "anyOf": [{"$ref": "#/$defs/Action"}, {"const": "drop"}]
    }
    defs["Key"] = _KEY_SCHEMA
    schema = _replace_refs(schema, "#/$defs/KeyRef", "#/$defs/Key")
    schema["$defs"].pop("KeyRef", None)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Cape Pipelines policy"
    return schema
