"""A labelled synthetic corpus of free text for ``text-scrub``: sentences with known PII spans.

Every entity is generated valid by its own definition (Luhn check digit,
ISO 13616 check digits, SSN area rules, octets <= 255), written here
independently of the code under test. Each text also carries distractors
that look like PII and are not: dates, order numbers, versions, prices,
card-shaped numbers failing Luhn, IBANs with wrong check digits, SSNs in
excluded areas, out-of-range octets. ``generate`` returns (text, spans) with
spans as (start, end, entity). Used by tests/core/test_text_scrub.py for
precision and recall and by bench/text_scrub.py for throughput.
"""

from __future__ import annotations

import ipaddress
import random

FIRST = ["ann", "bo", "chen", "dana", "eve", "farid", "gita", "hugo", "ines", "jon"]
DOMAINS = ["example.com", "mail.example.org", "corp.test.io", "uni.example.ac.uk"]


def luhn_digit(payload: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def iban_check(country: str, bban: str) -> str:
    moved = bban + country + "00"
    value = int("".join(str(int(ch, 36)) for ch in moved))
    return f"{98 - value % 97:02d}"


def email(r: random.Random) -> str:
    return f"{r.choice(FIRST)}.{r.choice(FIRST)}{r.randint(1, 99)}@{r.choice(DOMAINS)}"


def phone(r: random.Random) -> str:
    a, b, c = r.randint(201, 989), r.randint(200, 999), r.randint(0, 9999)
    return r.choice(
        [
            f"+1 {a} {b} {c:04d}",
            f"({a}) {b}-{c:04d}",
            f"{a}-{b}-{c:04d}",
            f"{a}.{b}.{c:04d}",
            f"+44 20 {r.randint(7000, 8999)} {c:04d}",
        ]
    )


def card(r: random.Random) -> str:
    payload = r.choice(["4", "51", "52", "37"]) + "".join(str(r.randint(0, 9)) for _ in range(14))
    payload = payload[:15]
    number = payload + luhn_digit(payload)
    sep = r.choice([" ", "-", ""])
    return sep.join(number[i : i + 4] for i in range(0, 16, 4))


def bad_card(r: random.Random) -> str:
    number = card(r).replace(" ", "").replace("-", "")
    wrong = str((int(number[-1]) + r.randint(1, 9)) % 10)
    return " ".join((number[:-1] + wrong)[i : i + 4] for i in range(0, 16, 4))


def iban(r: random.Random) -> str:
    country, bban = r.choice(
        [
            ("DE", "".join(str(r.randint(0, 9)) for _ in range(18))),
            ("GB", "WEST" + "".join(str(r.randint(0, 9)) for _ in range(14))),
            ("FR", "".join(str(r.randint(0, 9)) for _ in range(23))),
        ]
    )
    compact = country + iban_check(country, bban) + bban
    if r.random() < 0.5:
        return compact
    return " ".join(compact[i : i + 4] for i in range(0, len(compact), 4))


def bad_iban(r: random.Random) -> str:
    good = iban(r).replace(" ", "")
    check = int(good[2:4])
    return good[:2] + f"{(check + r.randint(1, 50)) % 97 + 2:02d}"[-2:] + good[4:]


def ssn(r: random.Random) -> str:
    area = r.randint(1, 899)
    area = 667 if area == 666 else area
    return f"{area:03d}-{r.randint(1, 99):02d}-{r.randint(1, 9999):04d}"


def ipv4(r: random.Random) -> str:
    return ".".join(str(r.randint(0, 255)) for _ in range(4))


def ipv6(r: random.Random) -> str:
    address = ipaddress.IPv6Address(r.getrandbits(128))
    return address.compressed if r.random() < 0.5 else address.exploded


MAKERS = {
    "email": email,
    "phone": phone,
    "card": card,
    "iban": iban,
    "ssn": ssn,
    "ipv4": ipv4,
    "ipv6": ipv6,
}

DISTRACTORS = [
    lambda r: f"{r.randint(2000, 2030)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
    lambda r: f"order #{r.randint(10000, 999999)}",
    lambda r: f"v{r.randint(1, 9)}.{r.randint(0, 20)}.{r.randint(0, 99)}",
    lambda r: f"${r.randint(1, 9)},{r.randint(100, 999)}.{r.randint(0, 99):02d}",
    bad_card,
    bad_iban,
    lambda r: f"666-{r.randint(1, 99):02d}-{r.randint(1, 9999):04d}",
    lambda r: f"{r.randint(256, 999)}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(0, 255)}",
    lambda r: f"{r.randint(10, 23)}:{r.randint(10, 59)}",
    lambda r: f"room {r.randint(100, 999)}",
]

TEMPLATES = [
    "Customer wrote from {} about the invoice; see {}.",
    "Please call {} before {} regarding the ticket.",
    "Refund to {} was declined ({}).",
    "Login from {} flagged on {}.",
    "Details: {} / {}. Escalated.",
    "{} — noted by support, {}",
]


def generate(n: int, seed: int = 13) -> list[tuple[str, list[tuple[int, int, str]]]]:
    """``n`` texts, each with one PII entity and one distractor in random order, and the spans."""
    r = random.Random(seed)
    out = []
    entities = list(MAKERS)
    for i in range(n):
        entity = entities[i % len(entities)]
        value = MAKERS[entity](r)
        distractor = r.choice(DISTRACTORS)(r)
        template = r.choice(TEMPLATES)
        if r.random() < 0.5:
            before, after = template.split("{}", 1)
            text = before + value
            spans = [(len(before), len(text), entity)]
            text += after.replace("{}", distractor, 1)
        else:
            before, after = template.split("{}", 1)
            first = before + distractor
            middle, rest = after.split("{}", 1)
            start = len(first) + len(middle)
            text = first + middle + value + rest
            spans = [(start, start + len(value), entity)]
        if r.random() < 0.1:
            # Some texts hold nothing at all.
            text, spans = f"Nothing to see here ({distractor}).", []
        out.append((text, spans))
    return out
