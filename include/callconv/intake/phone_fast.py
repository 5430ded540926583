"""Exact E.164 for plainly written phone numbers without ``phonenumbers.parse``.

Most CRM numbers are digits with a ``+CC``/``00CC`` or a trunk ``0`` in front.
For those, parse + is_possible + is_valid is a long way round to a few string
tests, and it was most of the cost of ``normalise_phones``. Here the same
decisions are made with tables built once per region from phonenumbers' own
metadata, step for step as ``phonenumberutil`` makes them: country code
extraction, national prefix stripping, possible lengths, the region choice for
shared country codes, the number type patterns.

:func:`read_plain` answers only when it is sure; ``None`` means "ask
phonenumbers". That is the answer for letters (other than one plain trailing
extension), other punctuation, a national prefix that is a real regular
expression or has a transform rule, a leading zero in the national number,
non-geographic codes, home-region digits that start like an international or
country code prefix, and numbers that parse() would reject. The unit tests in
tests/unit/test_phone_fast.py compare it with phonenumbers over many regions
and random numbers.

Input is normalise's folded text: stripped, a leading ``00`` turned into
``+``, spaces, dots and dashes removed.
"""

from __future__ import annotations

import re
from functools import cache, cached_property

from phonenumbers import COUNTRY_CODE_TO_REGION_CODE, SUPPORTED_REGIONS, PhoneMetadata, ValidationResult

# phonenumberutil's limits: a national significant number (NSN) has 2 to 17 digits.
MIN_NSN, MAX_NSN = 2, 17
_MAX_TEXT = 40  # longer text goes to phonenumbers
_NON_GEO = "001"
_IS_POSSIBLE = ValidationResult.IS_POSSIBLE
# Lengths for which parse() puts a stripped national prefix back.
_KEEP_PREFIX = (ValidationResult.TOO_SHORT, ValidationResult.IS_POSSIBLE_LOCAL_ONLY, ValidationResult.INVALID_LENGTH)
# The descriptions _number_type_helper tries (mobile only when its pattern differs from fixed_line).
_TYPES = (
    "fixed_line",
    "premium_rate",
    "toll_free",
    "shared_cost",
    "voip",
    "personal_number",
    "pager",
    "uan",
    "voicemail",
)
_LITERAL_PREFIXES = re.compile(r"[0-9]+(?:\|[0-9]+)*")
# A trailing extension that _maybe_strip_extension removes whole: "ext27", "x596", "#8" once
# the spaces and dots are gone. Longer or other forms go to phonenumbers.
_EXTENSION = re.compile(r"(?:ext|x|#)[0-9]{1,9}\Z")


def _length_result(desc, length: int) -> int:
    """phonenumberutil._test_number_length with a general description (number type UNKNOWN)."""
    possible = desc.possible_length
    if length in desc.possible_length_local_only:
        return ValidationResult.IS_POSSIBLE_LOCAL_ONLY
    if possible[0] == length:
        return ValidationResult.IS_POSSIBLE
    if possible[0] > length:
        return ValidationResult.TOO_SHORT
    if possible[-1] < length:
        return ValidationResult.TOO_LONG
    return ValidationResult.IS_POSSIBLE if length in possible[1:] else ValidationResult.INVALID_LENGTH


def _applies(desc, length: int) -> bool:
    """The cheap half of _is_number_matching_desc: a pattern exists and the length is allowed."""
    return (
        desc is not None
        and bool(desc.national_number_pattern)
        and (not desc.possible_length or length in desc.possible_length)
    )


class _Region:
    """One region's metadata in the shape the fast path needs."""

    def __init__(self, metadata) -> None:
        general = metadata.general_desc
        self.code = metadata.id
        self.country_code = str(metadata.country_code)
        for_parsing = metadata.national_prefix_for_parsing
        # National prefixes in the order the regex alternation tries them; None: not a plain literal.
        self.prefixes: tuple[str, ...] | None = ()
        if for_parsing:
            literal = _LITERAL_PREFIXES.fullmatch(for_parsing) and not metadata.national_prefix_transform_rule
            self.prefixes = tuple(for_parsing.split("|")) if literal else None
        self.keep_prefix = frozenset(n for n in range(MAX_NSN + 2) if _length_result(general, n) in _KEEP_PREFIX)
        self.has_leading = metadata.leading_digits is not None
        # Any match makes the number valid, so the common types go first.
        names = _TYPES if metadata.same_mobile_and_fixed_line_pattern else ("mobile", *_TYPES)
        self._metadata = metadata
        self._general_desc = general
        self._types = [getattr(metadata, name) for name in names]
        self._valid: dict[int, tuple[re.Pattern[str], ...]] = {}

    # Compiled when first used: +1 alone has 25 regions, and most are never reached.
    @cached_property
    def general(self) -> re.Pattern[str] | None:
        pattern = self._general_desc.national_number_pattern
        return re.compile(pattern) if pattern else None

    @cached_property
    def idd(self) -> re.Pattern[str] | None:
        return re.compile(self._metadata.international_prefix) if self._metadata.international_prefix else None

    @cached_property
    def leading(self) -> re.Pattern[str]:
        return re.compile(self._metadata.leading_digits)

    def strip_prefix(self, number: str) -> str:
        """parse()'s national prefix step: _maybe_strip_national_prefix_carrier_code, then its length check."""
        for prefix in self.prefixes or ():
            if number.startswith(prefix):
                break
        else:
            return number
        rest = number[len(prefix) :]
        if self.general is not None and self.general.fullmatch(number) and not self.general.fullmatch(rest):
            return number
        return number if len(rest) in self.keep_prefix else rest

    def is_valid(self, nsn: str) -> bool:
        """_number_type_helper(nsn) != UNKNOWN: the general pattern and any type pattern match the whole NSN."""
        checks = self._valid.get(len(nsn))
        if checks is None:
            checks = self._valid[len(nsn)] = self._checks(len(nsn))
        if not checks or not checks[0].fullmatch(nsn):
            return False
        for pattern in checks[1:]:
            if pattern.fullmatch(nsn):
                return True
        return False

    def _checks(self, length: int) -> tuple[re.Pattern[str], ...]:
        """(general, *types) for NSNs of this length; () when none can be valid."""
        types = [_compiled(d.national_number_pattern) for d in self._types if _applies(d, length)]
        if not _applies(self._general_desc, length) or not types:
            return ()
        return (_compiled(self._general_desc.national_number_pattern), *types)


@cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _build_region(code: str) -> _Region | None:
    metadata = PhoneMetadata.metadata_for_region(code, None)
    if metadata is None or metadata.general_desc is None or not metadata.general_desc.possible_length:
        return None
    return _Region(metadata)


class _Country:
    """One country calling code: its main region and all regions sharing it, in phonenumbers' order."""

    def __init__(self, code: str, shared: bool, regions: list[_Region], general) -> None:
        self.plus_code = "+" + code
        self.shared = shared
        self.main = regions[0]
        self.regions = tuple(regions)
        # Per NSN length: is_possible_number_with_reason, from the main region's lengths.
        self.possible = tuple(_length_result(general, n) for n in range(MAX_NSN + 1))

    def is_valid(self, nsn: str) -> bool:
        """is_valid_number: the region as _region_code_for_number_from_list picks it, then valid for it."""
        if not self.shared:
            return self.main.is_valid(nsn)
        for region in self.regions:
            if region.has_leading:
                if region.leading.match(nsn):
                    return region.is_valid(nsn)
            elif region.is_valid(nsn):
                return True
        return False


def _build_country(code: str) -> _Country | None:
    codes = COUNTRY_CODE_TO_REGION_CODE.get(int(code), ())
    if not codes or _NON_GEO in codes:
        return None
    regions = []
    for region_code in codes:
        if PhoneMetadata.metadata_for_region(region_code, None) is None:
            continue  # _region_code_for_number_from_list skips these too
        region = _region(region_code)
        if region is None:
            return None
        regions.append(region)
    if not regions or regions[0].code != codes[0]:
        return None
    general = PhoneMetadata.metadata_for_region(codes[0], None).general_desc
    return _Country(code, len(codes) > 1, regions, general)


_REGIONS: dict[str, _Region | None] = {}
_COUNTRIES: dict[str, _Country | None] = {}
# Country codes as written, for _extract_country_code's shortest-first lookup.
_CODES = frozenset(str(code) for code in COUNTRY_CODE_TO_REGION_CODE)


def _region(code: str) -> _Region | None:
    if code not in _REGIONS:
        _REGIONS[code] = _build_region(code)
    return _REGIONS[code]


def _country(code: str) -> _Country | None:
    if code not in _COUNTRIES:
        _COUNTRIES[code] = _build_country(code)
    return _COUNTRIES[code]


def _plain_digits(text: str) -> tuple[bool, str] | None:
    """``(international, digits)`` when ``text`` is digits, parentheses, a leading + and a plain extension."""
    number = text
    if "x" in text or "#" in text:
        found = _EXTENSION.search(text)
        if found is None:
            return None
        number = text[: found.start()]
    if "(" in number or ")" in number:
        number = number.replace("(", "").replace(")", "")
    international = number[:1] == "+"
    digits = number[1:] if international else number
    # Three digits make the text viable for parse() whatever the parentheses; ASCII only.
    if len(digits) < 3 or not digits.isascii() or not digits.isdigit():
        return None
    return international, digits


def read_plain(text: str, region: str) -> tuple[str | None, int] | None:
    """``(e164 or None, is_possible result)`` for a plainly written number, else None.

    The e164 is None exactly when phonenumbers finds the number not possible or
    not valid; the second value is what is_possible_number_with_reason returns.
    """
    if len(text) > _MAX_TEXT or region not in SUPPORTED_REGIONS:
        return None
    plain = _plain_digits(text)
    if plain is None:
        return None
    international, digits = plain
    if international:
        if digits[0] == "0":
            return None  # no country code: parse() tries again without the plus
        code = digits[:1] if digits[:1] in _CODES else digits[:2] if digits[:2] in _CODES else digits[:3]
        country = _country(code) if code in _CODES else None
        if country is None or country.main.prefixes is None:
            return None
        rest = digits[len(code) :]
        if len(rest) < MIN_NSN:
            return None  # TOO_SHORT_NSN
        nsn = country.main.strip_prefix(rest)
    else:
        home = _region(region)
        if home is None or home.prefixes is None or (home.idd is not None and home.idd.match(digits)):
            return None
        if digits.startswith(home.country_code):
            return None  # parse() may take these digits for the home country code
        country = _country(home.country_code)
        if country is None:
            return None
        nsn = home.strip_prefix(digits)
    if not MIN_NSN <= len(nsn) <= MAX_NSN or nsn[0] == "0":
        return None  # errors in parse(), and italian leading zeros
    possible = country.possible[len(nsn)]
    if possible != _IS_POSSIBLE or not country.is_valid(nsn):
        return None, possible
    return country.plus_code + nsn, possible
