"""Stage 3 for one extract, without a database: normalise_sales and sale_key."""

from __future__ import annotations

import hashlib
import hmac
import math
from datetime import UTC, date, datetime
from decimal import Decimal

import pandas as pd
import pytest

from callconv.config import DEFAULT_CONFIG_PATH, load_settings
from callconv.intake.take_in import _Extract, _sale_records, business_date_of, normalise_sales, sale_key
from callconv.protection.pseudonyms import PseudonymKey

KEY = PseudonymKey("unit-1", bytes(range(32)))
OTHER_KEY = PseudonymKey("unit-2", bytes(range(1, 33)))

WINDOW_END = datetime(2026, 3, 3, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def settings():
    return load_settings(DEFAULT_CONFIG_PATH)


@pytest.fixture(scope="module")
def account(settings):
    return settings.account("nordic_plumbing")


def utc(*args: int) -> pd.Timestamp:
    return pd.Timestamp(datetime(*args, tzinfo=UTC))


def frame(rows: list[dict], start: int = 1) -> pd.DataFrame:
    """Validated rows as extract.py hands them on: text cells, missing as NaN, 1-based index."""
    out = pd.DataFrame(rows, index=range(start, start + len(rows)), dtype=object)
    return out.where(out.notna(), float("nan"))


def sale(**cells) -> dict:
    base = {
        "crm_id": "S-1",
        "caller_phone": "912 34 567",
        "conversion_time": "2026-03-02 10:15:00",
        "outcome": "sale",
        "value": "1 234,50",
        "currency": "NOK",
        "call_start": "2026-03-02 10:00",
    }
    base.update(cells)
    return base


# --- normalise_sales ---------------------------------------------------------------


def test_clean_sales_are_e164_and_utc(settings, account):
    good = frame(
        [
            sale(),
            sale(
                crm_id=None,
                caller_phone="+47 22 12 34 56",
                conversion_time="2026-03-02T20:00:00Z",
                outcome=" upsell ",
                value=None,
                currency="eur",
                call_start=None,
            ),
        ]
    )

    clean, rejected = normalise_sales(good, account, settings, WINDOW_END)

    assert rejected == {}
    assert list(clean.index) == [1, 2]
    first = clean.loc[1].to_dict()
    assert first == {
        "crm_id": "S-1",
        "caller_e164": "+4791234567",
        "conversion_time": utc(2026, 3, 2, 9, 15),  # 10:15 in Oslo (CET, +01:00)
        "crm_call_start": utc(2026, 3, 2, 9, 0),
        "outcome": "sale",
        "conversion_value": Decimal("1234.5000"),  # decimal comma and space grouping from the config
        "currency_code": "NOK",
    }
    second = clean.loc[2]
    assert second["caller_e164"] == "+4722123456"
    assert second["conversion_time"] == utc(2026, 3, 2, 20, 0)  # an instant is only converted
    assert second["outcome"] == "upsell"  # stripped
    assert second["conversion_value"] is None
    assert second["currency_code"] == "EUR"
    assert pd.isna(second["crm_call_start"])
    assert pd.isna(second["crm_id"])
    assert str(clean["conversion_time"].dt.tz) == "UTC"


def test_summer_time_is_two_hours_ahead(settings, account):
    window_end = datetime(2026, 7, 2, tzinfo=UTC)
    clean, rejected = normalise_sales(
        frame([sale(conversion_time="2026-07-01 12:00", call_start="2026-07-01 11:58:30")]),
        account,
        settings,
        window_end,
    )
    assert rejected == {}
    assert clean.loc[1, "conversion_time"] == utc(2026, 7, 1, 10, 0)
    assert clean.loc[1, "crm_call_start"] == utc(2026, 7, 1, 9, 58, 30)


def test_blank_currency_takes_the_account_default(settings, account):
    clean, rejected = normalise_sales(frame([sale(currency=None)]), account, settings, WINDOW_END)
    assert rejected == {}
    assert clean.loc[1, "currency_code"] == "NOK"


def test_frame_without_optional_columns(settings, account):
    good = frame([{"caller_phone": "912 34 567", "conversion_time": "2026-03-02 10:15", "outcome": "sale"}])
    clean, rejected = normalise_sales(good, account, settings, WINDOW_END)
    assert rejected == {}
    row = clean.loc[1]
    assert row["caller_e164"] == "+4791234567"
    assert row["conversion_value"] is None
    assert row["currency_code"] == "NOK"
    assert row["crm_id"] is None
    assert pd.isna(row["crm_call_start"])


def test_rejected_rows_map_to_reasons(settings, account):
    good = frame(
        [
            sale(crm_id="ok"),  # 1
            sale(crm_id="short", caller_phone="123"),  # 2
            sale(crm_id="future", conversion_time="2026-03-03 01:00:01"),  # 3: 00:00:01 UTC, after window end
            sale(crm_id="negative", value="-5,00"),  # 4
            sale(crm_id="no phone", caller_phone=None),  # 5
            sale(crm_id="no time", conversion_time=None),  # 6
            sale(crm_id="words", conversion_time="yesterday"),  # 7
            sale(crm_id="garbage value", value="lots"),  # 8
            sale(crm_id="currency", currency="XXQ"),  # 9
            sale(crm_id="long", caller_phone="+47 912 34 567 8901 2345"),  # 10
            sale(crm_id="bad call start", call_start="junk"),  # 11: a hint only, never a reason
            sale(crm_id="edge", conversion_time="2026-03-03 01:00:00"),  # 12: exactly the window end
        ]
    )

    clean, rejected = normalise_sales(good, account, settings, WINDOW_END)

    assert rejected == {
        2: "phone_too_short",
        3: "time_in_future",
        4: "value_negative",
        5: "phone_missing",
        6: "time_missing",
        7: "time_unparseable",
        8: "value_unparseable",
        9: "currency_unknown",
        10: "phone_too_long",
    }
    assert list(clean.index) == [1, 11, 12]
    assert clean["crm_id"].tolist() == ["ok", "bad call start", "edge"]
    assert pd.isna(clean.loc[11, "crm_call_start"])
    assert clean.loc[12, "conversion_time"] == utc(2026, 3, 3, 0, 0)


def test_first_reason_wins_phone_before_time_before_value(settings, account):
    good = frame(
        [
            sale(caller_phone="123", conversion_time="yesterday", value="-1", currency="XXQ"),
            sale(conversion_time="yesterday", value="-1", currency="XXQ"),
            sale(value="-1", currency="XXQ"),
            sale(conversion_time="2027-01-01 00:00", value="-1"),  # a bad value outranks the future check
        ]
    )
    _, rejected = normalise_sales(good, account, settings, WINDOW_END)
    assert rejected == {1: "phone_too_short", 2: "time_unparseable", 3: "value_negative", 4: "value_negative"}


def test_index_is_kept_from_the_extract(settings, account):
    good = frame([sale(crm_id="a"), sale(crm_id="b", caller_phone="123")], start=41)
    clean, rejected = normalise_sales(good, account, settings, WINDOW_END)
    assert list(clean.index) == [41]
    assert rejected == {42: "phone_too_short"}


def test_naive_window_end_is_refused(settings, account):
    with pytest.raises(ValueError, match="window_end must be timezone-aware"):
        normalise_sales(frame([sale()]), account, settings, datetime(2026, 3, 3))


# --- sale_key ---------------------------------------------------------------------------


def content(**overrides) -> dict:
    base = {
        "caller_e164": "+4791234567",
        "conversion_time": utc(2026, 3, 2, 9, 15),
        "outcome": "sale",
        "conversion_value": Decimal("1234.5000"),
    }
    base.update(overrides)
    return base


def test_sale_key_with_crm_id_ignores_the_content():
    key = sale_key("acme", "S-1", content(), KEY)
    assert key == sale_key("acme", "S-1", content(caller_e164="+4722123456", outcome="upsell"), KEY)
    assert key == sale_key("acme", "S-1", content(conversion_time=utc(2026, 1, 1), conversion_value=None), KEY)
    assert key == sale_key("acme", " S-1 ", content(), KEY)  # whitespace around the id is not identity
    # Keyed too: a redacted sale is not found again from its CRM id without the key.
    assert key == hmac.new(KEY.secret, b"acme|crm|S-1", hashlib.sha256).hexdigest()
    assert key != hashlib.sha256(b"acme|crm|S-1").hexdigest() and key != sale_key("acme", "S-1", content(), OTHER_KEY)


def test_sale_key_with_crm_id_differs_by_id_and_account():
    key = sale_key("acme", "S-1", content(), KEY)
    assert sale_key("acme", "S-2", content(), KEY) != key
    assert sale_key("other", "S-1", content(), KEY) != key


@pytest.mark.parametrize("crm_id", [None, ""])
def test_sale_key_without_crm_id_is_an_hmac_of_the_content(crm_id):
    key = sale_key("acme", crm_id, content(), KEY)
    assert key == sale_key("acme", crm_id, content(), KEY)
    text = b"acme|+4791234567|2026-03-02T09:15:00+00:00|sale|1234.5000"
    assert key == hmac.new(KEY.secret, text, hashlib.sha256).hexdigest()
    # The content holds the caller's number: without the key, its plain hash is not the key.
    assert key != hashlib.sha256(text).hexdigest()
    assert sale_key("acme", crm_id, content(), OTHER_KEY) != key
    assert sale_key("acme", crm_id, content(caller_e164="+4722123456"), KEY) != key
    assert sale_key("acme", crm_id, content(conversion_time=utc(2026, 3, 2, 9, 16)), KEY) != key
    assert sale_key("acme", crm_id, content(outcome="upsell"), KEY) != key
    assert sale_key("acme", crm_id, content(conversion_value=Decimal("1234.6000")), KEY) != key
    assert sale_key("acme", crm_id, content(conversion_value=None), KEY) != key
    assert sale_key("other", crm_id, content(), KEY) != key


def test_sale_key_with_and_without_crm_id_differ():
    assert sale_key("acme", "S-1", content(), KEY) != sale_key("acme", None, content(), KEY)


def test_sale_key_same_instant_in_another_zone_is_the_same_sale():
    oslo = pd.Timestamp("2026-03-02 10:15:00", tz="Europe/Oslo")
    assert sale_key("acme", None, content(conversion_time=oslo), KEY) == sale_key("acme", None, content(), KEY)
    assert sale_key("acme", None, content(conversion_time=oslo.tz_convert("UTC")), KEY) == sale_key(
        "acme", None, content(), KEY
    )


def test_the_same_sale_twice_in_a_chunk_keeps_the_first_row(settings, account):
    # No CRM id and the same sale once normalised: one sale, from the first row, as the
    # validator keeps the first row of a repeated CRM id.
    good = frame(
        [
            sale(crm_id=None, caller_phone="912 34 567"),
            sale(crm_id=None, caller_phone="+47 91 23 45 67"),
            sale(crm_id="S-9"),
        ],
        start=4,
    )
    sales, rejected = normalise_sales(good, account, settings, WINDOW_END)
    assert rejected == {}
    extract = _Extract("deals.csv", "c" * 64, 3, list(good.columns), lambda: [good])

    records = _sale_records(sales, account, extract, date(2026, 3, 2), KEY)

    assert [(record["source_row"], record["crm_id"]) for record in records] == [(4, None), (6, "S-9")]
    assert [record["sale_key_id"] for record in records] == [KEY.key_id, KEY.key_id]


# --- business date ------------------------------------------------------------------------


def test_business_date_is_the_accounts_local_day(account):
    assert business_date_of(account, datetime(2026, 3, 1, 23, 0, tzinfo=UTC)) == date(2026, 3, 2)
    assert business_date_of(account, datetime(2026, 3, 1, 22, 59, tzinfo=UTC)) == date(2026, 3, 1)
    assert business_date_of(account, datetime(2026, 6, 30, 22, 0, tzinfo=UTC)) == date(2026, 7, 1)


def test_nan_in_frame_helper_is_missing():
    assert math.isnan(frame([sale(currency=None)]).loc[1, "currency"])
