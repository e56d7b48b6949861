"""The tag scanner: validating detectors on whole values, evidence and confidence as counted,
name hints confirmed by the values, and precision/recall on the labelled synthetic set
(with the pattern-only baseline beside it, to show what the validation buys)."""

from __future__ import annotations

from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _synthetic import LABELS, dataset, measure, pattern_only_checks

from cape_pipelines.catalog import scan
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
