"""Stage 5 (file path): the day's conversions in Google's call-conversion import template.

The layout is Google's: an optional ``Parameters:TimeZone=`` row, the header
row, then one row per conversion. Header names live in one constant because
they come from Google's template, not from code.

Every time is written in the account's zone *with its UTC offset*,
``yyyy-mm-dd hh:mm:ss+hh:mm``, which Google's template accepts. The
``Parameters:TimeZone=`` row applies only to times without an offset, and a
local time alone is ambiguous once a year: on the autumn change night in Oslo
02:30 happens at +02:00 and again at +01:00. With the offset each row names
one instant; the zone row stays for people reading the file.

The file must be safe to open in a spreadsheet: text cells that start with
``=``, ``+``, ``-`` or ``@`` get a leading apostrophe so they are never run as
formulas. The phone column is the exception, since Google must read it as
written: it gets a leading tab instead, which spreadsheets keep as text and
Google's importer trims as whitespace.

The file is stored sealed (:mod:`callconv.protection.sealed`), ``call_conversions_{account}_{day}.csv.enc``
under ``{export_uri}/{account}/{YYYY-MM-DD}/``. For a manual upload in the Google Ads UI,
``python -m callconv.protection.sealed open --account A --data-class export --logical-path DAY/NAME IN OUT``
writes the plaintext CSV.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from decimal import Decimal

import sqlalchemy as sa

from callconv.config import Account
from callconv.matching.match import as_utc
from callconv.protection.storage import Area, sealer_for, store_as
from callconv.schema import matches

log = logging.getLogger(__name__)

TEMPLATE_HEADER = (
    "Caller's Phone Number",
    "Call Start Time",
    "Conversion Name",
    "Conversion Time",
    "Conversion Value",
    "Conversion Currency",
    "Ad User Data",
    "Ad Personalization",
)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class ConversionFile:
    path: str
    rows: int


def safe_text(cell: str) -> str:
    """Neutralise a text cell that a spreadsheet would run as a formula."""
    return f"'{cell}" if cell.startswith(FORMULA_STARTS) else cell


def phone_cell(e164: str) -> str:
    return f"\t{e164}"


def format_value(value) -> str:
    """Plain decimal without trailing zeros: 1234.5000 -> 1234.5, 100 -> 100, None -> blank."""
    if value is None:
        return ""
    text = f"{Decimal(value):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def local_time(moment, tz) -> str:
    """``moment`` (naive means UTC) in ``tz`` with the offset it has there: ``2026-10-25 02:30:00+01:00``.

    Seconds are the finest unit written; a fraction is dropped, not rounded.
    """
    return as_utc(moment).astimezone(tz).isoformat(sep=" ", timespec="seconds")


def render_lines(account: Account, rows: Iterable) -> Iterator[bytes]:
    """The file, a CSV line at a time, so a day of any size is written with flat memory."""
    names = {action.id: action.name for action in account.conversion_actions.values()}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")

    def line(cells: list[str]) -> bytes:
        out.seek(0)
        out.truncate()
        writer.writerow(cells)
        return out.getvalue().encode("utf-8")

    yield line([f"Parameters:TimeZone={account.timezone}"])
    yield line(list(TEMPLATE_HEADER))
    for row in rows:
        yield line(
            [
                phone_cell(row["caller_e164"]),
                local_time(row["call_start"], account.tz),
                safe_text(names[row["conversion_action_id"]]),
                local_time(row["conversion_time"], account.tz),
                format_value(row["conversion_value"]),
                safe_text(row["currency_code"] or ""),
                account.consent.ad_user_data.title(),
                account.consent.ad_personalization.title(),
            ]
        )


def render(account: Account, rows: Iterable) -> bytes:
    return b"".join(render_lines(account, rows))


def _day_query(account_id: str, business_date: date):
    return (
        sa.select(matches)
        .where(matches.c.account_id == account_id, matches.c.business_date == business_date)
        .order_by(matches.c.conversion_time, matches.c.conversion_key)
    )


def file_name(account_id: str, business_date: date) -> str:
    return f"call_conversions_{account_id}_{business_date.isoformat()}.csv"


def write_conversion_file(
    engine: sa.Engine, account: Account, business_date: date, export_root, keyset=None
) -> ConversionFile:
    """Write (or replace) the day's file, sealed with the Tink ``keyset`` as ``.csv.enc``.

    The same day always yields the same plaintext. For a manual upload in the Google Ads UI,
    ``python -m callconv.protection.sealed open`` gives it back. Without a keyset (only when
    the config allows plaintext) the file is written as ``.csv``; either way the day's file
    in the other form, left from before a change of settings, is removed.
    """
    area = Area(export_root, account.id, "export")
    sealer = sealer_for(keyset, engine)
    counted = 0

    def counting(rows):
        nonlocal counted
        for row in rows:
            counted += 1
            yield row

    with engine.connect() as connection:
        rows = connection.execute(_day_query(account.id, business_date).execution_options(yield_per=5000)).mappings()
        lines = render_lines(account, counting(rows))
        target = store_as(area, business_date.isoformat(), file_name(account.id, business_date), lines, sealer)
    log.info("conversion file: %d conversions written to %s", counted, target)
    return ConversionFile(path=str(target), rows=counted)
