"""fpe, mask, bucket, generalize, text-scrub: registered, in the JSON Schema, safe reprs."""

from __future__ import annotations

import pytest

import cape_pipelines as cape
from cape_pipelines.policy import policy_json_schema
from cape_pipelines.transforms import get_transformation_class, known_types

NEW = {
    "fpe": {"key": {"secret": "k"}, "radix": 36, "tweak_column": "t", "keep_last": 2},
    "fpe-reverser": {"key": {"secret": "k"}, "luhn": True, "keep_separators": True},
    "mask": {"keep": "email-domain", "char": "#"},
    "bucket": {"edges": [18, 65], "labels": ["a", "b", "c"]},
    "generalize": {"mapping": {"Boston": "NE"}, "default": "other"},
    "text-scrub": {"entities": ["email", "iban"], "replace": "token", "key": {"secret": "k"}},
}


def doc(type_name: str, params: dict) -> dict:
    return {
        "label": "families",
        "rules": [
            {"match": {"name": "x"}, "actions": [{"transform": {"type": type_name, **params}}]}
        ],
    }


def test_registered() -> None:
    assert set(NEW) <= set(known_types())


@pytest.mark.parametrize("type_name", sorted(NEW))
def test_json_schema_accepts_and_loader_agrees(type_name: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(policy_json_schema())
    good = doc(type_name, NEW[type_name])
    validator.validate(good)
    cape.load_policy(good)
    bad = doc(type_name, {**NEW[type_name], "no_such_parameter": 1})
    assert not validator.is_valid(bad)
    with pytest.raises(cape.PolicyError, match="no_such_parameter"):
        cape.load_policy(bad)


def test_inline_keys_are_not_shown() -> None:
    secret = "0123456789abcdef-inline"
    for type_name in ("fpe", "text-scrub"):
        params = {**NEW[type_name], "key": secret[:16]}
        t = get_transformation_class(type_name)(**params)
        assert secret[:16] not in repr(t)
