"""text-scrub: precision/recall on a labelled synthetic corpus, validation rules, replacements.

The corpus (tests/core/scrub_corpus.py) is generated with a seed the
detectors were not tuned on; each entity there is valid by its own
definition and each text carries a look-alike distractor. Tokens are checked
against HMAC-SHA256 computed here with the standard library.
"""

from __future__ import annotations

import hmac
from collections import Counter

import pyarrow as pa
import pytest
import scrub_corpus
from hypothesis import given, settings
from hypothesis import strategies as st

import cape_pipelines as cape
from cape_pipelines.audit import MemorySink
from cape_pipelines.errors import PolicyError
from cape_pipelines.transforms.base import ColumnContext
from cape_pipelines.transforms.text_scrub import TextScrub

KEY = b"text-scrub-test-key-000000000001"


def scrub(values: list[str | None], **params) -> list[str | None]:
    policy = {
        "label": "scrub",
        "rules": [
            {"match": {"name": "x"}, "actions": [{"transform": {"type": "text-scrub", **params}}]}
        ],
    }
    table = pa.table({"x": pa.array(values, pa.string())})
    out = cape.apply_policy(policy, table, keys={"k": KEY}, audit=MemorySink())
    col = out.column("x").combine_chunks()
    col.validate(full=True)
    return col.to_pylist()


def test_precision_and_recall_on_the_labelled_corpus():
    corpus = scrub_corpus.generate(3500, seed=2026)
    t = TextScrub()
    tp, fp, fn = Counter(), Counter(), Counter()
    for text, spans in corpus:
        found, truth = set(t.find(text)), set(spans)
        for f in found:
            (tp if f in truth else fp)[f[2]] += 1
        for g in truth - found:
            fn[g[2]] += 1
    for entity in scrub_corpus.MAKERS:
        precision = tp[entity] / max(1, tp[entity] + fp[entity])
        recall = tp[entity] / max(1, tp[entity] + fn[entity])
        assert tp[entity] >= 400, entity
        assert precision >= 0.99, (entity, precision)
        assert recall >= 0.99, (entity, recall)


def test_whole_column_equals_per_text_finding():
    corpus = scrub_corpus.generate(300, seed=7)
    texts = [t for t, _ in corpus]
    out = scrub(texts)
    for (text, spans), after in zip(corpus, out, strict=True):
        expected, last = [], 0
        for start, end, entity in spans:
            expected += [text[last:start], f"<{entity.upper()}>"]
            last = end
        assert after == "".join([*expected, text[last:]])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Luhn-valid card in groups; the same digits failing Luhn stay
        ("pay 4111 1111 1111 1111 now", "pay <CARD> now"),
        ("pay 4111 1111 1111 1112 now", "pay 4111 1111 1111 1112 now"),
        # IBAN with correct check digits (ISO 13616 example); wrong check digits stay
        ("to GB82 WEST 1234 5698 7654 32.", "to <IBAN>."),
        ("to GB83 WEST 1234 5698 7654 32.", "to GB83 WEST 1234 5698 7654 32."),
        # SSN area rules: 000, 666 and 9xx areas, 00 group, 0000 serial are not SSNs
        ("ssn 123-45-6789", "ssn <SSN>"),
        ("ssn 666-45-6789", "ssn 666-45-6789"),
        ("ssn 900-45-6789", "ssn 900-45-6789"),
        ("ssn 123-00-6789", "ssn 123-00-6789"),
        ("ssn 123-45-0000", "ssn 123-45-0000"),
        # octets above 255 are not an address
        ("from 10.0.0.255.", "from <IPV4>."),
        ("from 10.0.0.256.", "from 10.0.0.256."),
        ("from 2001:db8::1 ok", "from <IPV6> ok"),
        # "::" alone parses as an address but in text it is not one; times are not either
        ("x :: y at 10:30:00", "x :: y at 10:30:00"),
        # dates and versions are not phones
        ("on 2024-01-15 with v1.2.3", "on 2024-01-15 with v1.2.3"),
        ("call (415) 555-0100 or +44 20 7946 0958", "call <PHONE> or <PHONE>"),
        ("mail Ann.Lee+x@mail.example.com.", "mail <EMAIL>."),
        ("", ""),
        ("ünïcödé ann@example.com 李雷", "ünïcödé <EMAIL> 李雷"),
    ],
)
def test_detectors(text, expected):
    assert scrub([text, None]) == [expected, None]


def test_token_equals_the_tokenizer_token_of_the_finding():
    out = scrub(["write to ann@example.com"], replace="token", key={"secret": "k"})
    token = hmac.new(KEY, b"ann@example.com", "sha256").hexdigest()[:16]
    assert out == [f"write to <EMAIL:{token}>"]
    out = scrub(["a@b.co"], replace="token", key={"secret": "k"}, max_token_len=64)
    assert out == [f"<EMAIL:{hmac.new(KEY, b'a@b.co', 'sha256').hexdigest()}>"]


def test_mask_keeps_the_length():
    assert scrub(["ssn 123-45-6789!"], replace="mask", mask_char="#") == ["ssn ###########!"]


def test_entities_choose_the_detectors():
    text = "ann@example.com 123-45-6789"
    assert scrub([text], entities=["ssn"]) == ["ann@example.com <SSN>"]


def test_findings_are_counted_per_row_by_entity():
    ctx = ColumnContext("x")
    values = pa.array(["a@b.co and c@d.co", "a@b.co and c@d.co", "123-45-6789", None, "none"])
    _, counts = TextScrub().scrub(values, ctx)
    assert counts == {"email": 4, "ssn": 1}


def test_dictionary_input():
    values = pa.array(["a@b.co", "x", "a@b.co"]).dictionary_encode()
    assert TextScrub().apply(values, ColumnContext("x")).to_pylist() == ["<EMAIL>", "x", "<EMAIL>"]


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"replace": "token"}, "needs a key"),
        ({"key": {"secret": "k"}}, "only with replace: token"),
        ({"entities": []}, "at least one"),
        ({"entities": ["email", "email"]}, "twice"),
        ({"entities": ["passport"]}, "entities"),
        ({"mask_char": "**"}, "one character"),
    ],
)
def test_invalid_parameters(params, match):
    policy = {
        "label": "scrub",
        "rules": [
            {"match": {"name": "x"}, "actions": [{"transform": {"type": "text-scrub", **params}}]}
        ],
    }
    with pytest.raises(PolicyError, match=match):
        cape.load_policy(policy)


@settings(max_examples=40, deadline=None)
@given(
    payload=st.text(alphabet="0123456789", min_size=15, max_size=15),
    seps=st.lists(st.sampled_from(["", " ", "-"]), min_size=15, max_size=15),
)
def test_cards_with_any_separators_are_found_when_luhn_valid(payload, seps):
    digits = payload + scrub_corpus.luhn_digit(payload)
    card = "".join(d + s for d, s in zip(digits, [*seps, ""], strict=True))
    if "  " in card or "--" in card or " -" in card or "- " in card:
        return
    assert scrub([f"paid with {card}."], entities=["card"]) == ["paid with <CARD>."]
