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


# Area codes in service (North American Numbering Plan): a real phone column holds numbers
# of real numbering plans, which libphonenumber's validation checks.
AREA_CODES = [201, 202, 206, 212, 213, 214, 303, 305, 312, 404, 415, 503, 512, 602, 617, 646]


def phone(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"+1 {rng.choice(AREA_CODES)} 555 {rng.randint(0, 9999):04d}"
    return f"({rng.choice(AREA_CODES)}) 555-{rng.randint(0, 9999):04d}"


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


# The second labelled set: national identity numbers of four countries, and decoys that
# pass the built-in checks but not the identifiers' real rules.
HARD_LABELS: dict[str, set[str]] = {
    "nir": {"pii.national_id.fr_nir"},
    "dni": {"pii.national_id.es_dni"},
    "bsn": {"pii.national_id.nl_bsn"},
    "sin": {"pii.national_id.ca_sin"},
    "phone": {"pii.phone"},
    "iban": {"financial.iban"},
    # ISO 11649 creditor references: RF, two mod-97 check digits, the reference. They pass
    # ISO 13616's mod 97 like an IBAN, but RF is no country.
    "payment_reference": set(),
    # Part numbers written 3-3-4 like North American phone numbers, but no area code
    # starts with 0 or 1.
    "part_number": set(),
    # Nine-digit account numbers: about one in ten passes Luhn (SIN) or 11-proof (BSN).
    "account_no": set(),
}


def mod97_check(body: str) -> int:
    """The ISO 7064 mod 97-10 check digits for ``body`` (letters as 10..35), as IBANs and
    creditor references carry them after their two-letter prefix."""
    return 98 - int("".join(str(int(c, 36)) for c in body)) % 97


def creditor_reference(rng: random.Random) -> str:
    ref = "".join(rng.choice(string.digits) for _ in range(21))
    return f"RF{mod97_check(ref + 'RF00'):02d}{ref}"


def nir(rng: random.Random) -> str:
    """A French NIR: sex, year, month, department, commune, order; key = 97 - n mod 97."""
    body = (
        f"{rng.choice([1, 2])}{rng.randint(40, 99):02d}{rng.randint(1, 12):02d}"
        f"{rng.randint(1, 95):02d}{rng.randint(1, 999):03d}{rng.randint(1, 999):03d}"
    )
    return f"{body}{97 - int(body) % 97:02d}"


def dni(rng: random.Random) -> str:
    """A Spanish DNI: eight digits and the letter of their value mod 23."""
    number = rng.randint(10_000_000, 99_999_999)
    return f"{number}{'TRWAGMYFPDXBNJZSQVHLCKE'[number % 23]}"


def bsn(rng: random.Random) -> str:
    """A Dutch BSN: nine digits passing the 11-proof (weights 9..2, and -1 for the last)."""
    while True:
        digits = [rng.randint(0, 9) for _ in range(8)]
        total = sum(d * w for d, w in zip(digits, range(9, 1, -1), strict=True))
        last = total % 11
        if last < 10 and digits[0] != 0:
            return "".join(map(str, digits)) + str(last)


def sin(rng: random.Random) -> str:
    """A Canadian SIN: nine digits passing Luhn, not starting with 0 or 8."""
    body = str(rng.choice([1, 2, 3, 4, 5, 6, 7, 9])) + "".join(
        rng.choice(string.digits) for _ in range(7)
    )
    return body + luhn_digit(body)


def hard_dataset(rows: int = 2000, seed: int = 23) -> pa.Table:
    """The second labelled table (see :data:`HARD_LABELS`)."""
    rng = random.Random(seed)

    def col(make: object) -> list[object]:
        return [make() for _ in range(rows)]  # type: ignore[operator]

    return pa.table(
        {
            "nir": col(lambda: nir(rng)),
            "dni": col(lambda: dni(rng)),
            "bsn": col(lambda: bsn(rng)),
            "sin": col(lambda: sin(rng)),
            "phone": col(lambda: phone(rng)),
            "iban": col(lambda: iban(rng)),
            "payment_reference": col(lambda: creditor_reference(rng)),
            "part_number": col(
                lambda: (
                    f"{rng.randint(0, 199):03d}-{rng.randint(0, 999):03d}-"
                    f"{rng.randint(0, 9999):04d}"
                )
            ),
            "account_no": col(lambda: f"{rng.randint(100_000_000, 999_999_999)}"),
        }
    )


def measure(
    proposed: set[tuple[str, str]], labels: dict[str, set[str]] | None = None
) -> dict[str, float | int]:
    """Precision and recall of ``proposed`` (column, tag) pairs against ``labels``
    (default :data:`LABELS`)."""
    truth = {(c, t) for c, tags in (labels or LABELS).items() for t in tags}
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
    from cape_pipelines.catalog.validators import value_checks

    hard = hard_dataset()
    for libraries in (True, False):
        with (
            mock.patch.dict(scan._VALUE_CHECKS, value_checks(use_libraries=libraries)),
            mock.patch.dict(scan._NATIONAL_CHECKS, clear=not libraries),
        ):
            pairs = {(p.column, p.tag) for p in scan.scan_table(hard, threshold=0.8)}
        print("hard", "libraries" if libraries else "built-in", measure(pairs, HARD_LABELS))
    for threshold in (0.5, 0.8, 0.95):
        pairs = {(p.column, p.tag) for p in scan.scan_table(table, threshold=threshold)}
        print("validated", threshold, measure(pairs), sorted(pairs - truth), sorted(truth - pairs))
        with mock.patch.dict(scan._VALUE_CHECKS, pattern_only_checks()):
            pairs = {(p.column, p.tag) for p in scan.scan_table(table, threshold=threshold)}
        print("pattern", threshold, measure(pairs), sorted(pairs - truth))
