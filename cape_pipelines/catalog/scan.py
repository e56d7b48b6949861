"""``cape catalog scan``: sample a dataset and propose catalog tags, with confidence and evidence.

A column is proposed for a tag when most of its sampled values pass a
*validating* detector, not a pattern alone: a value must have the whole shape of
the ``text-scrub`` pattern (:mod:`cape_pipelines.transforms.text_scrub`) and then
pass the identifier's real rules, checked through maintained libraries where they
fit (:mod:`cape_pipelines.catalog.validators`: ``python-stdnum`` for Luhn, IBANs
with their country formats, US SSNs and other countries' national identity
numbers; ``phonenumbers`` for phone numbers; ``email-validator`` for e-mail syntax,
no DNS; ``ipaddress`` for IPv4/IPv6), falling back to the built-in checks when a
library is not installed. National identity numbers (tags
``pii.national_id.<country>_<id>``) are tried on a column only when its first
values pass. Names, birth dates, postal addresses and quasi-identifiers carry no
checksum; they are proposed from column-name hints, confirmed by the share
of values that look the part (letters only for names, a plausible past date
for birth dates), and get a lower confidence. ``confidence`` is the share of
non-null sampled values a detector confirmed (times 0.9 for name hints);
``evidence`` is how many it confirmed. A proposal is only that: the catalog
stores it as pending until a person accepts or rejects it.

The sample is the first ``sample`` rows (files in sorted order), read in
Arrow batches; nothing else is read.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..inputs import CsvOptions, open_inputs
from .validators import national_id_checks, value_checks

__all__ = [
    "DETECTOR_TAGS",
    "NAME_HINTS",
    "Proposal",
    "ScanResult",
    "scan_path",
    "scan_spark_table",
    "scan_table",
]

DETECTOR_TAGS: dict[str, str] = {
    "email": "pii.email",
    "card": "financial.card_number",
    "iban": "financial.iban",
    "ssn": "pii.ssn",
    "ipv4": "pii.ip",
    "ipv6": "pii.ip",
    "phone": "pii.phone",
}

_WORD = re.compile(r"[^\W\d_]+(?:[ '.-][^\W\d_]+){0,4}\.?")
_ADDRESS = re.compile(r"(?=.*\d)(?=.*[^\W\d_]{2}).{5,}")
_ZIP = re.compile(r"[A-Za-z0-9]{2,5}(?:[ -][A-Za-z0-9]{2,4})?")


def _is_name(v: str) -> bool:
    return _WORD.fullmatch(v) is not None


def _is_birth_date(v: str) -> bool:
    try:
        day = dt.date.fromisoformat(v[:10])
    except ValueError:
        return False
    return dt.date(1900, 1, 1) <= day <= dt.date.today()


def _is_age(v: str) -> bool:
    try:
        return 0 <= float(v) <= 130
    except ValueError:
        return False


# tag -> (normalised column names that hint it, check each value must pass)
NAME_HINTS: dict[str, tuple[frozenset[str], Callable[[str], bool]]] = {
    "pii.name": (
        frozenset(
            {
                "name",
                "first_name",
                "firstname",
                "last_name",
                "lastname",
                "full_name",
                "fullname",
                "surname",
                "given_name",
                "family_name",
                "middle_name",
                "maiden_name",
                "customer_name",
                "person_name",
                "contact_name",
            }
        ),
        _is_name,
    ),
    "pii.birth_date": (
        frozenset({"dob", "birth_date", "birthdate", "date_of_birth", "birthday", "born_on"}),
        _is_birth_date,
    ),
    "pii.address": (
        frozenset(
            {
                "address",
                "street",
                "street_address",
                "address_line1",
                "address_line_1",
                "home_address",
                "mailing_address",
                "postal_address",
            }
        ),
        lambda v: _ADDRESS.fullmatch(v) is not None,
    ),
    "quasi_identifier.postcode": (
        frozenset({"zip", "zipcode", "zip_code", "postcode", "post_code", "postal_code"}),
        lambda v: _ZIP.fullmatch(v) is not None,
    ),
    "quasi_identifier.gender": (frozenset({"gender", "sex"}), lambda v: len(v) <= 16),
    "quasi_identifier.age": (frozenset({"age"}), _is_age),
}

HINT_WEIGHT = 0.9


def _normalise(column: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", column.lower()).strip("_")


@dataclass(frozen=True)
class Proposal:
    """One proposed tag for one column, and what supports it."""

    column: str
    tag: str
    confidence: float
    evidence: int
    sampled: int
    detector: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as the catalog's proposals endpoint takes it."""
        return {
            "column": self.column,
            "tag": self.tag,
            "confidence": self.confidence,
            "evidence": self.evidence,
            "sampled": self.sampled,
            "detector": self.detector,
        }


@dataclass(frozen=True)
class ScanResult:
    """A scan: the dataset's schema (column -> Arrow type name), rows sampled, proposals."""

    schema: dict[str, str]
    rows: int
    proposals: list[Proposal] = field(default_factory=list)


def _texts(array: pa.Array | pa.ChunkedArray) -> list[str]:
    """The non-null values as stripped text (numbers and dates in Arrow's text form)."""
    t = array.type
    if pa.types.is_nested(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return []
    if pa.types.is_dictionary(t):
        array = array.cast(t.value_type)
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        try:
            array = pc.cast(array, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return []
    return [v.strip() for v in array.drop_null().to_pylist() if v.strip()]


_VALUE_CHECKS: dict[str, Callable[[str], bool]] = value_checks()
_NATIONAL_CHECKS: dict[str, Callable[[str], bool]] = national_id_checks()
# A national-id check runs on a whole column only if this many of its first values pass
# half of them (a cheap gate: two dozen checks per value would dominate the scan).
NATIONAL_ID_PROBE = 50


def _count(
    values: Counter[str], checks: list[tuple[str, Callable[[str], bool]]], allowed: float
) -> tuple[int, set[str]] | None:
    """(values some check accepts, names of the checks that accepted any), or None once more
    than ``allowed`` values were refused by all of them. Each distinct value is checked
    once and counted as often as it occurs."""
    hits = misses = 0
    matched: set[str] = set()
    for v, times in values.items():
        for name, check in checks:
            if check(v):
                hits += times
                matched.add(name)
                break
        else:
            misses += times
            if misses > allowed:
                return None
    return hits, matched


def _column_proposals(
    column: str,
    values: list[str],
    threshold: float,
    min_evidence: int,
    checks: dict[str, Callable[[str], bool]] | None = None,
) -> list[Proposal]:
    n = len(values)
    if n == 0:
        return []
    need = min(min_evidence, n)
    out: list[Proposal] = []
    # More misses than this and the confidence cannot reach the threshold (rounded to three
    # places): the count stops there, which keeps the library checks off most columns.
    allowed = n - n * (threshold - 0.0005)
    distinct = Counter(values)
    checks = checks if checks is not None else _VALUE_CHECKS
    by_tag: dict[str, list[str]] = {}
    for entity, tag in DETECTOR_TAGS.items():
        by_tag.setdefault(tag, []).append(entity)
    for tag, entities in by_tag.items():
        counted = _count(distinct, [(e, checks[e]) for e in entities], allowed)
        if counted is None:
            continue
        hits, matched = counted
        confidence = round(hits / n, 3)
        if confidence >= threshold and hits >= need:
            names = "+".join(e for e in entities if e in matched)
            out.append(Proposal(column, tag, confidence, hits, n, names))
    probe = values[:NATIONAL_ID_PROBE]
    for tag, check in _NATIONAL_CHECKS.items():
        if sum(1 for v in probe if check(v)) * 2 < len(probe):
            continue
        name = tag.rsplit(".", 1)[1]
        counted = _count(distinct, [(name, check)], allowed)
        if counted is None:
            continue
        hits = counted[0]
        confidence = round(hits / n, 3)
        if confidence >= threshold and hits >= need:
            out.append(Proposal(column, tag, confidence, hits, n, name))
    key = _normalise(column)
    for tag, (hinted, check) in NAME_HINTS.items():
        if key not in hinted:
            continue
        hits = sum(1 for v in values if check(v))
        confidence = round(HINT_WEIGHT * hits / n, 3)
        if confidence >= threshold * HINT_WEIGHT and hits >= need:
            out.append(Proposal(column, tag, confidence, hits, n, "column-name"))
    return out


def scan_table(
    table: pa.Table,
    *,
    threshold: float = 0.8,
    min_evidence: int = 5,
    phone_region: str = "US",
) -> list[Proposal]:
    """Proposals for the columns of an Arrow table (already sampled). ``phone_region``: the
    ISO 3166 country national phone numbers (no ``+``) are read in."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError("threshold must be in (0, 1]")
    if not re.fullmatch(r"[A-Z]{2}", phone_region):
        raise ValueError("phone_region must be a two-letter country code such as US")
    checks = None if phone_region == "US" else value_checks(phone_region)
    out: list[Proposal] = []
    for name in table.column_names:
        out.extend(_column_proposals(name, _texts(table[name]), threshold, min_evidence, checks))
    return out


def _head(batches: Iterable[pa.RecordBatch], schema: pa.Schema, rows: int) -> pa.Table:
    taken: list[pa.RecordBatch] = []
    have = 0
    for batch in batches:
        if have >= rows:
            break
        taken.append(batch.slice(0, rows - have))
        have += taken[-1].num_rows
    return pa.Table.from_batches(taken, schema=schema) if taken else schema.empty_table()


def scan_path(
    path: str | Path,
    *,
    sample: int = 10_000,
    threshold: float = 0.8,
    min_evidence: int = 5,
    csv_options: CsvOptions | None = None,
    phone_region: str = "US",
) -> ScanResult:
    """Scan the first ``sample`` rows of a CSV/Parquet file or directory.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "t.csv").write_text("mail\\n" + "ann@example.com\\n" * 6)
    >>> [(p.column, p.tag, p.evidence) for p in scan_path(d / "t.csv").proposals]
    [('mail', 'pii.email', 6)]
    """
    if sample < 1:
        raise ValueError("sample must be at least 1 row")
    inputs = open_inputs(path, csv_options=csv_options)
    schema = inputs.schema
    table = _head((b for _, b in inputs.batches(min(sample, 65_536))), schema, sample)
    return ScanResult(
        schema={f.name: str(f.type) for f in schema},
        rows=table.num_rows,
        proposals=scan_table(
            table, threshold=threshold, min_evidence=min_evidence, phone_region=phone_region
        ),
    )


# A table name as Spark SQL takes it: dotted identifiers, each plain or back-quoted (so a
# path table such as parquet.`/data/customers` works too); nothing else reaches the SQL.
_SPARK_TABLE = re.compile(
    r"(?:[A-Za-z_][A-Za-z0-9_]*|`[^`]+`)(?:\.(?:[A-Za-z_][A-Za-z0-9_]*|`[^`]+`))*"
)


def scan_spark_table(
    spark: Any,
    table: str,
    *,
    sample: int = 10_000,
    threshold: float = 0.8,
    min_evidence: int = 5,
    phone_region: str = "US",
) -> ScanResult:
    """Scan the first ``sample`` rows of a Spark table (``db.table``, a temporary view, or
    ``parquet.`/path```), collected to the driver as Arrow."""
    if sample < 1:
        raise ValueError("sample must be at least 1 row")
    if not _SPARK_TABLE.fullmatch(table):
        raise ValueError(f"not a Spark table name: {table!r}")
    frame = spark.sql(f"SELECT * FROM {table}").limit(sample)  # noqa: S608 - name checked above
    arrow = frame.toArrow()
    return ScanResult(
        schema={f.name: str(f.type) for f in arrow.schema},
        rows=arrow.num_rows,
        proposals=scan_table(
            arrow, threshold=threshold, min_evidence=min_evidence, phone_region=phone_region
        ),
    )
