"""Stage 3 normalisation: phones, local times, values, currencies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import pandas as pd
import pytest

from callconv.intake import normalise
from callconv.intake.normalise import (
    future_times,
    normalise_currencies,
    normalise_distinct,
    normalise_phone,
    normalise_phones,
    parse_local_times,
    parse_values,
)

OSLO = ZoneInfo("Europe/Oslo")


def utc(*args: int) -> pd.Timestamp:
    return pd.Timestamp(datetime(*args, tzinfo=UTC))


# --- phones ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "region", "expected"),
    [
        # Norway: no trunk prefix, 00 and + international forms
        ("912 34 567", "NO", "+4791234567"),
        ("+47 912 34 567", "NO", "+4791234567"),
        ("0047 91 23 45 67", "NO", "+4791234567"),
        ("(+47) 912.34.567", "NO", "+4791234567"),
        ("  22 12 34 56  ", "NO", "+4722123456"),
        # Germany: trunk 0, the "(0)" written inside international numbers
        ("030 12345678", "DE", "+493012345678"),
        ("+49 (0)30 1234-5678", "DE", "+493012345678"),
        ("0049 30 12345678", "DE", "+493012345678"),
        ("0151 23456789", "DE", "+4915123456789"),
        # United Kingdom
        ("020 7946 0958", "GB", "+442079460958"),
        ("+44 (0) 20 7946 0958", "GB", "+442079460958"),
        ("07400 123456", "GB", "+447400123456"),
        ("0044 7400 123456", "GB", "+447400123456"),
        # United States: 011 is its own international prefix, 00 still works
        ("(415) 555-2671", "US", "+14155552671"),
        ("+1 415-555-2671", "US", "+14155552671"),
        ("1-415-555-2671", "US", "+14155552671"),
        ("011 47 912 34 567", "US", "+4791234567"),
        ("0049 30 12345678", "US", "+493012345678"),
        # France
        ("01 23 45 67 89", "FR", "+33123456789"),
        ("06 12 34 56 78", "FR", "+33612345678"),
        ("+33 (0)6 12 34 56 78", "FR", "+33612345678"),
        ("0033 6.12.34.56.78", "FR", "+33612345678"),
        # Sweden
        ("08-123 456 78", "SE", "+46812345678"),
        ("070-123 45 67", "SE", "+46701234567"),
        # A foreign number in + form ignores the account's region
        ("+46 70 123 45 67", "NO", "+46701234567"),
        # Extensions are dropped
        ("+47 912 34 567 ext. 12", "NO", "+4791234567"),
        ("912 34 567 x12", "NO", "+4791234567"),
        ("tel:+47-912-34-567;ext=99", "GB", "+4791234567"),
        ("415.555.2671 x12", "US", "+14155552671"),
        ("070 123 45 67 ext. 5", "SE", "+46701234567"),
    ],
)
def test_normalise_phone_valid(raw: str, region: str, expected: str) -> None:
    assert normalise_phone(raw, region) == (expected, None)


@pytest.mark.parametrize(
    ("raw", "region", "reason"),
    [
        (None, "NO", "phone_missing"),
        ("", "NO", "phone_missing"),
        ("   ", "NO", "phone_missing"),
        (float("nan"), "NO", "phone_missing"),
        ("abc", "NO", "phone_unparseable"),
        ("n/a", "NO", "phone_unparseable"),
        ("+999 12345678", "NO", "phone_unparseable"),
        ("912", "NO", "phone_too_short"),
        ("0047 912", "NO", "phone_too_short"),
        ("555-2671", "US", "phone_too_short"),
        ("9123456789012345", "NO", "phone_too_long"),
        ("+4791234567891234567", "NO", "phone_too_long"),
        ("12345678", "NO", "phone_invalid_for_region"),
        ("07700 900123", "GB", "phone_invalid_for_region"),
    ],
)
def test_normalise_phone_rejects_with_reason(raw: object, region: str, reason: str) -> None:
    assert normalise_phone(raw, region) == (None, reason)


def test_normalise_phones_frame_keeps_index_and_uses_none() -> None:
    raw = pd.Series(["+47 912 34 567", None, "912", "912 34 567", float("nan")], index=[10, 11, 12, 13, 14])

    out = normalise_phones(raw, "NO")

    assert list(out.columns) == ["e164", "reason"]
    assert out.index.tolist() == [10, 11, 12, 13, 14]
    assert out["e164"].tolist() == ["+4791234567", None, None, "+4791234567", None]
    assert out["reason"].tolist() == [None, "phone_missing", "phone_too_short", None, "phone_missing"]


def test_normalise_phones_empty_series() -> None:
    out = normalise_phones(pd.Series([], dtype=object), "NO")

    assert list(out.columns) == ["e164", "reason"]
    assert len(out) == 0


def test_normalise_phones_parses_each_distinct_value_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # One read (phone_fast's tables or phonenumbers) per distinct number as phonenumbers is given it.
    calls: list[str] = []
    real_read = normalise._read_folded
    monkeypatch.setattr(normalise, "_read_folded", lambda text, region: calls.append(text) or real_read(text, region))
    distinct = ["+47 912 34 567", "+49 30 12345678", "+44 20 7946 0958"]
    raw = pd.Series([distinct[i % 3] for i in range(1000)])

    out = normalise_phones(raw, "NO")

    assert len(calls) == 3
    assert sorted(calls) == sorted(number.replace(" ", "") for number in distinct)
    assert out["e164"].value_counts().to_dict() == {"+4791234567": 334, "+493012345678": 333, "+442079460958": 333}
    assert out["reason"].isna().all()


def test_normalise_distinct_returns_one_entry_per_value(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_read = normalise._read_folded
    monkeypatch.setattr(normalise, "_read_folded", lambda text, region: calls.append(text) or real_read(text, region))

    out = normalise_distinct(["912 34 567", "912", "912 34 567", "abc", "912"], "NO")

    assert out == {
        "912 34 567": ("+4791234567", None),
        "912": (None, "phone_too_short"),
        "abc": (None, "phone_unparseable"),
    }
    assert calls == ["91234567", "912", "abc"]


def test_the_ways_one_caller_is_written_share_one_read(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_read = normalise._read_folded
    monkeypatch.setattr(normalise, "_read_folded", lambda text, region: calls.append(text) or real_read(text, region))
    written = ["+47 912 34 567", "+47-912-34-567", "+47.912.34.567", "0047 912 34 567", "+4791234567"]

    out = normalise_phones(pd.Series(written * 200), "NO")

    assert set(out["e164"]) == {"+4791234567"}
    assert calls == ["+4791234567"]


# --- times ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # Ordinary winter (CET, +01:00) and summer (CEST, +02:00) times
        ("2026-01-15 10:00:00", utc(2026, 1, 15, 9, 0)),
        ("2026-07-01T12:00", utc(2026, 7, 1, 10, 0)),
        ("2026-07-01 12:00:00.250", utc(2026, 7, 1, 10, 0, 0, 250000)),
        ("2026-03-29", utc(2026, 3, 28, 23, 0)),
        ("2026/03/29 14:00", utc(2026, 3, 29, 12, 0)),
        ("2026/01/15 14:00", utc(2026, 1, 15, 13, 0)),
        # Spring forward 2026-03-29: 02:00 CET jumps to 03:00 CEST
        ("2026-03-29 01:59:59", utc(2026, 3, 29, 0, 59, 59)),
        ("2026-03-29 02:00:00", utc(2026, 3, 29, 1, 0)),
        ("2026-03-29 02:30:00", utc(2026, 3, 29, 1, 30)),  # non-existent: read as 03:30 CEST
        ("2026-03-29 03:30:00", utc(2026, 3, 29, 1, 30)),
        # Fall back 2026-10-25: 03:00 CEST returns to 02:00 CET
        ("2026-10-25 01:30:00", utc(2026, 10, 24, 23, 30)),
        ("2026-10-25 02:30:00", utc(2026, 10, 25, 0, 30)),  # ambiguous: first occurrence, CEST
        ("2026-10-25 03:30:00", utc(2026, 10, 25, 2, 30)),
        # Explicit offsets are instants: converted, never re-interpreted
        ("2026-03-29T02:30:00+02:00", utc(2026, 3, 29, 0, 30)),
        ("2026-10-25T02:30:00+01:00", utc(2026, 10, 25, 1, 30)),  # the second 02:30
        ("2026-03-29T00:30:00Z", utc(2026, 3, 29, 0, 30)),
        ("2026-03-29 14:00:00 +0200", utc(2026, 3, 29, 12, 0)),
        ("2026-03-29T14:00:00-05:00", utc(2026, 3, 29, 19, 0)),
    ],
)
def test_parse_local_times_in_oslo(raw: str, expected: pd.Timestamp) -> None:
    out = parse_local_times(pd.Series([raw]), OSLO)

    assert out["utc"].iloc[0] == expected
    assert out["reason"].iloc[0] is None


def test_parse_local_times_mixed_column() -> None:
    raw = pd.Series(
        [
            "2026-03-29 02:30:00",
            "2026-03-29T02:30:00+02:00",
            None,
            "2026-10-25 02:30:00",
            "2026-03-29T00:30:00Z",
            "29.03.2026 10:00",
            "",
        ],
        index=list("abcdefg"),
    )

    out = parse_local_times(raw, OSLO)

    assert str(out["utc"].dt.tz) == "UTC"
    assert out.index.tolist() == list("abcdefg")
    assert out["utc"].tolist()[:2] == [utc(2026, 3, 29, 1, 30), utc(2026, 3, 29, 0, 30)]
    assert out["utc"].iloc[3] == utc(2026, 10, 25, 0, 30)
    assert out["utc"].iloc[4] == utc(2026, 3, 29, 0, 30)
    assert out["utc"].isna().tolist() == [False, False, True, False, False, True, True]
    assert out["reason"].tolist() == [None, None, "time_missing", None, None, "time_unparseable", "time_missing"]


@pytest.mark.parametrize(
    "raw",
    [
        "not a time",
        "today",
        "now",
        "29.03.2026 10:00",  # day first is not accepted
        "03/29/2026 10:00",
        "2026-02-30 10:00",
        "2026-13-01",
        "2026-03-29 25:00",
        "2026-03-29 10:00 CET",  # a zone name is a guess, not an offset
        "20260329",
    ],
)
def test_parse_local_times_unparseable(raw: str) -> None:
    out = parse_local_times(pd.Series([raw]), OSLO)

    assert out["utc"].isna().tolist() == [True]
    assert out["reason"].tolist() == ["time_unparseable"]


def test_times_that_overflow_or_lie_outside_any_sale_are_out_of_range_never_an_error() -> None:
    raw = pd.Series(
        [
            "0001-01-01 00:30:00",  # year 0 in UTC, Oslo's offset being +00:43 then
            "9999-12-31 23:30:00-05:00",  # year 10000 in UTC
            "1899-12-31 23:00:00+00:00",
            "2200-01-01 00:00:00Z",
            "1900-01-01 00:00:00Z",
            "2199-12-31 23:59:59Z",
        ]
    )

    out = parse_local_times(raw, OSLO)

    assert out["reason"].tolist() == ["time_out_of_range"] * 4 + [None, None]
    assert out["utc"].isna().tolist() == [True] * 4 + [False, False]


def test_parse_local_times_parses_each_distinct_value_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = normalise._parse_time
    monkeypatch.setattr(normalise, "_parse_time", lambda text, tz: calls.append(text) or real(text, tz))
    raw = pd.Series(["2026-03-29 02:30:00", " 2026-03-29 02:30:00 ", "2026-10-25 02:30:00"] * 200)

    out = parse_local_times(raw, OSLO)

    assert calls == ["2026-03-29 02:30:00", "2026-10-25 02:30:00"]
    assert out["utc"].value_counts().to_dict() == {utc(2026, 3, 29, 1, 30): 400, utc(2026, 10, 25, 0, 30): 200}


def test_future_times_is_strictly_after_window_end() -> None:
    window_end = datetime(2026, 3, 30, 0, 0, tzinfo=UTC)
    times = pd.Series(
        [utc(2026, 3, 29, 23, 59), utc(2026, 3, 30, 0, 0), utc(2026, 3, 30, 0, 0, 1), pd.NaT],
        index=[5, 6, 7, 8],
    )

    out = future_times(times, window_end)

    assert out.tolist() == [False, False, True, False]
    assert out.index.tolist() == [5, 6, 7, 8]


def test_future_times_accepts_window_end_in_another_zone() -> None:
    window_end = datetime(2026, 3, 30, 2, 0, tzinfo=timezone(timedelta(hours=2)))  # 00:00 UTC
    times = parse_local_times(pd.Series(["2026-03-30 01:30", "2026-03-30 02:30"]), OSLO)["utc"]

    assert future_times(times, window_end).tolist() == [False, True]


def test_future_times_refuses_naive_window_end() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        future_times(pd.Series([utc(2026, 3, 30)]), datetime(2026, 3, 30))


# --- values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "decimal", "expected"),
    [
        ("1.234,50", ",", "1234.5000"),
        ("99,5", ",", "99.5000"),
        ("1234", ",", "1234.0000"),
        ("0,00", ",", "0.0000"),
        ("1 234,50", ",", "1234.5000"),
        ("1\u00a0234,50 kr", ",", "1234.5000"),
        ("NOK 1\u202f234,50", ",", "1234.5000"),
        ("€99,50", ",", "99.5000"),
        ("kr. 1.000.000", ",", "1000000.0000"),
        ("1,234.50", ".", "1234.5000"),
        ("$1,234.50", ".", "1234.5000"),
        ("USD 10", ".", "10.0000"),
        ("1'234.50 CHF", ".", "1234.5000"),
        ("0.12345", ".", "0.1234"),
        (".5", ".", "0.5000"),
        ("+7.25", ".", "7.2500"),
    ],
)
def test_parse_values_reads_both_decimal_separators(raw: str, decimal: str, expected: str) -> None:
    out = parse_values(pd.Series([raw]), decimal)

    assert str(out["value"].iloc[0]) == expected
    assert isinstance(out["value"].iloc[0], Decimal)
    assert out["reason"].iloc[0] is None


@pytest.mark.parametrize(
    ("raw", "decimal", "reason"),
    [
        ("-99,50", ",", "value_negative"),
        ("kr -5", ",", "value_negative"),
        ("\u2212 5", ",", "value_negative"),
        ("-$5", ".", "value_negative"),
        ("$-1,234.50", ".", "value_negative"),
        ("abc", ",", "value_unparseable"),
        ("12abc", ",", "value_unparseable"),
        ("1,2,3", ",", "value_unparseable"),
        ("1.23.4", ",", "value_unparseable"),
        ("--5", ".", "value_unparseable"),
        ("1e5", ".", "value_unparseable"),
        ("1,5", ".", "value_unparseable"),  # decimal comma in a "." file: refused, not read as 15
        ("1.234,50", ".", "value_unparseable"),
        ("100000000000000", ".", "value_unparseable"),  # does not fit Numeric(18, 4)
    ],
)
def test_parse_values_rejects_with_reason(raw: str, decimal: str, reason: str) -> None:
    out = parse_values(pd.Series([raw]), decimal)

    assert out["value"].tolist() == [None]
    assert out["reason"].tolist() == [reason]


def test_parse_values_blank_is_no_value_and_no_reason() -> None:
    out = parse_values(pd.Series(["", "  ", None, "\u00a0", "10,5"], index=[3, 1, 4, 1, 5]), ",")

    assert out.index.tolist() == [3, 1, 4, 1, 5]
    assert out["value"].tolist() == [None, None, None, None, Decimal("10.5")]
    assert out["reason"].tolist() == [None, None, None, None, None]


def test_parse_values_refuses_unknown_separator() -> None:
    with pytest.raises(ValueError, match="decimal separator"):
        parse_values(pd.Series(["1"]), ";")


# --- currencies -----------------------------------------------------------------


def test_normalise_currencies() -> None:
    raw = pd.Series([" nok", None, "", "  ", "eur", "USD", "XYZ", "kr"], index=range(20, 28))

    out = normalise_currencies(raw, "NOK")

    assert out.index.tolist() == list(range(20, 28))
    assert out["currency"].tolist() == ["NOK", "NOK", "NOK", "NOK", "EUR", "USD", None, None]
    assert out["reason"].tolist() == [None, None, None, None, None, None, "currency_unknown", "currency_unknown"]
