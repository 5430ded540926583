"""Phone identifiers for the Data Manager API, formatted and hashed as Google's guide says.

Google's "Format user data" page: a phone number is in E.164 (a plus sign, the country
code, then digits only; its example is the US number ``(800)555-0100`` as
``+18005550100``), leading and trailing whitespace trimmed, then SHA-256, with the hash
bytes hex- or Base64-encoded. We send hex (the request's ``encoding: HEX``), lower case.

Numbers reach this module already normalised to E.164 by :mod:`callconv.intake.normalise`; the
check here refuses anything else rather than hashing a number Google could never match.
No message raised here carries the number.
"""

from __future__ import annotations

import hashlib
import re

import phonenumbers

# E.164: '+', a country code that does not start with 0, at most 15 digits in all.
_E164 = re.compile(r"^\+[1-9][0-9]{1,14}$")
# What a hashed identifier looks like on the wire with encoding HEX.
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class UnhashablePhone(ValueError):
    """A phone number that is not E.164 after trimming; the message never holds it."""


def format_phone(raw: str, default_region: str | None = None) -> str:
    """Google's formatting: trim, then E.164 (plus sign, country code, digits only).

    A number already in E.164 is kept as it is (only trimmed); anything else is parsed
    with ``default_region`` so that ``(800)555-0100`` in the US becomes ``+18005550100``,
    as in Google's example.
    """
    text = raw.strip()
    if _E164.match(text):
        return text
    try:
        parsed = phonenumbers.parse(text, default_region)
    except phonenumbers.NumberParseException:
        raise UnhashablePhone("phone number is not E.164 and cannot be parsed") from None
    formatted = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    if not _E164.match(formatted):
        raise UnhashablePhone("phone number is not E.164 after formatting")
    return formatted


def hash_phone(e164: str) -> str:
    """SHA-256 of the E.164 number, hex in lower case: the value of ``phoneNumber``."""
    text = e164.strip()
    if not _E164.match(text):
        raise UnhashablePhone("phone number must be E.164 (+, country code, digits) before hashing")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_hashed_phone(value: str) -> bool:
    """True for a hex SHA-256 (what the sandbox and the tests accept as not a number)."""
    return bool(SHA256_HEX.match(value))
