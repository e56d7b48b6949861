"""Generate the bundled sample dataset ``cape_pipelines/data/customers.csv``.

Every value is synthetic: names from short lists, e-mail addresses on the
reserved ``example.*`` domains, phone numbers in the fictional 555-01xx range,
and social security numbers in the 9xx area, which is never issued. The
generator is seeded, so running it again gives the same file byte for byte.

    python scripts/make_sample_data.py [--rows 1000] [--out PATH]
"""

from __future__ import annotations

import argparse
import csv
import random
from datetime import date, datetime, timedelta
from pathlib import Path

FIRST = [
    "Ada",
    "Ben",
    "Chloe",
    "Dmitri",
    "Elena",
    "Farah",
    "Gustav",
    "Hana",
    "Ivan",
    "Jules",
    "Kofi",
    "Lena",
    "Mateo",
    "Nadia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tariq",
    "Uma",
    "Victor",
    "Wen",
    "Ximena",
    "Yusuf",
    "Zoe",
    "Amara",
    "Björn",
    "Céline",
    "José",
]
LAST = [
    "Abara",
    "Becker",
    "Castillo",
    "Dubois",
    "Eriksen",
    "Fischer",
    "García",
    "Haddad",
    "Ito",
    "Jensen",
    "Kowalski",
    "Lopez",
    "Müller",
    "Nakamura",
    "Okafor",
    "Petrov",
    "Quispe",
    "Rossi",
    "Silva",
    "Tanaka",
    "Usman",
    "Varga",
    "Wójcik",
    "Xu",
    "Yilmaz",
    "Zhang",
]
COUNTRIES = ["US", "GB", "DE", "FR", "CA", "IN", "BR", "JP", "AU", "NL"]
COUNTRY_WEIGHTS = [30, 12, 10, 8, 8, 10, 7, 6, 5, 4]
DOMAINS = ["example.com", "example.org", "example.net"]
REFERENCE_DAY = date(2025, 6, 30)
SEED = 20250630


def _age(born: date) -> int:
    years = REFERENCE_DAY.year - born.year
    return years - ((REFERENCE_DAY.month, REFERENCE_DAY.day) < (born.month, born.day))


def rows(n: int, seed: int = SEED) -> list[dict[str, object]]:
    """``n`` synthetic customer rows."""
    rng = random.Random(seed)
    out = []
    first_day = date(1945, 1, 1).toordinal()
    last_day = date(2011, 12, 31).toordinal()
    signup_start = datetime(2021, 1, 1)
    signup_span = int((datetime(2025, 6, 1) - signup_start).total_seconds())
    for i in range(n):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        born = date.fromordinal(rng.randint(first_day, last_day))
        age = _age(born)
        local = f"{first}.{last}".lower().encode("ascii", "ignore").decode()
        email = f"{local}{rng.randint(1, 999)}@{rng.choice(DOMAINS)}"
        phone = f"+1-{rng.randint(201, 989)}-555-01{rng.randint(0, 99):02d}"
        ssn = f"9{rng.randint(0, 99):02d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
        if age < 18 or rng.random() < 0.03:
            salary = ""
        else:
            salary = str(int(round(rng.lognormvariate(10.9, 0.45), -1)))
        signup = signup_start + timedelta(seconds=rng.randrange(signup_span))
        out.append(
            {
                "customer_id": 100_001 + i,
                "name": f"{first} {last}",
                "email": email,
                "phone": phone,
                "ssn": ssn,
                "birthdate": born.isoformat(),
                "age": age,
                "country": rng.choices(COUNTRIES, COUNTRY_WEIGHTS)[0],
                "salary": salary,
                "signup": signup.strftime("%Y-%m-%d %H:%M:%S"),
            }
        )
    return out


def main() -> None:
    default_out = (
        Path(__file__).resolve().parent.parent / "cape_pipelines" / "data" / "customers.csv"
    )
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=default_out)
    args = ap.parse_args()
    data = rows(args.rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(data[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(data)
    print(f"wrote {len(data)} rows to {args.out}")


if __name__ == "__main__":
    main()
