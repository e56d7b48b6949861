"""A labelled synthetic dataset for measuring the tag scanner: columns of personal data in
the shapes they take in practice, and decoys that a regex alone would mistake for them
(order numbers of card length, IBAN-shaped references with wrong check digits, dates,
version strings, free text that merely contains an address). Seeded, so the measured
precision and recall are reproducible; ``python tests/catalog/_synthetic.py`` prints them
(the numbers in docs/governance.md)."""

from __future__ import annotations

import random
import string

import pyarrow as pa

FIRST = ["Ann", "Bob", "Chloé", "Dmitri", "Eve", "Farah", "Günter", "Hana", "Ivan", "Jo-Anne"]
LAST = ["Smith", "O'Brien", "Nguyen", "García", "Müller", "Kowalski", "Ito", "Okafor", "Dupont"]
STREETS = ["Main Street", "Rue de Rivoli", "Baker St", "Hauptstraße", "Elm Avenue"]


def luhn_digit(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def iban(rng: random.Random, country: str = "DE") -> str:
    bban = "".join(rng.choice(string.digits) for _ in range(18))
    moved = bban + country + "00"
    check = 98 - int("".join(str(int(c, 36)) for c in moved)) % 97
    return f"{country}{check:02d}{bban}"


def card(rng: random.Random) -> str:
    body = "4" + "".join(rng.choice(string.digits) for _ in range(14))
    digits = body + luhn_digit(body)
    if rng.random() < 0.3:
        return " ".join(digits[i : i + 4] for i in range(0, 16, 4))
    return digits


def ssn(rng: random.Random) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    return f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"


def ip(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return ".".join(str(rng.randint(0, 255)) for _ in range(4))
    return ":".join(f"{rng.randint(0, 0xFFFF):x}" for _ in range(8))


def phone(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"+1 {rng.randint(200, 999)} 555 {rng.randint(0, 9999):04d}"
    return f"({rng.randint(200, 999)}) 555-{rng.randint(0, 9999):04d}"


def version(rng: random.Random) -> str:
    """A version string; one in ten has four parts (dotted like an IPv4 address)."""
    four = rng.random() < 0.1
    parts = [rng.randint(1, 9), rng.randint(0, 20), rng.randint(0, 99)]
    if four:
        parts.append(rng.randint(0, 999))
    return ".".join(map(str, parts))


def email(rng: random.Random) -> str:
    user = rng.choice(FIRST).lower().replace("é", "e").replace("ü", "u").replace("-", "")
    return f"{user}.{rng.randint(1, 999)}@example{rng.randint(1, 9)}.com"


# column -> tags it truly holds (empty: not personal data)
LABELS: dict[str, set[str]] = {
    "customer_id": set(),
    "first_name": {"pii.name"},
    "last_name": {"pii.name"},
    "email": {"pii.email"},
    "phone": {"pii.phone"},
    "ssn": {"pii.ssn"},
    "card_number": {"financial.card_number"},
    "iban": {"financial.iban"},
    "client_ip": {"pii.ip"},
    "dob": {"pii.birth_date"},
    "address": {"pii.address"},
    "zip": {"quasi_identifier.postcode"},
    "age": {"quasi_identifier.age"},
    # a column holding e-mail addresses and phone numbers half and half
    "contact": {"pii.email", "pii.phone"},
    # decoys
    "order_number": set(),
    "reference": set(),
    "amount": set(),
    "created_at": set(),
    "app_version": set(),
    "note": set(),
    "status": set(),
    "product_name": set(),
}


def dataset(rows: int = 2000, seed: int = 11) -> pa.Table:
    """The labelled table (see :data:`LABELS`)."""
    rng = random.Random(seed)

    def col(make: object) -> list[object]:
        return [make() for _ in range(rows)]  # type: ignore[operator]

    data: dict[str, list[object]] = {
        "customer_id": list(range(1, rows + 1)),
        "first_name": col(lambda: rng.choice(FIRST)),
        "last_name": col(lambda: rng.choice(LAST)),
        "email": col(lambda: email(rng)),
        "phone": col(lambda: phone(rng)),
        "ssn": col(lambda: ssn(rng)),
        "card_number": col(lambda: card(rng)),
        "iban": col(lambda: iban(rng)),
        "client_ip": col(lambda: ip(rng)),
        "dob": col(
            lambda: f"{rng.randint(1940, 2005)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        ),
        "address": col(lambda: f"{rng.randint(1, 250)} {rng.choice(STREETS)}"),
        "zip": col(lambda: f"{rng.randint(10000, 99999)}"),
        "age": col(lambda: rng.randint(18, 90)),
        "contact": col(lambda: email(rng) if rng.random() < 0.5 else phone(rng)),
        # 16 digits: about one in ten passes Luhn by chance
        "order_number": col(lambda: "".join(rng.choice(string.digits) for _ in range(16))),
        # IBAN-shaped, check digits random: about one in a hundred is valid by chance
        "reference": col(lambda: "DE" + "".join(rng.choice(string.digits) for _ in range(20))),
        "amount": col(lambda: round(rng.uniform(1, 5000), 2)),
        "created_at": col(lambda: f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"),
        "app_version": col(lambda: version(rng)),
        "note": col(lambda: f"customer {email(rng)} asked about order {rng.randint(1000, 9999)}"),
        "status": col(lambda: rng.choice(["new", "paid", "shipped", "returned"])),
        "product_name": col(lambda: rng.choice(["Desk Lamp", "Chair", "Kettle", "Mug"])),
    }
    return pa.table(data)


def measure(proposed: set[tuple[str, str]]) -> dict[str, float | int]:
    """Precision and recall of ``proposed`` (column, tag) pairs against :data:`LABELS`."""
    truth = {(c, t) for c, tags in LABELS.items() for t in tags}
    tp = len(proposed & truth)
    return {
        "true_positives": tp,
        "false_positives": len(proposed - truth),
        "false_negatives": len(truth - proposed),
        "precision": tp / len(proposed) if proposed else 1.0,
        "recall": tp / len(truth),
    }


def pattern_only_checks() -> dict[str, object]:
    """The scanner's value checks with the validation taken out (the patterns alone): the
    baseline the validating detectors are measured against."""
    from cape_pipelines.transforms.text_scrub import _DETECTORS

    return {e: (lambda v, p=p: p.fullmatch(v) is not None) for e, (p, _) in _DETECTORS.items()}


if __name__ == "__main__":
    import sys
    from pathlib import Path
    from unittest import mock

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from cape_pipelines.catalog import scan

    table = dataset()
    truth = {(c, t) for c, ts in LABELS.items() for t in ts}
    for threshold in (0.5, 0.8, 0.95):
        pairs = {(p.column, p.tag) for p in scan.scan_table(table, threshold=threshold)}
        print("validated", threshold, measure(pairs), sorted(pairs - truth), sorted(truth - pairs))
        with mock.patch.dict(scan._VALUE_CHECKS, pattern_only_checks()):
            pairs = {(p.column, p.tag) for p in scan.scan_table(table, threshold=threshold)}
        print("pattern", threshold, measure(pairs), sorted(pairs - truth))
