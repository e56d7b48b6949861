"""The tag scanner: validating detectors on whole values, evidence and confidence as counted,
name hints confirmed by the values, and precision/recall on the labelled synthetic set
(with the pattern-only baseline beside it, to show what the validation buys)."""

from __future__ import annotations

import random
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _synthetic import (
    HARD_LABELS,
    LABELS,
    dataset,
    hard_dataset,
    iban,
    measure,
    mod97_check,
    pattern_only_checks,
    sin,
)

from cape_pipelines.catalog import scan, validators
from cape_pipelines.catalog.scan import scan_path, scan_table

TRUTH = {(c, t) for c, tags in LABELS.items() for t in tags}


def pairs(table: pa.Table, **kw: object) -> set[tuple[str, str]]:
    return {(p.column, p.tag) for p in scan_table(table, **kw)}  # type: ignore[arg-type]


def test_precision_and_recall_on_the_labelled_synthetic_set():
    table = dataset()
    got = measure(pairs(table, threshold=0.8))
    # The numbers reported in docs/governance.md.
    assert got["precision"] == 1.0
    assert got["false_negatives"] == 2  # the mixed e-mail/phone column, by design of the set
    assert got["recall"] == pytest.approx(12 / 14)
    with mock.patch.dict(scan._VALUE_CHECKS, pattern_only_checks()):
        baseline = measure(pairs(table, threshold=0.8))
    assert baseline["recall"] == got["recall"]
    assert baseline["precision"] < 0.6  # order numbers, IBAN-shaped references, dates ...


@pytest.mark.parametrize(
    "column,values,tag",
    [
        # 16 digits failing Luhn: an order number, not a card
        ("n", ["4111111111111112"] * 10, None),
        ("n", ["4111111111111111"] * 10, "financial.card_number"),
        # IBAN with wrong check digits
        ("r", ["DE89370400440532013001"] * 10, None),
        ("r", ["DE89370400440532013000"] * 10, "financial.iban"),
        # SSN areas 000, 666 and 9xx are never issued
        ("s", ["666-12-3456", "000-12-3456", "912-12-3456"] * 4, None),
        ("s", ["123-45-6789"] * 10, "pii.ssn"),
        ("ip", ["256.1.1.1"] * 10, None),
        ("ip", ["10.0.0.1", "2001:db8::1"] * 5, "pii.ip"),
        # a date is not a phone number
        ("d", ["2024-01-15"] * 10, None),
        ("p", ["+44 20 7946 0958"] * 10, "pii.phone"),
        # an address inside a sentence does not make the column an e-mail column
        ("t", ["write to ann@example.com please"] * 10, None),
        ("m", ["ann@example.com"] * 10, "pii.email"),
    ],
)
def test_detectors_validate_whole_values(column, values, tag):
    found = pairs(pa.table({column: values}))
    assert found == ({(column, tag)} if tag else set())


def test_evidence_and_confidence_are_counted_over_non_null_values():
    values = ["ann@example.com"] * 9 + ["nobody"] + [None] * 5
    (p,) = scan_table(pa.table({"mail": values}))
    assert (p.evidence, p.sampled, p.confidence, p.detector) == (9, 10, 0.9, "email")
    assert scan_table(pa.table({"mail": values}), threshold=0.95) == []
    # Too little evidence: four confirmed values are not enough by default.
    assert scan_table(pa.table({"mail": ["ann@example.com"] * 4 + ["x"] * 100})) == []
    with pytest.raises(ValueError, match="threshold"):
        scan_table(pa.table({"mail": values}), threshold=0)


def test_name_hints_need_values_that_look_the_part():
    ok = scan_table(pa.table({"Last Name": ["Smith", "O'Brien", "García"] * 4}))
    assert [(p.tag, p.detector, p.confidence) for p in ok] == [("pii.name", "column-name", 0.9)]
    assert scan_table(pa.table({"name": ["A-1234", "B-9999"] * 6})) == []
    dob = scan_table(pa.table({"DOB": pa.array([f"19{y}-01-02" for y in range(50, 62)])}))
    assert [p.tag for p in dob] == ["pii.birth_date"]
    assert scan_table(pa.table({"dob": ["2999-01-01"] * 10})) == []


def test_scan_path_reads_only_the_sample_and_reports_the_schema(tmp_path):
    table = dataset(rows=300)
    pq.write_table(table, tmp_path / "part-0.parquet")
    result = scan_path(tmp_path, sample=120)
    assert result.rows == 120
    assert result.schema["customer_id"] == "int64" and result.schema["email"] == "string"
    assert ("email", "pii.email") in {(p.column, p.tag) for p in result.proposals}
    assert all(p.sampled <= 120 for p in result.proposals)
    csv = tmp_path / "c.csv"
    csv.write_text("card\n" + "4111 1111 1111 1111\n" * 6)
    (p,) = scan_path(csv).proposals
    assert (p.tag, p.evidence) == ("financial.card_number", 6)
    with pytest.raises(ValueError, match="sample"):
        scan_path(csv, sample=0)


# ---- validation through python-stdnum, phonenumbers and email-validator -----------------

needs_libraries = pytest.mark.skipif(
    not all(validators.libraries().values()),
    reason="the scan extra (python-stdnum, phonenumbers, email-validator) is not installed",
)


@needs_libraries
def test_library_validation_on_the_second_labelled_set():
    table = hard_dataset()
    got = measure(pairs(table, threshold=0.8), HARD_LABELS)
    # The numbers reported in docs/governance.md.
    assert (got["precision"], got["recall"]) == (1.0, 1.0)
    with (
        mock.patch.dict(scan._VALUE_CHECKS, validators.value_checks(use_libraries=False)),
        mock.patch.dict(scan._NATIONAL_CHECKS, clear=True),
    ):
        builtin = measure(pairs(table, threshold=0.8), HARD_LABELS)
    # Creditor references taken for IBANs, part numbers for phones; no national ids.
    assert builtin["false_positives"] == 2
    assert builtin["recall"] == pytest.approx(2 / 6)


def _de_iban_of_length(rng_digits: str) -> str:
    """A DE-prefixed string with valid ISO 13616 check digits but ``len(rng_digits)`` BBAN
    digits (Germany's are 18)."""
    return f"DE{mod97_check(rng_digits + 'DE00'):02d}{rng_digits}"


@needs_libraries
@pytest.mark.parametrize(
    "column,values,tag",
    [
        # mod 97 holds, but a German IBAN has 18 BBAN digits, not 20
        ("r", [_de_iban_of_length("1234567890123456789" + str(i)) for i in range(10)], None),
        ("r", [iban(random.Random(i)) for i in range(10)], "financial.iban"),
        # an ISO 11649 creditor reference is no IBAN
        ("r", ["RF18539007547034"] * 10, None),
        # the SSA's never-valid numbers (the advertised wallet card, 219-09-9999)
        ("s", ["078-05-1120", "219-09-9999"] * 5, None),
        # no North American area code starts with 0 or 1
        ("p", ["(123) 456-7890", "012-555-1234"] * 5, None),
        ("p", ["(212) 555-0100", "+1 415 555 0123"] * 5, "pii.phone"),
        ("p", ["+44 20 7946 0958", "+33 1 42 68 53 00"] * 5, "pii.phone"),
        # e-mail syntax: no consecutive dots, no hyphen right after the @
        ("m", ["john..doe@example.org", "ann@-example.org"] * 5, None),
        ("m", ["ann.o'neil@example.org", "bob+tag@mail.example.co.uk"] * 5, "pii.email"),
        # national identity numbers (python-stdnum)
        ("n", ["12345678Z", "87654321X"] * 5, "pii.national_id.es_dni"),
        ("n", ["111222333", "123456782"] * 5, "pii.national_id.nl_bsn"),
        ("n", ["046 454 286"] * 10, None),  # Luhn holds, but no SIN starts with 0
        ("n", [sin(random.Random(i)) for i in range(10)], "pii.national_id.ca_sin"),
        ("n", ["RCCMNL83S18D969H"] * 10, "pii.national_id.it_codice_fiscale"),
        ("n", ["12345678A"] * 10, None),  # wrong DNI letter
    ],
)
def test_library_validators_on_whole_values(column, values, tag):
    found = pairs(pa.table({column: values}))
    assert found == ({(column, tag)} if tag else set())


@needs_libraries
def test_national_numbers_are_read_in_the_phone_region():
    uk = pa.table({"tel": ["020 7946 0958", "0161 496 0000"] * 5})
    assert pairs(uk) == set()
    assert pairs(uk, phone_region="GB") == {("tel", "pii.phone")}
    with pytest.raises(ValueError, match="phone_region"):
        scan_table(uk, phone_region="uk")


def test_without_the_libraries_the_built_in_checks_are_used(monkeypatch):
    monkeypatch.setattr(validators, "_optional", lambda name: None)
    checks = validators.value_checks()
    assert validators.national_id_checks() == {}
    assert checks["card"]("4111111111111111") and not checks["card"]("4111111111111112")
    # The built-in IBAN check is mod 97 alone: it takes what stdnum refuses.
    assert checks["iban"](_de_iban_of_length("12345678901234567890"))
    assert checks["phone"]("(123) 456-7890")
    assert checks["email"]("john..doe@example.org")
    assert not checks["ssn"]("666-12-3456")


@needs_libraries
def test_national_id_checks_run_on_a_column_only_past_the_probe(monkeypatch):
    calls = {"n": 0}
    real = scan._NATIONAL_CHECKS["pii.national_id.nl_bsn"]

    def counted(value: str) -> bool:
        calls["n"] += 1
        return real(value)

    monkeypatch.setitem(scan._NATIONAL_CHECKS, "pii.national_id.nl_bsn", counted)
    scan_table(pa.table({"city": ["Oslo", "Lima"] * 500}))
    assert calls["n"] == scan.NATIONAL_ID_PROBE


@needs_libraries
def test_a_scanned_national_id_is_a_proposal_the_catalog_takes(cc, tmp_path):
    # The scanner proposes pii.national_id.<country>_<id>; the built-in family admits it.
    table = pa.table({"dni": ["12345678Z", "87654321X"] * 5, "city": ["Oslo"] * 10})
    pq.write_table(table, tmp_path / "t.parquet")
    result = scan_path(tmp_path / "t.parquet")
    (proposal,) = result.proposals
    assert proposal.tag == "pii.national_id.es_dni"
    author = cc.client("author")
    resp = author.put(
        "/v1/catalog/datasets/people", json={"owner": "alice", "schema": result.schema}
    )
    assert resp.status_code == 200, resp.text
    resp = author.post(
        "/v1/catalog/datasets/people/proposals", json={"proposals": [proposal.to_dict()]}
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()[0]["tag"] == "pii.national_id.es_dni"
