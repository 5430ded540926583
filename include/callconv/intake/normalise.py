"""Stage 3: turn raw CRM text into typed, comparable values.

Each function takes a raw column and returns one typed column plus a
``reason`` column: None when the value is usable, else a short code that the
caller writes to quarantine. Nothing here raises on bad data, so one odd row
never fails a run.

CRM exports repeat the same callers, times and amounts many times, so every
parser runs once per distinct raw string and the result is mapped back.

Time zones and DST. A time without an offset is local time in the account's
zone; a time with an offset (or ``Z``) is an instant and is only converted.
Local times that are not unique follow Python's ``fold=0`` rule:

* an ambiguous time (the repeated hour when clocks go back) is the FIRST
  occurrence, the earlier instant still in summer time: 2026-10-25 02:30 in
  Europe/Oslo is 02:30 CEST = 00:30 UTC;
* a non-existent time (the skipped hour when clocks go forward) is moved
  forward by the size of the gap: 2026-03-29 02:30 in Europe/Oslo becomes
  03:30 CEST = 01:30 UTC.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import phonenumbers
from dateutil import parser as dateutil_parser
from phonenumbers import NumberParseException, PhoneNumberFormat, ValidationResult

from callconv.intake.currencies import ISO_4217
from callconv.intake.phone_fast import read_plain

Result = tuple[object, str | None]


def _blank(value: object) -> bool:
    return value is None or (not isinstance(value, str) and pd.isna(value)) or not str(value).strip()


def _keys(raw: pd.Series) -> pd.Series:
    """Raw values as stripped text, missing as "", so equal inputs share one key."""
    return raw.astype(str).fillna("").str.strip()


def _map_distinct(
    raw: pd.Series,
    parse: Callable[[str], Result],
    columns: tuple[str, str],
    typed: Callable[[pd.Series], pd.Series] | None = None,
) -> pd.DataFrame:
    """Run ``parse`` once per distinct key and spread the results over the rows.

    Object columns keep None as None; ``typed`` converts the value column while
    it is still one row per distinct key.
    """
    keys = _keys(raw)
    results = {key: parse(key) for key in keys.unique()}
    table = pd.DataFrame(list(results.values()), index=list(results), columns=list(columns), dtype=object)
    if typed is not None:
        table[columns[0]] = typed(table[columns[0]])
    out = table.reindex(keys.to_numpy())
    out.index = raw.index
    return out


# --- phone numbers -----------------------------------------------------------

_PARSE_ERRORS = {
    NumberParseException.TOO_SHORT_NSN: "phone_too_short",
    NumberParseException.TOO_SHORT_AFTER_IDD: "phone_too_short",
    NumberParseException.TOO_LONG: "phone_too_long",
}
_POSSIBLE = {
    ValidationResult.IS_POSSIBLE: None,
    # A number without its area code cannot be matched to a call, so it is too short.
    ValidationResult.IS_POSSIBLE_LOCAL_ONLY: "phone_too_short",
    ValidationResult.TOO_SHORT: "phone_too_short",
    ValidationResult.TOO_LONG: "phone_too_long",
}
_MISSING = (None, "phone_missing")
_INVALID = "phone_invalid_for_region"
# "00" is the international prefix almost everywhere, but phonenumbers only
# knows that for regions whose own prefix is 00 (not US/CA, for example).
_LEADING_00 = re.compile(r"^00(?=\s*[1-9])")
# Spaces, dots and dashes never change a number, so the many ways one caller is
# written share a single parse.
_SEPARATORS = re.compile(r"[\s.\-\u00a0]+")
# The same deletion for ASCII text (most CRM text), by str.translate: cheaper than a regex.
_ASCII_SEPARATORS = str.maketrans({chr(c): None for c in range(128) if _SEPARATORS.match(chr(c))})


def _fold(text: str) -> str:
    """The text phonenumbers is given: stripped, a leading 00 as +, no spaces, dots or dashes."""
    text = text.strip()
    if text.startswith("00"):
        text = _LEADING_00.sub("+", text)
    return text.translate(_ASCII_SEPARATORS) if text.isascii() else _SEPARATORS.sub("", text)


def normalise_phone(raw: object, region: str) -> tuple[str | None, str | None]:
    """One raw number as ``(e164, None)`` or ``(None, reason)``; extensions are dropped."""
    if _blank(raw):
        return _MISSING
    return _read_folded(_fold(str(raw)), region)


def _normalise_phone_full(raw: object, region: str) -> tuple[str | None, str | None]:
    """normalise_phone through phonenumbers only: the reference the fast path is tested against."""
    if _blank(raw):
        return _MISSING
    return _parse_number(_fold(str(raw)), region)


def _read_folded(text: str, region: str) -> tuple[str | None, str | None]:
    """Plain numbers by phone_fast's tables (same answers, a fraction of the time), the rest by phonenumbers."""
    fast = read_plain(text, region)
    if fast is None:
        return _parse_number(text, region)
    e164, possible = fast
    if e164 is not None:
        return e164, None
    return None, _POSSIBLE.get(possible, _INVALID) or _INVALID


def clear_phone_cache() -> None:
    """Forget the numbers parsed so far in this process (benchmarks time a cold parse)."""
    _parse_number.cache_clear()


@lru_cache(maxsize=200_000)
def _parse_number(text: str, region: str) -> tuple[str | None, str | None]:
    try:
        number = phonenumbers.parse(text, region)
    except NumberParseException as error:
        return None, _PARSE_ERRORS.get(error.error_type, "phone_unparseable")
    reason = _POSSIBLE.get(phonenumbers.is_possible_number_with_reason(number), _INVALID)
    if reason is None and not phonenumbers.is_valid_number(number):
        reason = _INVALID
    if reason:
        return None, reason
    return phonenumbers.format_number(number, PhoneNumberFormat.E164), None


def _phone_results(values: Iterable[object], region: str) -> list[tuple[str | None, str | None]]:
    """The result for each of ``values``, worked out once per distinct folded text."""
    by_text: dict[str, tuple[str | None, str | None]] = {}
    results = []
    for value in values:
        if _blank(value):
            results.append(_MISSING)
            continue
        text = _fold(str(value))
        found = by_text.get(text)
        if found is None:
            found = by_text[text] = _read_folded(text, region)
        results.append(found)
    return results


def normalise_distinct(values: Iterable[str], region: str) -> dict[str, tuple[str | None, str | None]]:
    """Each distinct value parsed once, for callers that batch their own lookups."""
    distinct = list(dict.fromkeys(values))
    return dict(zip(distinct, _phone_results(distinct, region), strict=True))


def normalise_phones(raw: pd.Series, default_region: str) -> pd.DataFrame:
    """Columns ``e164`` and ``reason``, aligned with ``raw``.

    factorize gives each row the number of its distinct key, so the results are
    spread back by one array lookup instead of a reindex on strings.
    """
    codes, distinct = pd.factorize(_keys(raw))
    results = _phone_results(distinct.tolist(), default_region)
    e164 = np.array([e164 for e164, _ in results], dtype=object)
    reason = np.array([reason for _, reason in results], dtype=object)
    return pd.DataFrame({"e164": e164[codes], "reason": reason[codes]}, index=raw.index, dtype=object)


# --- times --------------------------------------------------------------------

# No sale or call lies outside these. A time near year 1 or 9999 overflows Python's dates
# once moved to UTC or to a negative-offset zone (a PostgreSQL session's, say): such a
# cell is quarantined as ``time_out_of_range``, never an error that fails the file.
EARLIEST_TIME = datetime(1900, 1, 1, tzinfo=UTC)
LATEST_TIME = datetime(2200, 1, 1, tzinfo=UTC)

# Year first only: "03/04/2026" is ambiguous and "today" depends on the clock.
_YEAR_FIRST = re.compile(r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}(?!\d)")
_LETTER = re.compile(r"[^\W\d_]")


def _parse_time(text: str, tz: ZoneInfo) -> Result:
    if not text:
        return pd.NaT, "time_missing"
    if not _YEAR_FIRST.match(text):
        return pd.NaT, "time_unparseable"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        # dateutil guesses at words ("CET", "Sun"), so it only gets digits and punctuation.
        if _LETTER.search(text):
            return pd.NaT, "time_unparseable"
        try:
            moment = dateutil_parser.parse(text, yearfirst=True, dayfirst=False)
        except (ValueError, OverflowError):
            return pd.NaT, "time_unparseable"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz, fold=0)  # fold=0 gives the DST rule in the docstring
    try:
        utc = moment.astimezone(UTC)
    except (OverflowError, ValueError):  # 9999-12-31 23:00-05:00 is in year 10000
        return pd.NaT, "time_out_of_range"
    if not EARLIEST_TIME <= utc < LATEST_TIME:
        return pd.NaT, "time_out_of_range"
    return pd.Timestamp(utc), None


def parse_local_times(raw: pd.Series, tz: ZoneInfo) -> pd.DataFrame:
    """Columns ``utc`` (tz-aware UTC, NaT when bad) and ``reason``."""
    return _map_distinct(
        raw,
        lambda key: _parse_time(key, tz),
        ("utc", "reason"),
        typed=lambda col: pd.to_datetime(col, utc=True).dt.as_unit("us"),
    )


def future_times(utc: pd.Series, window_end: datetime) -> pd.Series:
    """True where a time lies strictly after the run's window end; NaT is never future."""
    if window_end.tzinfo is None:
        raise ValueError("window_end must be timezone-aware")
    return (utc > pd.Timestamp(window_end)).astype(bool)


# --- money --------------------------------------------------------------------

# A currency code or word ("NOK", "kr", "US") and/or symbol ("$", "€") either
# side of the number; any other letters make the value garbage.
_TOKEN = r"(?:[^\W\d_]{1,3}\.?)?[$£¥¢\u20a0-\u20cf]?"
_AMOUNT = re.compile(rf"(?P<sign>[-+]?)(?P<pre>{_TOKEN})(?P<sign2>[-+]?)(?P<number>[\d.,]+)(?P<post>{_TOKEN})")
_CURRENCY_WORDS = ISO_4217 | {"KR", "FR", "US"}
_FOURPLACES = Decimal("0.0001")
_MAX_MONEY = Decimal(10) ** 14  # the warehouse stores Numeric(18, 4)


def _number_pattern(decimal: str) -> re.Pattern[str]:
    # Group separators must sit every three digits, so "1,5" read with decimal
    # "." is refused rather than silently becoming 15.
    d, g = re.escape(decimal), re.escape("," if decimal == "." else ".")
    return re.compile(rf"(?:\d+|\d{{1,3}}(?:{g}\d{{3}})+)(?:{d}\d*)?|{d}\d+")


_NUMBERS = {sep: _number_pattern(sep) for sep in ".,"}


def _currency_word(token: str) -> bool:
    letters = "".join(char for char in token if char.isalpha()).upper()
    return not letters or letters in _CURRENCY_WORDS


def _parse_value(text: str, decimal: str) -> Result:
    # split() drops every kind of white space, the non-breaking ones included.
    compact = "".join(text.split()).replace("\u2212", "-").replace("'", "").replace("\u2019", "")
    if not compact:
        return None, None
    match = _AMOUNT.fullmatch(compact)
    if (
        not match
        or (match["sign"] and match["sign2"])
        or not _NUMBERS[decimal].fullmatch(match["number"])
        or not all(_currency_word(match[side]) for side in ("pre", "post"))
    ):
        return None, "value_unparseable"
    group = "," if decimal == "." else "."
    digits = match["number"].replace(group, "").replace(decimal, ".")
    try:
        value = Decimal(match["sign"] + match["sign2"] + digits).quantize(_FOURPLACES)
    except InvalidOperation:
        return None, "value_unparseable"
    if value < 0:
        return None, "value_negative"
    if value >= _MAX_MONEY:
        return None, "value_unparseable"
    return value, None


def parse_values(raw: pd.Series, decimal: str) -> pd.DataFrame:
    """Columns ``value`` (Decimal, 4 places, or None) and ``reason``; blank is no value, not an error."""
    if decimal not in _NUMBERS:
        raise ValueError(f"decimal separator must be '.' or ',', got {decimal!r}")
    return _map_distinct(raw, lambda key: _parse_value(key, decimal), ("value", "reason"))


# --- currencies -----------------------------------------------------------------


def normalise_currencies(raw: pd.Series, default: str) -> pd.DataFrame:
    """Columns ``currency`` (ISO 4217 code or None) and ``reason``; blank takes the account default."""
    codes = _keys(raw).str.upper().astype(object)
    codes = codes.where(codes != "", default.strip().upper())
    known = codes.isin(ISO_4217)
    reason = pd.Series("currency_unknown", index=raw.index, dtype=object).where(~known, None)
    return pd.DataFrame({"currency": codes.where(known, None), "reason": reason}, index=raw.index)


__all__ = [
    "future_times",
    "normalise_currencies",
    "normalise_distinct",
    "normalise_phone",
    "normalise_phones",
    "parse_local_times",
    "parse_values",
]
