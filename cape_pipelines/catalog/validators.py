"""Value validators for the catalog scanner, through maintained libraries where they fit.

A candidate value (one that already has the shape of an e-mail, a card number, an
IBAN, ...: the scanner's patterns are the ``text-scrub`` ones, applied to the whole
value) is confirmed by the library that knows the identifier's real rules:

* ``python-stdnum``: the Luhn check for card numbers, IBANs with the check digits *and*
  the country's length and BBAN format (a mod-97-valid string of the wrong length for
  its country is not an IBAN), US SSNs (area, group and serial rules and the numbers
  the SSA lists as never valid, such as the advertised 078-05-1120), and national
  identity numbers of other countries (:data:`NATIONAL_IDS`: check digits, encoded
  birth dates, letter keys);
* ``phonenumbers`` (libphonenumber's metadata): a number is valid for a real numbering
  plan (an unassigned area code, a too-short subscriber number is not): international
  numbers written with ``+``, national ones in ``phone_region``'s own format (default
  ``US``);
* ``email-validator``: the address's syntax (no consecutive dots, no hyphen after the
  ``@``, a real domain shape), with ``check_deliverability=False``: no DNS lookup is
  ever made.

The libraries are the ``scan`` extra. Without one, its checks fall back to the
scanner's own (the ``text-scrub`` validators: Luhn, ISO 13616 mod 97, SSN area rules,
E.164/3-3-4 phone shapes), and national identity numbers are not detected;
:func:`libraries` says which are in use.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable
from typing import Any

from ..transforms import text_scrub

__all__ = ["NATIONAL_IDS", "libraries", "national_id_checks", "value_checks"]

# tag -> python-stdnum module: personal identity numbers with check digits or an encoded
# birth date, whose formats are distinctive enough that most values of another kind fail.
NATIONAL_IDS: dict[str, str] = {
    "pii.national_id.be_nn": "stdnum.be.nn",
    "pii.national_id.br_cpf": "stdnum.br.cpf",
    "pii.national_id.ca_sin": "stdnum.ca.sin",
    "pii.national_id.ch_ssn": "stdnum.ch.ssn",
    "pii.national_id.cn_ric": "stdnum.cn.ric",
    "pii.national_id.de_idnr": "stdnum.de.idnr",
    "pii.national_id.dk_cpr": "stdnum.dk.cpr",
    "pii.national_id.es_dni": "stdnum.es.dni",
    "pii.national_id.es_nie": "stdnum.es.nie",
    "pii.national_id.fi_hetu": "stdnum.fi.hetu",
    "pii.national_id.fr_nir": "stdnum.fr.nir",
    "pii.national_id.gb_nhs": "stdnum.gb.nhs",
    "pii.national_id.ie_pps": "stdnum.ie.pps",
    "pii.national_id.in_aadhaar": "stdnum.in_.aadhaar",
    "pii.national_id.it_codice_fiscale": "stdnum.it.codicefiscale",
    "pii.national_id.kr_rrn": "stdnum.kr.rrn",
    "pii.national_id.mx_curp": "stdnum.mx.curp",
    "pii.national_id.nl_bsn": "stdnum.nl.bsn",
    "pii.national_id.no_fodselsnummer": "stdnum.no.fodselsnummer",
    "pii.national_id.pl_pesel": "stdnum.pl.pesel",
    "pii.national_id.se_personnummer": "stdnum.se.personnummer",
    "pii.national_id.za_idnr": "stdnum.za.idnr",
}
# What a national identity number may look like at all: digits and capital letters with
# spaces, dots, dashes, slashes or a plus sign between them (a cheap screen before stdnum).
NATIONAL_ID_SHAPE = re.compile(r"[0-9A-Z](?:[0-9A-Z .+/-]{6,22})[0-9A-Z]")


def _optional(name: str) -> Any | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


@functools.cache
def libraries() -> dict[str, bool]:
    """Which validating libraries are installed (and so used)."""
    return {
        "python-stdnum": _optional("stdnum.luhn") is not None,
        "phonenumbers": _optional("phonenumbers") is not None,
        "email-validator": _optional("email_validator") is not None,
    }


def _card_check() -> Callable[[str], bool]:
    luhn = _optional("stdnum.luhn")
    if luhn is None:
        return text_scrub.card_valid

    def check(value: str) -> bool:
        digits = value.replace(" ", "").replace("-", "")
        return 13 <= len(digits) <= 19 and digits.isdigit() and bool(luhn.is_valid(digits))

    return check


def _iban_check() -> Callable[[str], bool]:
    iban = _optional("stdnum.iban")
    if iban is None:
        return text_scrub.iban_valid
    return lambda value: bool(iban.is_valid(value))


def _ssn_check() -> Callable[[str], bool]:
    ssn = _optional("stdnum.us.ssn")
    if ssn is None:
        return text_scrub.ssn_valid
    return lambda value: bool(ssn.is_valid(value))


_DATE_LIKE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{4}")


def _phone_check(region: str) -> Callable[[str], bool]:
    phonenumbers = _optional("phonenumbers")
    if phonenumbers is None:
        return text_scrub.phone_valid

    # How many digits a national number of the region has, with or without its trunk
    # prefix: a cheap refusal before parsing (None: the region's prefix rules are not a
    # plain prefix, so every candidate is parsed).
    meta = phonenumbers.PhoneMetadata.metadata_for_region(region)
    national: set[int] | None = None
    if meta is not None and meta.national_prefix_for_parsing in (None, meta.national_prefix):
        lengths = set(meta.general_desc.possible_length)
        trunk = len(meta.national_prefix or "")
        national = lengths | {n + trunk for n in lengths}

    def check(value: str) -> bool:
        if _DATE_LIKE.fullmatch(value):
            return False
        digits = sum(ch.isdigit() for ch in value)
        if value.startswith("+"):
            if not 7 <= digits <= 17:
                return False
        elif national is not None and digits not in national:
            return False
        try:
            number = phonenumbers.parse(value, region)
        except phonenumbers.NumberParseException:
            return False
        return bool(phonenumbers.is_valid_number(number))

    return check


def _email_check() -> Callable[[str], bool] | None:
    ev = _optional("email_validator")
    if ev is None:
        return None

    def check(value: str) -> bool:
        try:
            ev.validate_email(value, check_deliverability=False)
        except ev.EmailNotValidError:
            return False
        return True

    return check


# With a validating library, its candidates need only a loose shape: the library, not
# text-scrub's pattern (written to find findings inside text), decides.
_PHONE_SHAPE = re.compile(r"\+?[\d() .-]{7,24}")
_EMAIL_SHAPE = re.compile(r"[^@\s]+@[^@\s]+")


def _ip_check(entity: str) -> Callable[[str], bool] | None:
    return text_scrub._DETECTORS[entity][1]


def value_checks(
    phone_region: str = "US", *, use_libraries: bool = True
) -> dict[str, Callable[[str], bool]]:
    """Detector name -> a check of one whole value: the ``text-scrub`` pattern must match
    all of it (for phones and e-mails validated by their library, a loose shape: digits
    and separators, one ``@``), then the validating library (or the built-in check) must
    accept it.
    ``use_libraries=False``: the built-in checks only (the baseline the docs measure)."""
    validators: dict[str, Callable[[str], bool] | None]
    if use_libraries:
        validators = {
            "email": _email_check(),
            "card": _card_check(),
            "iban": _iban_check(),
            "ssn": _ssn_check(),
            "ipv4": _ip_check("ipv4"),
            "ipv6": _ip_check("ipv6"),
            "phone": _phone_check(phone_region),
        }
    else:
        validators = {e: check for e, (_, check) in text_scrub._DETECTORS.items()}
    shapes = {
        "phone": _PHONE_SHAPE if _optional("phonenumbers") is not None else None,
        "email": _EMAIL_SHAPE if _optional("email_validator") is not None else None,
    }
    out: dict[str, Callable[[str], bool]] = {}
    for entity, validator in validators.items():
        pattern = shapes.get(entity) if use_libraries else None
        pattern = pattern or text_scrub._DETECTORS[entity][0]

        def check(
            value: str,
            pattern: re.Pattern[str] = pattern,
            validator: Callable[[str], bool] | None = validator,
        ) -> bool:
            return pattern.fullmatch(value) is not None and (validator is None or validator(value))

        out[entity] = check
    return out


def national_id_checks() -> dict[str, Callable[[str], bool]]:
    """Tag -> a check of one whole value for each national identity number python-stdnum
    knows here (none without it)."""
    out: dict[str, Callable[[str], bool]] = {}
    for tag, module_name in NATIONAL_IDS.items():
        module = _optional(module_name)
        if module is None:
            continue

        def check(value: str, module: Any = module) -> bool:
            return NATIONAL_ID_SHAPE.fullmatch(value) is not None and bool(module.is_valid(value))

        out[tag] = check
    return out
