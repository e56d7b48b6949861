"""Loading policies: every source form, cape-python compatibility, every problem in one error."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import _core_test_transforms  # noqa: F401  (registers test-suffix, plusN, test-keyed)
import pytest
import yaml

from cape_pipelines import PolicyError, load_policy
from cape_pipelines.keys import KeyRef
from cape_pipelines.policy import canonical_json, policy_json_schema
from cape_pipelines.transforms import known_types

DATA = Path(__file__).resolve().parent.parent / "data"
CAPE_KEY_HEX = "abcdef0123456789abcdef0123456789abcdef0123456789abcdef01234567ef"


def problems_of(source: object) -> list[tuple[str, str]]:
    with pytest.raises(PolicyError) as info:
        load_policy(source)  # type: ignore[arg-type]
    return info.value.problems


# ---------------------------------------------------------------- sources


def test_sources_give_the_same_policy(tmp_path: Path) -> None:
    path = DATA / "full_policy.yaml"
    doc = yaml.safe_load(path.read_text())
    json_file = tmp_path / "p.json"
    json_file.write_text(json.dumps(doc))
    loaded = [
        load_policy(path),
        load_policy(str(path)),
        load_policy(path.read_text()),
        load_policy(json.dumps(doc)),
        load_policy(doc),
        load_policy(json_file),
    ]
    assert {p.sha256 for p in loaded} == {loaded[0].sha256}
    assert len(loaded[0].sha256) == 64
    assert load_policy(loaded[0]) is loaded[0]


def test_sha256_is_of_canonical_json() -> None:
    import hashlib

    doc = {"rules": [{"actions": ["drop"], "match": {"name": "a"}}], "label": "x"}
    assert load_policy(doc).sha256 == hashlib.sha256(canonical_json(doc)).hexdigest()
    reordered = {"label": "x", "rules": [{"match": {"name": "a"}, "actions": ["drop"]}]}
    assert load_policy(reordered).sha256 == load_policy(doc).sha256


def test_single_line_yaml_string() -> None:
    assert load_policy('{"label": "x", "rules": [{"actions": ["drop"], "match": {"name": "a"}}]}')


@pytest.mark.parametrize(
    ("source", "location", "message"),
    [
        # a missing file
        ("no/such/policy.yaml", "policy", "file not found: no/such/policy.yaml"),
        # malformed YAML: line and column
        ((DATA / "malformed.yaml"), "line 4, column 12", "malformed YAML/JSON"),
        # YAML that is not a mapping
        ("- a\n- b\n", "policy", "a policy must be a mapping"),
        # no rules at all
        ({"label": "x", "rules": []}, "rules", "at least 1 item"),
        ({"label": "x"}, "rules", "field required"),
        ({"rules": [{"match": {"name": "a"}, "actions": ["drop"]}]}, "label", "field required"),
        # an action that is neither a mapping nor drop
        (
            {"label": "x", "rules": [{"match": {"name": "a"}, "actions": ["keep"]}]},
            "rules[0].actions[0]",
            "an action is {transform: {...}} or the word drop",
        ),
        # both name and type on a transform
        (
            {
                "label": "x",
                "rules": [
                    {
                        "match": {"name": "a"},
                        "actions": [{"transform": {"name": "n", "type": "plusN"}}],
                    }
                ],
            },
            "rules[0].actions[0].transform",
            "exactly one of name",
        ),
        # a named transform given parameters
        (
            {
                "label": "x",
                "transformations": [{"name": "n", "type": "plusN", "n": 1}],
                "rules": [
                    {"match": {"name": "a"}, "actions": [{"transform": {"name": "n", "n": 2}}]}
                ],
            },
            "rules[0].actions[0].transform",
            "a transform by name takes no parameters; found n",
        ),
        # a regex that does not compile
        (
            {"label": "x", "rules": [{"match": {"regex": "("}, "actions": ["drop"]}]},
            "rules[0].match",
            "regex does not compile",
        ),
        # version must be >= 1
        (
            {"label": "x", "version": 0, "rules": [{"match": {"name": "a"}, "actions": ["drop"]}]},
            "version",
            "greater than or equal to 1",
        ),
        # a bad key form
        (
            {
                "label": "x",
                "rules": [
                    {
                        "match": {"name": "a"},
                        "actions": [{"transform": {"type": "test-keyed", "key": 42}}],
                    }
                ],
            },
            "rules[0].actions[0].transform.key",
            "key must be {secret: NAME}",
        ),
        # column-redact in a row-level rule without columns
        (
            {"label": "x", "rules": [{"actions": [{"transform": {"type": "column-redact"}}]}]},
            "rules[0].actions[0].transform",
            "column-redact without a match needs columns",
        ),
    ],
)
def test_single_problem(source: object, location: str, message: str) -> None:
    problems = problems_of(source)
    assert len(problems) == 1, problems
    assert problems[0][0] == location
    assert message in problems[0][1]


def test_every_problem_of_both_passes_in_one_error() -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(DATA / "many_problems.yaml")
    err = info.value
    assert isinstance(err, ValueError)
    locations = [loc for loc, _ in err.problems]
    assert locations == [
        "label",
        "rules[0].match",
        "rules[1].actions[0].transform.type",
        "rules[2].actions[0].transform.n",
        "rules[3].actions[0].transform.n",
        "rules[4].actions[0].transform.condition",
        "rules[5].actions[0].transform.name",
        "rules[6].actions[0].transform",
        "transformations[1].name",
        "transformations[2].n",
        "unmatched_columns",
    ]
    text = str(err)
    assert "11 problem(s)" in text
    assert "rules[3].actions[0].transform.n: field required" in text
    assert (
        "rules[4].actions[0].transform.condition: expected ')', found end of condition at column 19"
        in text
    )
    assert "unknown named transformation 'missing' (known: broken, twice)" in text
    assert "named transformation 'twice' is defined twice" in text
    assert "test-suffix transforms a column, so its rule needs a match" in text


def test_unknown_type_lists_the_known_ones() -> None:
    problems = problems_of(
        {
            "label": "x",
            "rules": [{"match": {"name": "a"}, "actions": [{"transform": {"type": "tokenizr"}}]}],
        }
    )
    ((loc, msg),) = problems
    assert loc == "rules[0].actions[0].transform.type"
    assert msg.startswith("unknown transformation type 'tokenizr'; known types: ")
    for name in known_types():
        assert name in msg


def test_rows_rule_problem_locations_are_exact() -> None:
    problems = problems_of(
        {
            "label": "x",
            "rules": [
                {"match": {"name": "a"}, "actions": ["drop"]},
                {"match": {"name": "b"}, "actions": ["drop"]},
                {"actions": [{"transform": {"type": "row-redact", "condition": "a >"}}]},
            ],
        }
    )
    assert problems == [
        (
            "rules[2].actions[0].transform.condition",
            "expected a literal, found end of condition at column 4",
        )
    ]


# ---------------------------------------------------------------- cape-python compatibility


def test_cape_python_basic() -> None:
    policy = load_policy(DATA / "cape_python_basic.yaml")
    assert policy.label == "sales_policy"
    (rule,) = policy.rules
    assert rule.match is not None and rule.match.name == "amount"
    assert [a.transform.n for a in rule.actions] == [1, 2]  # type: ignore[attr-defined]
    assert rule.on_missing_column == "error"  # fail closed, unlike cape-python's warning


def test_cape_python_named_and_id() -> None:
    policy = load_policy(DATA / "cape_python_named.yaml")
    assert policy.version == 2
    actions = policy.rules[0].actions
    assert [a.named for a in actions] == ["addOne", "addTen"]
    assert [a.transform.n for a in actions] == [1, 10]  # type: ignore[attr-defined]
    assert policy.document["id"].startswith("3f1c2d9e")


def test_cape_python_secret_forms() -> None:
    policy = load_policy(DATA / "cape_python_secret.yaml")
    named_key = policy.rules[0].actions[0].transform.key  # type: ignore[attr-defined]
    inline_key = policy.rules[1].actions[0].transform.key  # type: ignore[attr-defined]
    assert isinstance(named_key, KeyRef)
    # URL-safe base64 without padding, exactly as cape-python's base64.from_string reads it.
    assert named_key.inline.get_secret_value() == bytes.fromhex(CAPE_KEY_HEX)
    assert inline_key.inline.get_secret_value() == b"an inline passphrase"


def test_cape_python_drop() -> None:
    policy = load_policy(DATA / "cape_python_redact.yaml")
    action = policy.rules[0].actions[0]
    assert action.transform.type_name == "column-redact"
    assert action.transform.columns is None  # type: ignore[attr-defined]  (the matched column)


def test_cape_python_builtin_families() -> None:
    policy = load_policy(DATA / "cape_python_complex.yaml")
    assert [r.actions[0].transform.type_name for r in policy.rules] == [
        "numeric-perturbation",
        "numeric-rounding",
        "tokenizer",
        "date-truncation",
    ]


# ---------------------------------------------------------------- the loaded object


def test_full_policy_fields() -> None:
    policy = load_policy(DATA / "full_policy.yaml")
    assert (policy.label, policy.version, policy.description) == (
        "customers",
        3,
        "Customer table for analytics",
    )
    assert [r.on_missing_column for r in policy.rules] == ["error", "skip", "error", "error"]
    assert policy.rules[3].match is None
    assert policy.rules[3].actions[0].transform.parsed.columns() == {"age", "country"}  # type: ignore[attr-defined]


def test_policy_pickles_and_hides_inline_keys() -> None:
    policy = load_policy(DATA / "cape_python_secret.yaml")
    again = pickle.loads(pickle.dumps(policy))
    assert again.sha256 == policy.sha256
    for text in (repr(policy), str(policy), repr(policy.rules), str(policy.rules[0].actions[0])):
        assert "passphrase" not in text
        assert "q83vASNFZ4" not in text
        assert CAPE_KEY_HEX[:16] not in text


# ---------------------------------------------------------------- JSON Schema


def test_json_schema_is_valid_and_accepts_our_policies() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = policy_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for name in (
        "full_policy",
        "cape_python_basic",
        "cape_python_named",
        "cape_python_secret",
        "cape_python_redact",
    ):
        doc = yaml.safe_load((DATA / f"{name}.yaml").read_text())
        errors = [e.message for e in validator.iter_errors(doc)]
        assert errors == [], (name, errors)


@pytest.mark.parametrize(
    "doc",
    [
        {"label": "x", "rules": [{"match": {"name": "a"}, "actions": ["keep"]}]},
        {
            "label": "x",
            "rules": [{"match": {"name": "a"}, "actions": [{"transform": {"type": "nope"}}]}],
        },
        {
            "label": "x",
            "rules": [
                {"match": {"name": "a"}, "actions": [{"transform": {"type": "plusN", "n": "x"}}]}
            ],
        },
        {
            "label": "x",
            "rules": [{"match": {"name": "a"}, "actions": [{"transform": {"type": "plusN"}}]}],
        },
        {"label": "x", "rules": [], "colour": 1},
        {
            "label": "x",
            "rules": [
                {
                    "match": {"name": "a"},
                    "actions": [{"transform": {"type": "test-keyed", "key": {"secrt": "k"}}}],
                }
            ],
        },
    ],
)
def test_json_schema_rejects_bad_documents(doc: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(policy_json_schema())
    assert list(validator.iter_errors(doc))


def test_json_schema_lists_every_type() -> None:
    schema = policy_json_schema()
    titles = [v["title"] for v in schema["$defs"]["Transformation"]["oneOf"]]
    assert titles == known_types()
    json.dumps(schema)  # serialisable as is


# ---------------------------------------------------------------- duplicate keys


TWO_RULES_BLOCKS = """\
label: t
rules:
  - match: {name: ssn}
    actions: [drop]
rules:
  - match: {name: name}
    actions: [drop]
"""


def test_a_second_rules_block_is_refused_with_both_lines() -> None:
    # Last-wins YAML would drop the ssn rule a reviewer read and leak ssn.
    with pytest.raises(PolicyError) as info:
        load_policy(TWO_RULES_BLOCKS)
    assert info.value.problems == [
        (
            "rules",
            "duplicate key 'rules' at line 2, column 1 and line 5, column 1; give each key once",
        )
    ]


def test_duplicate_keys_in_a_json_rule_are_refused(tmp_path: Path) -> None:
    text = (
        '{"label": "t", "rules": [{"match": {"name": "ssn"}, '
        '"match": {"name": "x"}, "actions": ["drop"]}]}'
    )
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    [(loc, msg)] = info.value.problems
    assert loc == "rules[0].match"
    assert "line 1, column 27 and line 1, column 53" in msg


@pytest.mark.parametrize(
    ("text", "loc"),
    [
        (
            "label: t\nrules:\n  - match: {name: a}\n    actions:\n"
            "      - transform: {type: numeric-rounding, precision: 1, precision: 2}\n",
            "rules[0].actions[0].transform.precision",
        ),
        ("label: t\nlabel: u\nrules: [{match: {name: a}, actions: [drop]}]\n", "label"),
        (
            "label: t\ntransformations:\n  - {name: r, type: numeric-rounding, precision: 1,"
            " type: column-redact}\n"
            "rules: [{match: {name: a}, actions: [{transform: {name: r}}]}]\n",
            "transformations[0].type",
        ),
    ],
)
def test_duplicate_keys_anywhere_are_refused(text: str, loc: str) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(text)
    assert [p[0] for p in info.value.problems] == [loc]


def test_yaml_merge_keys_are_not_duplicates() -> None:
    text = (
        "label: t\nbase: &b {precision: 1}\n"
        "rules: [{match: {name: a}, actions: [{transform: {<<: *b, type: numeric-rounding}}]}]\n"
    )
    # `base` is an unknown field; the point is that the merge is not reported as a duplicate
    with pytest.raises(PolicyError) as info:
        load_policy(text)
    assert all("duplicate" not in msg for _, msg in info.value.problems)
