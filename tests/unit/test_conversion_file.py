"""Stage 5 (file path): Google's call-conversion import template, rendered without a database."""

from __future__ import annotations

import csv
import io
import re
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from callconv.config import DEFAULT_CONFIG_PATH, load_settings, parse_settings
from callconv.delivery.conversion_file import TEMPLATE_HEADER, file_name, phone_cell, render, safe_text

SALE_ID = "555000111"
UPSELL_ID = "555000222"


def make_account(actions: dict | None = None, consent: dict | None = None, timezone_name: str = "Europe/Oslo"):
    account = {
        "id": "acme",
        "customer_id": "123-456-7890",
        "timezone": timezone_name,
        "default_region": "NO",
        "default_currency": "NOK",
        "conversion_actions": actions or {"sale": {"id": SALE_ID, "name": "Phone sale"}},
    }
    if consent:
        account["consent"] = consent
    raw = {
        "crm_source": {"columns": {"caller_phone": "Tel", "conversion_time": "Tid", "outcome": "Utfall"}},
        "accounts": [account],
    }
    return parse_settings(raw).accounts[0]


def row(**overrides) -> dict:
    base = {
        "caller_e164": "+4791234567",
        "call_start": datetime(2026, 1, 15, 9, 0, 5, tzinfo=UTC),
        "conversion_action_id": SALE_ID,
        "conversion_time": datetime(2026, 1, 15, 10, 30, 0, tzinfo=UTC),
        "conversion_value": Decimal("1234.5000"),
        "currency_code": "NOK",
    }
    base.update(overrides)
    return base


def read_back(payload: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(payload.decode("utf-8"))))


def data_row(account, **overrides) -> dict[str, str]:
    rows = read_back(render(account, [row(**overrides)]))
    assert len(rows) == 3
    return dict(zip(TEMPLATE_HEADER, rows[2], strict=True))


@pytest.fixture(scope="module")
def shipped_account():
    return load_settings(DEFAULT_CONFIG_PATH).account("nordic_plumbing")


# --- layout -----------------------------------------------------------------------


def test_header_constant_is_googles_template():
    assert TEMPLATE_HEADER == (
        "Caller's Phone Number",
        "Call Start Time",
        "Conversion Name",
        "Conversion Time",
        "Conversion Value",
        "Conversion Currency",
        "Ad User Data",
        "Ad Personalization",
    )


def test_parameters_row_then_header(shipped_account):
    rows = read_back(render(shipped_account, [row()]))
    assert rows[0] == ["Parameters:TimeZone=Europe/Oslo"]
    assert tuple(rows[1]) == TEMPLATE_HEADER


def test_empty_day_is_parameters_and_header_only(shipped_account):
    payload = render(shipped_account, [])
    assert payload == (
        b"Parameters:TimeZone=Europe/Oslo\r\n"
        b"Caller's Phone Number,Call Start Time,Conversion Name,Conversion Time,"
        b"Conversion Value,Conversion Currency,Ad User Data,Ad Personalization\r\n"
    )


def test_exact_bytes_of_one_row(shipped_account):
    payload = render(shipped_account, [row()])
    assert payload.decode("utf-8").splitlines()[2] == (
        "\t+4791234567,2026-01-15 10:00:05+01:00,Phone sale,2026-01-15 11:30:00+01:00,1234.5,NOK,Granted,Denied"
    )


def test_parameters_row_names_the_accounts_zone():
    account = make_account(timezone_name="America/New_York")
    rows = read_back(render(account, [row()]))
    assert rows[0] == ["Parameters:TimeZone=America/New_York"]
    assert rows[2][1] == "2026-01-15 04:00:05-05:00"  # 09:00:05 UTC is 04:00:05 EST


# --- times --------------------------------------------------------------------------


def test_winter_times_are_oslo_local(shipped_account):
    cells = data_row(shipped_account)
    assert cells["Call Start Time"] == "2026-01-15 10:00:05+01:00"
    assert cells["Conversion Time"] == "2026-01-15 11:30:00+01:00"


def test_summer_times_are_oslo_local_at_plus_two(shipped_account):
    cells = data_row(
        shipped_account,
        call_start=datetime(2026, 7, 1, 8, 59, 59, tzinfo=UTC),
        conversion_time=datetime(2026, 7, 1, 12, 0, 0, tzinfo=timezone(timedelta(hours=2))),
    )
    assert cells["Call Start Time"] == "2026-07-01 10:59:59+02:00"  # summer time
    assert cells["Conversion Time"] == "2026-07-01 12:00:00+02:00"  # already +02:00, written as is


def test_naive_times_are_taken_as_utc(shipped_account):
    cells = data_row(
        shipped_account,
        call_start=datetime(2026, 7, 1, 9, 0, 0),
        conversion_time=datetime(2026, 12, 31, 23, 30, 0),
    )
    assert cells["Call Start Time"] == "2026-07-01 11:00:00+02:00"
    assert cells["Conversion Time"] == "2027-01-01 00:30:00+01:00"  # crosses the year in local time


def test_times_on_the_oslo_autumn_change_night_are_distinct_and_read_back_to_their_instants(shipped_account):
    # 2026-10-25 in Oslo: clocks go back from 03:00 CEST to 02:00 CET, so 02:00-03:00 happens twice.
    # Each pair is the same wall time an hour apart; without an offset the file could not tell them apart.
    pairs = [
        (datetime(2026, 10, 25, 0, 10, tzinfo=UTC), datetime(2026, 10, 25, 1, 10, tzinfo=UTC), "02:10:00"),
        (datetime(2026, 10, 25, 0, 30, tzinfo=UTC), datetime(2026, 10, 25, 1, 30, tzinfo=UTC), "02:30:00"),
    ]
    rows = []
    for summer, winter, _ in pairs:
        rows.append(row(call_start=summer, conversion_time=summer + timedelta(minutes=5)))
        rows.append(row(call_start=winter, conversion_time=winter + timedelta(minutes=5)))
    back = read_back(render(shipped_account, rows))
    assert back[0] == ["Parameters:TimeZone=Europe/Oslo"]
    cells = [dict(zip(TEMPLATE_HEADER, line, strict=True)) for line in back[2:]]

    for index, (summer, winter, wall) in enumerate(pairs):
        first, second = cells[2 * index], cells[2 * index + 1]
        assert first["Call Start Time"] == f"2026-10-25 {wall}+02:00"
        assert second["Call Start Time"] == f"2026-10-25 {wall}+01:00"
        assert first["Call Start Time"] != second["Call Start Time"]
        # What the file says is the instant each row stands for: one hour apart, as in the warehouse.
        for written, instant in ((first, summer), (second, winter)):
            assert datetime.strptime(written["Call Start Time"], "%Y-%m-%d %H:%M:%S%z") == instant
            converted = datetime.strptime(written["Conversion Time"], "%Y-%m-%d %H:%M:%S%z")
            assert converted == instant + timedelta(minutes=5)
            assert datetime.fromisoformat(written["Call Start Time"]).astimezone(UTC) == instant


def test_every_time_carries_an_offset_in_googles_format(shipped_account):
    pattern = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2}$")
    instants = [datetime(2026, 3, 29, 0, 59, 59, tzinfo=UTC), datetime(2026, 3, 29, 1, 0, tzinfo=UTC)]
    back = read_back(render(shipped_account, [row(call_start=moment) for moment in instants]))
    starts = [line[1] for line in back[2:]]
    assert starts == ["2026-03-29 01:59:59+01:00", "2026-03-29 03:00:00+02:00"]  # the spring gap
    assert all(pattern.match(line[1]) and pattern.match(line[3]) for line in back[2:])


def test_microseconds_are_not_written(shipped_account):
    cells = data_row(shipped_account, call_start=datetime(2026, 1, 15, 9, 0, 5, 999999, tzinfo=UTC))
    assert cells["Call Start Time"] == "2026-01-15 10:00:05+01:00"


# --- names, values, consent --------------------------------------------------------------


def test_conversion_name_is_the_action_name_not_its_id(shipped_account):
    assert data_row(shipped_account)["Conversion Name"] == "Phone sale"
    cells = data_row(shipped_account, conversion_action_id=UPSELL_ID)
    assert cells["Conversion Name"] == "Support upsell"
    assert UPSELL_ID not in render(shipped_account, [row(conversion_action_id=UPSELL_ID)]).decode()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Decimal("1234.5000"), "1234.5"),
        (Decimal("100.0000"), "100"),
        (Decimal("0.5000"), "0.5"),
        (Decimal("0.0100"), "0.01"),
        (Decimal("1000000.0000"), "1000000"),
        (Decimal("99999999999999.9999"), "99999999999999.9999"),
        (Decimal("0.0000"), "0"),
        (None, ""),
    ],
)
def test_value_formatting(shipped_account, value, expected):
    assert data_row(shipped_account, conversion_value=value)["Conversion Value"] == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Decimal("100"), "100"),
        (Decimal("10"), "10"),
        (Decimal("0"), "0"),
        (Decimal("1E+2"), "100"),
    ],
)
def test_value_formatting_of_whole_decimals_without_scale(shipped_account, value, expected):
    assert data_row(shipped_account, conversion_value=value)["Conversion Value"] == expected


def test_currency_column(shipped_account):
    assert data_row(shipped_account, currency_code="EUR")["Conversion Currency"] == "EUR"
    assert data_row(shipped_account, currency_code=None)["Conversion Currency"] == ""


def test_consent_columns_from_the_account(shipped_account):
    cells = data_row(shipped_account)
    assert cells["Ad User Data"] == "Granted"
    assert cells["Ad Personalization"] == "Denied"


def test_consent_defaults_to_unknown():
    cells = data_row(make_account())
    assert cells["Ad User Data"] == "Unknown"
    assert cells["Ad Personalization"] == "Unknown"


def test_consent_other_way_round():
    account = make_account(consent={"ad_user_data": "DENIED", "ad_personalization": "GRANTED"})
    cells = data_row(account)
    assert (cells["Ad User Data"], cells["Ad Personalization"]) == ("Denied", "Granted")


# --- spreadsheet safety ------------------------------------------------------------------


def test_phone_cell_keeps_the_e164_after_a_tab(shipped_account):
    payload = render(shipped_account, [row(caller_e164="+4722123456")])
    cell = read_back(payload)[2][0]
    assert cell == "\t+4722123456"
    assert cell.startswith("\t") and cell[1:] == "+4722123456"
    assert cell.strip() == "+4722123456"  # what Google's importer reads after trimming
    assert not cell.startswith("'")
    assert phone_cell("+14155552671") == "\t+14155552671"


@pytest.mark.parametrize("name", ['=HYPERLINK("http://x")', "+cmd", "-2+3", "@SUM(A1)", "\tTabbed"])
def test_action_name_that_looks_like_a_formula_is_neutralised(name):
    account = make_account(actions={"sale": {"id": SALE_ID, "name": name}})
    assert data_row(account)["Conversion Name"] == f"'{name}"


@pytest.mark.parametrize("name", ["Phone sale", "Salg på telefon", "Sale = win", "100% sale", "'quoted"])
def test_ordinary_action_name_is_untouched(name):
    account = make_account(actions={"sale": {"id": SALE_ID, "name": name}})
    assert data_row(account)["Conversion Name"] == name


def test_currency_cell_is_neutralised_too(shipped_account):
    assert data_row(shipped_account, currency_code="=X")["Conversion Currency"] == "'=X"


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("=1", "'=1"),
        ("+1", "'+1"),
        ("-1", "'-1"),
        ("@a", "'@a"),
        ("\ta", "'\ta"),
        ("\ra", "'\ra"),
        ("a=1", "a=1"),
        ("", ""),
        ("NOK", "NOK"),
    ],
)
def test_safe_text(cell, expected):
    assert safe_text(cell) == expected


# --- the file as a whole -------------------------------------------------------------------


def test_reading_back_gives_one_row_per_conversion(shipped_account):
    rows = [
        row(),
        row(caller_e164="+4722123456", conversion_action_id=UPSELL_ID, conversion_value=None),
        row(caller_e164="+4791111111", conversion_value=Decimal("5.2500"), currency_code="EUR"),
    ]
    back = read_back(render(shipped_account, rows))
    assert len(back) == 2 + len(rows)
    assert all(len(r) == len(TEMPLATE_HEADER) for r in back[1:])
    assert [r[0].strip() for r in back[2:]] == ["+4791234567", "+4722123456", "+4791111111"]
    assert [r[2] for r in back[2:]] == ["Phone sale", "Support upsell", "Phone sale"]
    assert [r[4] for r in back[2:]] == ["1234.5", "", "5.25"]


def test_names_with_commas_quotes_and_newlines_survive_a_round_trip():
    name = 'Sale, "big"\nsecond line'
    account = make_account(actions={"sale": {"id": SALE_ID, "name": name}})
    back = read_back(render(account, [row(), row(caller_e164="+4722123456")]))
    assert len(back) == 4
    assert back[2][2] == name
    assert back[3][2] == name


@pytest.mark.parametrize("name", ["Phone\rsale", "\rsale"])
def test_names_with_a_carriage_return_survive_a_round_trip(name):
    account = make_account(actions={"sale": {"id": SALE_ID, "name": name}})
    back = read_back(render(account, [row()]))
    assert len(back) == 3
    assert back[2][2] in (name, f"'{name}")


def test_render_is_deterministic_and_utf8(shipped_account):
    account = make_account(actions={"sale": {"id": SALE_ID, "name": "Salg på telefon"}})
    first = render(account, [row(), row(caller_e164="+4722123456")])
    assert first == render(account, [row(), row(caller_e164="+4722123456")])
    assert "Salg på telefon".encode() in first


def test_file_name():
    assert file_name("acme", date(2026, 3, 2)) == "call_conversions_acme_2026-03-02.csv"
