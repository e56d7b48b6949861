"""The one table of cross-engine cases: input table, policy, keys, and the single expectation.

Every engine must produce the expectation byte for byte (pandas-based engines
after the one dtype round trip of ``runners.normalise``). Expectations are
written out literally; tokens are computed here from the published formulas of
POLICY.md (HMAC-SHA256, SHA-256 of value and key, AES-SIV), independently of
the core; only perturbations, whose noise is a keyed PRF the core defines, take
their expectation from the core's ``apply_table`` (``FROM_CORE``), with a
``check`` that the expectation has the properties POLICY.md promises.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pyarrow as pa
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

TOKEN_KEY = b"cape-parity-tokenizer-key-000001"
SIV_KEY = bytes(range(32))
NOISE_KEY = b"cape-parity-noise-key-0000000001"
KEYS = {"tok": TOKEN_KEY, "siv": SIV_KEY, "noise": NOISE_KEY}

FROM_CORE = "from-core"
UTC = dt.UTC


def hmac_token(value: str | None, length: int | None = None) -> str | None:
    """POLICY.md: lower-case hex of HMAC-SHA256(key, utf8(value)), cut to ``length``."""
    if value is None:
        return None
    return hmac.new(TOKEN_KEY, value.encode("utf-8"), "sha256").hexdigest()[:length]


def cape_sha256_token(value: str | None) -> str | None:
    """POLICY.md (cape-python): lower-case hex of SHA-256(utf8(value) || key)."""
    if value is None:
        return None
    return hashlib.sha256(value.encode("utf-8") + TOKEN_KEY).hexdigest()


def siv_token(value: str | None) -> str | None:
    """POLICY.md (cape-python): hex(SIV tag || ciphertext), AES-SIV with no associated data."""
    if value is None:
        return None
    return AESSIV(SIV_KEY).encrypt(value.encode("utf-8"), None).hex()


@dataclass(frozen=True)
class Case:
    """One row of the table. ``expected`` is a table, or ``FROM_CORE``."""

    name: str
    input: pa.Table
    policy: dict[str, Any]
    expected: pa.Table | str
    keys: dict[str, bytes] = field(default_factory=lambda: dict(KEYS))
    check: Callable[[pa.Table, pa.Table], None] | None = None

    def transform_types(self) -> set[str]:
        """The transformation ``type`` names the policy uses (for the pending-module check)."""
        found = {t["type"] for t in self.policy.get("transformations", [])}
        for rule in self.policy["rules"]:
            for action in rule["actions"]:
                if action == "drop":
                    found.add("column-redact")
                elif "type" in action["transform"]:
                    found.add(action["transform"]["type"])
        return found


def policy(*rules: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A policy dict with a fixed label around ``rules``."""
    return {"label": "parity", "rules": list(rules), **extra}


def on(column: str, transform: dict[str, Any] | str) -> dict[str, Any]:
    """A rule applying one action to one column."""
    action = transform if transform == "drop" else {"transform": transform}
    return {"match": {"name": column}, "actions": [action]}


def rows(condition: str) -> dict[str, Any]:
    """A row-redact rule."""
    return {"actions": [{"transform": {"type": "row-redact", "condition": condition}}]}


# -- shared inputs -------------------------------------------------------------------------

WORDS = ["alice", "Zoë", "", None, "李雷", "🙂 emoji", "alice"]

STRINGS = pa.table({"id": pa.array(range(len(WORDS)), pa.int64()), "s": pa.array(WORDS)})

# Enough values per batch for the tokenizer's native batch hash (DataFusion, 2,048 values
# and up) on every engine's batches, with nulls, repeats and multi-byte text among them.
MANY_WORDS = [
    None if i % 97 == 0 else f"user{i % 11_000}@exämple.com" + "é" * (i % 70) for i in range(12_000)
]
MANY = pa.table({"id": pa.array(range(len(MANY_WORDS)), pa.int64()), "s": pa.array(MANY_WORDS)})

NS = pa.timestamp("ns")
US_UTC = pa.timestamp("us", tz="UTC")
NS_PARIS = pa.timestamp("ns", tz="Europe/Paris")

EVERY_TYPE = pa.table(
    {
        "i8": pa.array([1, None, -128, 127], pa.int8()),
        "i16": pa.array([1250, -1350, None, 32767], pa.int16()),
        "i32": pa.array([None, 7, -7, 2_000_000_000], pa.int32()),
        "i64": pa.array([1, 2, 3, None], pa.int64()),
        "f64": pa.array([0.25, None, -2.5, 3.5], pa.float64()),
        "dec": pa.array(
            [Decimal("1.25"), Decimal("-3.35"), None, Decimal("99999999.99")], pa.decimal128(10, 2)
        ),
        "s": pa.array(["a", None, "", "Zoë"], pa.string()),
        "b": pa.array([True, None, False, True], pa.bool_()),
        "d": pa.array(
            [dt.date(2020, 1, 31), None, dt.date(1969, 12, 31), dt.date(2262, 4, 1)], pa.date32()
        ),
        "ts_ns": pa.array([1_600_000_000_123_456_789, None, -1, 0], NS),
        "ts_utc": pa.array(
            [
                dt.datetime(2021, 3, 4, 5, 6, 7, 891011, tzinfo=UTC),
                None,
                dt.datetime(1960, 1, 1, tzinfo=UTC),
                dt.datetime(2030, 12, 31, 23, 59, 59, tzinfo=UTC),
            ],
            US_UTC,
        ),
        "ts_paris": pa.array([1_600_000_000_000_000_001, 2, None, 3], NS_PARIS),
    }
)

PEOPLE = pa.table(
    {
        "id": pa.array([1, 2, 3, 4, 5, 6], pa.int64()),
        "name": pa.array(["Ann", "Bo", None, "Zoë", "", "Eve"]),
        "age": pa.array([34, 17, 52, None, 18, 70], pa.int32()),
        "country": pa.array(["US", "XX", "FR", "DE", None, "YY"]),
        "ssn": pa.array(["111", "222", "333", None, "555", "666"]),
    }
)

# Two patients' visits interleaved, so every partitioning splits each patient's rows.
VISITS = pa.table(
    {
        "patient": pa.array(["p1", "p2"] * 6),
        "visit": pa.array(
            [dt.date(2020, 1, 1) + dt.timedelta(days=10 * i) for i in range(12)], pa.date32()
        ),
        "at": pa.array([1_577_836_800_000_000_000 + i * 3_600_000_000_123 for i in range(12)], NS),
        "dose": pa.array([10, 20, None, 40, 50, 60, 70, 80, 90, None, 110, 120], pa.int32()),
    }
)


def _with(table: pa.Table, name: str, array: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, array)


def _only(table: pa.Table, *names: str) -> pa.Table:
    return table.select(list(names))


# -- checks of expectations taken from the core -----------------------------------------


def _noise_within(column: str, low: float, high: float) -> Callable[[pa.Table, pa.Table], None]:
    def check(inp: pa.Table, out: pa.Table) -> None:
        assert out.schema.field(column).type == inp.schema.field(column).type
        before, after = inp.column(column).to_pylist(), out.column(column).to_pylist()
        for a, b in zip(before, after, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert low <= b - a < high, (column, a, b)
        assert before != after, f"{column} was not perturbed"

    return check


def _same_shift_per(entity: str, *columns: str) -> Callable[[pa.Table, pa.Table], None]:
    def check(inp: pa.Table, out: pa.Table) -> None:
        ids = inp.column(entity).to_pylist()
        for col in columns:
            shifts: dict[Any, set[Any]] = {}
            before, after = inp.column(col).to_pylist(), out.column(col).to_pylist()
            for who, a, b in zip(ids, before, after, strict=True):
                assert (a is None) == (b is None)
                if a is not None:
                    shifts.setdefault(who, set()).add(b - a)
            assert all(len(s) == 1 for s in shifts.values()), (col, shifts)
            assert len({next(iter(s)) for s in shifts.values()}) > 1, "every entity moved alike"

    return check


def _shift_within(column: str, low: dt.timedelta, high: dt.timedelta) -> Callable[..., None]:
    """Each non-null date/timestamp moved by an amount in [low, high] (nulls stay null)."""

    def check(inp: pa.Table, out: pa.Table) -> None:
        typ = inp.schema.field(column).type
        unit = "D" if pa.types.is_date(typ) else typ.unit
        as_int = pa.int32() if pa.types.is_date32(typ) else pa.int64()
        before = inp.column(column).combine_chunks().view(as_int).to_pylist()
        after = out.column(column).combine_chunks().view(as_int).to_pylist()
        per = {"D": 86_400, "s": 1, "ms": 10**-3, "us": 10**-6, "ns": 10**-9}[unit]
        for a, b in zip(before, after, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                moved = dt.timedelta(seconds=(b - a) * per)
                assert low <= moved <= high, (column, a, b, moved)

    return check


def _unchanged(*columns: str) -> Callable[[pa.Table, pa.Table], None]:
    def check(inp: pa.Table, out: pa.Table) -> None:
        for c in columns:
            assert out.column(c).equals(inp.column(c)), c

    return check


def _keeps_types(inp: pa.Table, out: pa.Table) -> None:
    assert out.schema.equals(inp.schema)
    for name in inp.column_names:
        assert inp.column(name).null_count == out.column(name).null_count


def _all(*checks: Callable[[pa.Table, pa.Table], None]) -> Callable[[pa.Table, pa.Table], None]:
    def check(inp: pa.Table, out: pa.Table) -> None:
        for c in checks:
            c(inp, out)

    return check


# -- the table -----------------------------------------------------------------------------

CASES: list[Case] = [
    Case(
        # Unicode, empty string, null and a repeated value; full-length HMAC tokens.
        "tokenizer-hmac-strings",
        STRINGS,
        policy(on("s", {"type": "tokenizer", "key": {"secret": "tok"}})),
        _with(STRINGS, "s", pa.array([hmac_token(w) for w in WORDS], pa.string())),
    ),
    Case(
        "tokenizer-hmac-many-values",
        MANY,
        policy(
            on("s", {"type": "tokenizer", "key": {"secret": "tok"}}),
            {
                "match": {"name": "id"},
                "actions": [
                    {
                        "transform": {
                            "type": "tokenizer",
                            "key": {"secret": "tok"},
                            "algorithm": "cape-sha256",
                            "max_token_len": 20,
                        }
                    }
                ],
            },
        ),
        pa.table(
            {
                "id": pa.array([cape_sha256_token(str(i))[:20] for i in range(len(MANY_WORDS))]),
                "s": pa.array([hmac_token(w) for w in MANY_WORDS], pa.string()),
            }
        ),
    ),
    Case(
        "tokenizer-hmac-max-len",
        STRINGS,
        policy(on("s", {"type": "tokenizer", "key": {"secret": "tok"}, "max_token_len": 10})),
        _with(STRINGS, "s", pa.array([hmac_token(w, 10) for w in WORDS], pa.string())),
    ),
    Case(
        "tokenizer-cape-sha256",
        STRINGS,
        policy(
            on("s", {"type": "tokenizer", "key": {"secret": "tok"}, "algorithm": "cape-sha256"})
        ),
        _with(STRINGS, "s", pa.array([cape_sha256_token(w) for w in WORDS], pa.string())),
    ),
    Case(
        # Non-string values are tokenized from their canonical text: str(int), ISO-8601 dates.
        "tokenizer-int-and-date",
        _only(EVERY_TYPE, "i8", "i64", "d"),
        policy(
            {
                "match": {"names": ["i8", "i64", "d"]},
                "actions": [{"transform": {"type": "tokenizer", "key": {"secret": "tok"}}}],
            }
        ),
        pa.table(
            {
                "i8": pa.array([hmac_token("1"), None, hmac_token("-128"), hmac_token("127")]),
                "i64": pa.array([hmac_token("1"), hmac_token("2"), hmac_token("3"), None]),
                "d": pa.array(
                    [
                        hmac_token("2020-01-31"),
                        None,
                        hmac_token("1969-12-31"),
                        hmac_token("2262-04-01"),
                    ]
                ),
            }
        ),
    ),
    Case(
        "reversible-tokenizer",
        STRINGS,
        policy(on("s", {"type": "reversible-tokenizer", "key": {"secret": "siv"}})),
        _with(STRINGS, "s", pa.array([siv_token(w) for w in WORDS], pa.string())),
    ),
    Case(
        "token-reverser",
        _with(STRINGS, "s", pa.array([siv_token(w) for w in WORDS], pa.string())),
        policy(on("s", {"type": "token-reverser", "key": {"secret": "siv"}})),
        STRINGS,
    ),
    Case(
        # A forged token gives null with on_error: null, never the wrong plaintext.
        "token-reverser-on-error-null",
        pa.table({"s": pa.array([siv_token("ok"), "00" * 20, None, siv_token("Zoë")])}),
        policy(on("s", {"type": "token-reverser", "key": {"secret": "siv"}, "on_error": "null"})),
        pa.table({"s": pa.array(["ok", None, None, "Zoë"])}),
    ),
    Case(
        "reversible-round-trip",
        STRINGS,
        policy(
            {
                "match": {"name": "s"},
                "actions": [
                    {"transform": {"type": "reversible-tokenizer", "key": {"secret": "siv"}}},
                    {"transform": {"type": "token-reverser", "key": {"secret": "siv"}}},
                ],
            }
        ),
        STRINGS,
    ),
    Case(
        # int8/int16/int32/int64 stay their type; floats get float noise.
        "numeric-perturbation-ints-and-float",
        _only(EVERY_TYPE, "i8", "i16", "i32", "i64", "f64"),
        policy(
            {
                "match": {"names": ["i16", "i32", "i64", "f64"]},
                "actions": [
                    {"transform": {"type": "numeric-perturbation", "min": -5, "max": 5, "seed": 42}}
                ],
            }
        ),
        FROM_CORE,
        check=_all(
            *(_noise_within(c, -5, 5) for c in ("i16", "i32", "i64", "f64")), _unchanged("i8")
        ),
    ),
    Case(
        # One patient's rows sit in every partition; each patient moves by one amount.
        "numeric-perturbation-context",
        VISITS,
        policy(
            on(
                "dose",
                {
                    "type": "numeric-perturbation",
                    "min": -100,
                    "max": 100,
                    "key": {"secret": "noise"},
                    "context": "patient",
                },
            )
        ),
        FROM_CORE,
        check=_all(_same_shift_per("patient", "dose"), _noise_within("dose", -100, 100)),
    ),
    Case(
        "date-perturbation-context",
        VISITS,
        policy(
            {
                "match": {"names": ["visit", "at"]},
                "actions": [
                    {
                        "transform": {
                            "type": "date-perturbation",
                            "frequency": "DAY",
                            "min": -30,
                            "max": 30,
                            "key": {"secret": "noise"},
                            "context": "patient",
                        }
                    }
                ],
            }
        ),
        FROM_CORE,
        check=_all(
            _same_shift_per("patient", "visit", "at"),
            _shift_within("visit", dt.timedelta(days=-30), dt.timedelta(days=29)),  # min <= n < max
            _shift_within("at", dt.timedelta(days=-30), dt.timedelta(days=29)),
        ),
    ),
    Case(
        # Dates stay dates; ns-precision and tz-aware timestamps keep unit and zone.
        "date-perturbation-types",
        _only(EVERY_TYPE, "d", "ts_ns", "ts_utc", "ts_paris"),
        policy(
            {
                "match": {"names": ["d", "ts_ns", "ts_utc", "ts_paris"]},
                "actions": [
                    {
                        "transform": {
                            "type": "date-perturbation",
                            "frequency": ["DAY", "HOUR"],
                            "min": [-2, -3],
                            "max": [2, 3],
                            "seed": 7,
                        }
                    }
                ],
            }
        ),
        FROM_CORE,
        check=_all(
            _keeps_types,
            # n days in [-2, 1] plus m hours in [-3, 2]; a date rounds its total down
            _shift_within("d", dt.timedelta(days=-3), dt.timedelta(days=1)),
            *(
                _shift_within(c, -dt.timedelta(days=2, hours=3), dt.timedelta(days=1, hours=2))
                for c in ("ts_ns", "ts_utc", "ts_paris")
            ),
        ),
    ),
    Case(
        # Half to even. f64 at 1 digit: 0.25 (an exact binary tie) -> 0.2; -2.5 and 3.5
        # have no second digit and stay. i16 to hundreds: 1250 -> 1200, -1350 -> -1400.
        "numeric-rounding",
        pa.table(
            {
                "i16": pa.array([1250, -1350, None, 32749], pa.int16()),
                "f64": pa.array([0.25, None, -2.5, 3.5]),
            }
        ),
        policy(
            on("f64", {"type": "numeric-rounding", "precision": 1}),
            on("i16", {"type": "numeric-rounding", "precision": -2}),
        ),
        pa.table(
            {
                "i16": pa.array([1200, -1400, None, 32700], pa.int16()),
                "f64": pa.array([0.2, None, -2.5, 3.5]),
            }
        ),
    ),
    Case(
        "numeric-rounding-halves",
        pa.table({"f": pa.array([0.5, 1.5, 2.5, -0.5, -1.5, None, 2.4999])}),
        policy(on("f", {"type": "numeric-rounding", "precision": 0})),
        pa.table({"f": pa.array([0.0, 2.0, 2.0, -0.0, -2.0, None, 2.0])}),
    ),
    Case(
        # Half to even on the decimal digits themselves (no binary floating point).
        "numeric-rounding-decimal",
        pa.table(
            {
                "dec": pa.array(
                    [Decimal("1.25"), Decimal("-3.35"), None, Decimal("0.05")], pa.decimal128(10, 2)
                )
            }
        ),
        policy(on("dec", {"type": "numeric-rounding", "precision": 1})),
        pa.table(
            {
                "dec": pa.array(
                    [Decimal("1.20"), Decimal("-3.40"), None, Decimal("0.00")], pa.decimal128(10, 2)
                )
            }
        ),
    ),
    Case(
        "date-truncation",
        _only(EVERY_TYPE, "d", "ts_ns", "ts_utc"),
        policy(
            on("d", {"type": "date-truncation", "frequency": "year"}),
            on("ts_ns", {"type": "date-truncation", "frequency": "second"}),
            on("ts_utc", {"type": "date-truncation", "frequency": "month"}),
        ),
        pa.table(
            {
                "d": pa.array(
                    [dt.date(2020, 1, 1), None, dt.date(1969, 1, 1), dt.date(2262, 1, 1)],
                    pa.date32(),
                ),
                "ts_ns": pa.array([1_600_000_000_000_000_000, None, -1_000_000_000, 0], NS),
                "ts_utc": pa.array(
                    [
                        dt.datetime(2021, 3, 1, tzinfo=UTC),
                        None,
                        dt.datetime(1960, 1, 1, tzinfo=UTC),
                        dt.datetime(2030, 12, 1, tzinfo=UTC),
                    ],
                    US_UTC,
                ),
            }
        ),
    ),
    Case(
        # Every type, with nulls, passes untouched beside a dropped column.
        "column-redact-every-type-untouched",
        EVERY_TYPE,
        policy(
            on("i64", "drop"),
            {"actions": [{"transform": {"type": "column-redact", "columns": ["b"]}}]},
        ),
        EVERY_TYPE.drop_columns(["i64", "b"]),
    ),
    Case(
        # Null age or country is removed too: row-redact fails closed.
        "row-redact",
        PEOPLE,
        policy(rows("age < 18 or country in ('XX', 'YY')")),
        PEOPLE.take([0, 2]),
    ),
    Case(
        "row-redact-removes-every-row",
        PEOPLE,
        policy(rows("id > 0")),
        PEOPLE.schema.empty_table(),
    ),
    Case(
        # The condition reads age, which a later rule drops.
        "condition-on-dropped-column",
        PEOPLE,
        policy(rows("age >= 60"), on("age", "drop"), on("ssn", "drop")),
        PEOPLE.take([0, 1, 2, 4]).drop_columns(["age", "ssn"]),
    ),
    Case(
        "unmatched-columns-drop",
        PEOPLE,
        policy(
            on("name", {"type": "tokenizer", "key": {"secret": "tok"}, "max_token_len": 8}),
            on("id", {"type": "numeric-rounding", "precision": -1}),
            unmatched_columns="drop",
        ),
        pa.table(
            {
                "id": pa.array([0, 0, 0, 0, 0, 10], pa.int64()),
                "name": pa.array([hmac_token(n, 8) for n in ["Ann", "Bo", None, "Zoë", "", "Eve"]]),
            }
        ),
    ),
    Case(
        "empty-input",
        PEOPLE.schema.empty_table(),
        policy(
            on("name", {"type": "tokenizer", "key": {"secret": "tok"}}),
            on("age", {"type": "numeric-rounding", "precision": -1}),
            on("ssn", "drop"),
            rows("country == 'XX'"),
        ),
        PEOPLE.schema.empty_table().drop_columns(["ssn"]),
    ),
    Case(
        # The cape-python policy shape: named transformation, inline string key, drop.
        "cape-python-policy",
        PEOPLE,
        {
            "label": "cape-python",
            "transformations": [
                {
                    "name": "tok",
                    "type": "tokenizer",
                    "key": "my secret passphrase",
                    "algorithm": "cape-sha256",
                }
            ],
            "rules": [
                {"match": {"name": "country"}, "actions": [{"transform": {"name": "tok"}}]},
                {"match": {"name": "ssn"}, "actions": ["drop"]},
            ],
        },
        PEOPLE.drop_columns(["ssn"]).set_column(
            3,
            "country",
            pa.array(
                [
                    None
                    if c is None
                    else hashlib.sha256(c.encode() + b"my secret passphrase").hexdigest()
                    for c in PEOPLE.column("country").to_pylist()
                ]
            ),
        ),
    ),
]

# -- fpe, mask, bucket, generalize, text-scrub (issue 13) --------------------------------

FPE_KEY = bytes(range(200, 216))
FPE_KEYS = {**KEYS, "fpe": FPE_KEY}

CARDS = pa.table(
    {
        "card": pa.array(
            [
                "4111-1111-1111-1111",
                "5500 0000 0000 0004",
                None,
                "4012888888881881",
                "4111-1111-1111-1111",
            ]
        ),
        "acct": pa.array(["a1", "a2", "a3", "a1", "a9"]),
    }
)
_CARD_FPE = {
    "type": "fpe",
    "key": {"secret": "fpe"},
    "keep_separators": True,
    "luhn": True,
    "keep_first": 6,
    "tweak_column": "acct",
}


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _card_format_kept(inp: pa.Table, out: pa.Table) -> None:
    before, after = inp.column("card").to_pylist(), out.column("card").to_pylist()
    for a, b in zip(before, after, strict=True):
        assert (a is None) == (b is None)
        if a is None:
            continue
        assert len(a) == len(b) and a != b
        assert [c for c in a if not c.isdigit()] == [c for c in b if not c.isdigit()]
        digits = "".join(c for c in b if c.isdigit())
        assert digits[:6] == "".join(c for c in a if c.isdigit())[:6] and _luhn(digits)
    # Same value, same tweak: same ciphertext (rows 0 and 4 differ in tweak, so differ).
    assert after[0] != after[4]


NOTES = pa.table(
    {
        "note": pa.array(
            [
                "mail ann@example.com, card 4111 1111 1111 1111",
                "call (415) 555-0100 from 10.1.2.3",
                None,
                "ssn 123-45-6789 but not 666-45-6789; IBAN GB82 WEST 1234 5698 7654 32",
                "order 2024-01-15 v1.2.3",
                "mail ann@example.com, card 4111 1111 1111 1111",
            ]
        )
    }
)

TRANSFORM_FAMILY_CASES = [
    Case(
        # Cards keep dashes/spaces, issuer prefix and a valid Luhn digit; tweak per account.
        "fpe-cards-format-kept",
        CARDS,
        policy(on("card", _CARD_FPE)),
        FROM_CORE,
        keys=FPE_KEYS,
        check=_card_format_kept,
    ),
    Case(
        # Encrypt then reverse in one rule: the input comes back on every engine.
        "fpe-round-trip",
        CARDS,
        policy(
            {
                "match": {"name": "card"},
                "actions": [
                    {"transform": _CARD_FPE},
                    {"transform": {**_CARD_FPE, "type": "fpe-reverser"}},
                ],
            }
        ),
        CARDS,
        keys=FPE_KEYS,
    ),
    Case(
        "mask",
        pa.table(
            {
                "email": pa.array(["ann@example.com", None, "nobody", "李雷@例子.cn"]),
                "card": pa.array(["4111-1111-1111-1111", "1234", None, ""]),
            }
        ),
        policy(
            on("email", {"type": "mask", "keep": "email-domain"}),
            on("card", {"type": "mask", "keep_last": 4, "ignore": "-"}),
        ),
        pa.table(
            {
                "email": pa.array(["***@example.com", None, "******", "**@例子.cn"]),
                "card": pa.array(["****-****-****-1111", "****", None, ""]),
            }
        ),
    ),
    Case(
        "bucket-numbers-and-dates",
        pa.table(
            {
                "age": pa.array([34, 17, None, 70, -3], pa.int32()),
                "score": pa.array([0.25, 0.5, None, float("nan"), 1.0]),
                "d": pa.array(
                    [
                        dt.date(2020, 2, 13),
                        None,
                        dt.date(1969, 12, 31),
                        dt.date(2021, 1, 1),
                        dt.date(2020, 5, 5),
                    ],
                    pa.date32(),
                ),
                "when": pa.array(
                    [
                        dt.datetime(2020, 3, 31, 23, 30, tzinfo=UTC),
                        None,
                        dt.datetime(1960, 1, 1, tzinfo=UTC),
                        dt.datetime(2030, 12, 31, 23, 59, 59, tzinfo=UTC),
                        dt.datetime(2020, 1, 1, tzinfo=UTC),
                    ],
                    US_UTC,
                ),
            }
        ),
        policy(
            on("age", {"type": "bucket", "width": 10}),
            on("score", {"type": "bucket", "edges": [0.5, 0.75], "labels": ["low", "mid", "high"]}),
            on("d", {"type": "bucket", "unit": "quarter"}),
            on("when", {"type": "bucket", "unit": "month", "output": "lower"}),
        ),
        pa.table(
            {
                "age": pa.array(["30-39", "10-19", None, "70-79", "-10--1"]),
                "score": pa.array(["low", "mid", None, None, "high"]),
                "d": pa.array(["2020-Q1", None, "1969-Q4", "2021-Q1", "2020-Q2"]),
                "when": pa.array(
                    [
                        dt.datetime(2020, 3, 1, tzinfo=UTC),
                        None,
                        dt.datetime(1960, 1, 1, tzinfo=UTC),
                        dt.datetime(2030, 12, 1, tzinfo=UTC),
                        dt.datetime(2020, 1, 1, tzinfo=UTC),
                    ],
                    US_UTC,
                ),
            }
        ),
    ),
    Case(
        "generalize",
        pa.table(
            {
                "zip": pa.array(["02139", "9410", None, ""]),
                "city": pa.array(["Boston", "Paris", None, "Austin"]),
            }
        ),
        policy(
            on("zip", {"type": "generalize", "prefix": 3, "fill": "*"}),
            on(
                "city",
                {
                    "type": "generalize",
                    "mapping": {"Boston": "Northeast", "Austin": "South"},
                    "default": "Other",
                },
            ),
        ),
        pa.table(
            {
                "zip": pa.array(["021**", "941*", None, ""]),
                "city": pa.array(["Northeast", "Other", None, "South"]),
            }
        ),
    ),
    Case(
        "text-scrub-placeholders",
        NOTES,
        policy(on("note", {"type": "text-scrub"})),
        pa.table(
            {
                "note": pa.array(
                    [
                        "mail <EMAIL>, card <CARD>",
                        "call <PHONE> from <IPV4>",
                        None,
                        "ssn <SSN> but not 666-45-6789; IBAN <IBAN>",
                        "order 2024-01-15 v1.2.3",
                        "mail <EMAIL>, card <CARD>",
                    ]
                )
            }
        ),
    ),
    Case(
        # Tokens inside text are the tokenizer's HMAC-SHA256 of the finding.
        "text-scrub-tokens",
        NOTES.slice(0, 3),
        policy(
            on(
                "note",
                {
                    "type": "text-scrub",
                    "entities": ["email"],
                    "replace": "token",
                    "key": {"secret": "tok"},
                },
            )
        ),
        pa.table(
            {
                "note": pa.array(
                    [
                        f"mail <EMAIL:{hmac_token('ann@example.com', 16)}>, "
                        "card 4111 1111 1111 1111",
                        "call (415) 555-0100 from 10.1.2.3",
                        None,
                    ]
                )
            }
        ),
    ),
]

CASES.extend(TRANSFORM_FAMILY_CASES)


# -- re-identification risk (issue 13 item 5) ------------------------------------------------
# Classes of the output over (zip, age): (021, 30-39) x3, (941, 40-49) x3, (100, 50-59) x1,
# (null, 20-29) x2. With k = 3 the suppression removes the last two classes (a null
# quasi-identifier is a value of its own), and nothing else moves.

PATIENTS = pa.table(
    {
        "id": pa.array([1, 2, 3, 4, 5, 6, 7, 8, 9], pa.int64()),
        "zip": pa.array(
            ["02139", "02134", "02139", "94110", "94117", "94110", "10001", None, None]
        ),
        "age": pa.array([34, 36, 38, 41, 45, 47, 52, 29, 25], pa.int64()),
        "dx": pa.array(["flu", "cold", "flu", "asthma", "flu", "flu", "cold", "flu", "cold"]),
    }
)
_RISK_RULES = (
    on("zip", {"type": "generalize", "prefix": 3}),
    on("age", {"type": "bucket", "width": 10}),
)


def _patients_out(keep: list[int]) -> pa.Table:
    zips = ["021", "021", "021", "941", "941", "941", "100", None, None]
    ages = ["30-39", "30-39", "30-39", "40-49", "40-49", "40-49", "50-59", "20-29", "20-29"]
    return pa.table(
        {
            "id": pa.array([PATIENTS["id"][i].as_py() for i in keep], pa.int64()),
            "zip": pa.array([zips[i] for i in keep], pa.string()),
            "age": pa.array([ages[i] for i in keep], pa.string()),
            "dx": pa.array([PATIENTS["dx"][i].as_py() for i in keep], pa.string()),
        }
    )


RISK_CASES = [
    Case(
        "risk-report",
        PATIENTS,
        policy(
            *_RISK_RULES,
            risk={"quasi_identifiers": ["zip", "age"], "sensitive": "dx", "k": 3},
        ),
        _patients_out(list(range(9))),
    ),
    Case(
        "risk-suppress",
        PATIENTS,
        policy(
            *_RISK_RULES,
            risk={
                "quasi_identifiers": ["zip", "age"],
                "sensitive": "dx",
                "k": 3,
                "action": "suppress",
            },
        ),
        _patients_out([0, 1, 2, 3, 4, 5]),
    ),
]

CASES.extend(RISK_CASES)

CASES_BY_NAME = {c.name: c for c in CASES}
assert len(CASES_BY_NAME) == len(CASES), "case names must be unique"
