"""mask: table-driven cases (one comment per row), short values, patterns, refusals."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cape_pipelines as cape
from cape_pipelines.audit import MemorySink
from cape_pipelines.errors import PolicyError
from cape_pipelines.transforms.base import ColumnContext
from cape_pipelines.transforms.mask import Mask


def mask(values: list[str | None], **params) -> list[str | None]:
    policy = {
        "label": "mask",
        "rules": [{"match": {"name": "x"}, "actions": [{"transform": {"type": "mask", **params}}]}],
    }
    out = cape.apply_policy(
        policy, pa.table({"x": pa.array(values, pa.string())}), audit=MemorySink()
    )
    col = out.column("x").combine_chunks()
    col.validate(full=True)
    return col.to_pylist()


@pytest.mark.parametrize(
    ("value", "params", "expected"),
    [
        # everything masked by default, one mask character per code point
        ("héllo 李雷🙂", {}, "*********"),
        # a card's last four
        ("4111111111111111", {"keep_last": 4}, "************1111"),
        # first and last kept, another mask character
        ("abcdefgh", {"keep_first": 2, "keep_last": 1, "char": "#"}, "ab#####h"),
        # a value no longer than keep_first + keep_last is masked entirely
        ("abcde", {"keep_first": 2, "keep_last": 3}, "*****"),
        ("abcdef", {"keep_first": 2, "keep_last": 3}, "ab*def"),
        # separators survive with ignore
        ("4111-1111-1111-1111", {"keep_last": 4, "ignore": "-"}, "****-****-****-1111"),
        # an e-mail's domain
        ("ann.lee@example.com", {"keep": "email-domain"}, "*******@example.com"),
        # no @: masked entirely (fail closed)
        ("not an email", {"keep": "email-domain"}, "************"),
        # a phone's last four digits, separators between them kept as matched
        ("+1 (555) 123-4567", {"keep": "last-4-digits"}, "*************4567"),
        ("+1 555 12-34", {"keep": "last-4-digits"}, "*******12-34"),
        # the first match of a custom pattern stays
        ("id=AB12 id=CD34", {"keep_pattern": r"[A-Z]{2}\d{2}"}, "***AB12********"),
        # newlines are characters too
        ("a\nb", {}, "***"),
        ("", {"keep_last": 2}, ""),
        # characters special inside a regex class are ignored literally
        ("a-b^c]d\\e[f", {"ignore": "-^]\\["}, "*-*^*]*\\*[*"),
        ("a\u2013é李 b", {"ignore": "\u2013é李 "}, "*\u2013é李 *"),
    ],
)
def test_mask(value, params, expected):
    assert mask([value, None], **params) == [expected, None]


def test_dictionary_and_large_string_inputs():
    ctx = ColumnContext("x")
    t = Mask(keep_last=2)
    values = ["secret", None, "secret"]
    expected = ["****et", None, "****et"]
    assert t.apply(pa.array(values).dictionary_encode(), ctx).to_pylist() == expected
    assert t.apply(pa.array(values, pa.large_string()), ctx).to_pylist() == expected


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.one_of(st.none(), st.text()), max_size=10),
    first=st.integers(0, 4),
    last=st.integers(0, 4),
)
def test_length_kept_and_kept_ends_shown(values, first, last):
    out = mask(values, keep_first=first, keep_last=last)
    for before, after in zip(values, out, strict=True):
        if before is None:
            assert after is None
            continue
        assert len(after) == len(before)
        if len(before) > first + last:
            assert after[:first] == before[:first]
            assert after[len(after) - last :] == before[len(before) - last :]
            assert set(after[first : len(after) - last]) <= {"*"}
        else:
            assert set(after) <= {"*"}


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"char": "**"}, "exactly one character"),
        ({"keep_pattern": "(a|b)"}, "capturing groups"),
        ({"keep_pattern": "(?P<x"}, "not a valid RE2"),
        ({"keep_first": 1, "keep": "email-domain"}, "one of"),
        ({"keep": "ssn"}, "keep"),
        ({"keep_last": -1}, "keep_last"),
    ],
)
def test_invalid_parameters(params, match):
    policy = {
        "label": "mask",
        "rules": [{"match": {"name": "x"}, "actions": [{"transform": {"type": "mask", **params}}]}],
    }
    with pytest.raises(PolicyError, match=match):
        cape.load_policy(policy)


def test_non_string_column_is_refused():
    policy = {
        "label": "mask",
        "rules": [{"match": {"name": "x"}, "actions": [{"transform": {"type": "mask"}}]}],
    }
    with pytest.raises(cape.PlanError, match="needs a string column"):
        cape.apply_policy(policy, pa.table({"x": [1, 2]}), audit=MemorySink())
