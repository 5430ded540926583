"""Hostile and awkward CRM files through the real intake, on PostgreSQL and real files.

Formula cells stay text all the way; files are taken in chunk by chunk with the same
result as whole; landing files go to the sealed archive and are still recognised
when dropped again, sealed or not.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import intake_project
import pytest
import sqlalchemy as sa
from stored import read_stored

from callconv.delivery.conversion_file import TEMPLATE_HEADER, write_conversion_file
from callconv.intake.extract import ExtractError
from callconv.matching.call_logs import normalise_call_logs
from callconv.matching.match import match_day
from callconv.protection.pseudonyms import DEFAULT_CONN_ID, keys_from_airflow
from callconv.protection.sealed import Binding, seal_bytes
from callconv.schema import call_logs, crm_imports, crm_sales, quarantine

pytestmark = pytest.mark.integration

ACCOUNT = "hostile"
DAY = date(2026, 11, 27)
WINDOW = (datetime(2026, 11, 27, tzinfo=UTC), datetime(2026, 11, 28, tzinfo=UTC))
FORMULA_OUTCOME = "@SUM(1+1)"
FORMULA_ACTION_NAME = '=HYPERLINK("http://evil.example";"click")'
HEADER = ["id", "phone", "sold_at", "outcome", "amount", "currency"]


def make_settings(tmp_path, validation: dict | None = None, **crm_source):
    return intake_project.make_settings(
        tmp_path,
        header=HEADER,
        crm_source=crm_source,
        validation={"max_bad_row_share": 1.0} if validation is None else validation,
        match={"min_duration_seconds": 0},
        accounts=[
            intake_project.account(
                ACCOUNT,
                delivery="file",
                conversion_actions={
                    "sale": {"id": "1", "name": "Phone sale"},
                    FORMULA_OUTCOME: {"id": "2", "name": FORMULA_ACTION_NAME},
                },
            )
        ],
    )


def csv_bytes(rows: list[list[str]]) -> bytes:
    return intake_project.csv_bytes(HEADER, rows)


def drop(tmp_path, name: str, payload: bytes):
    return intake_project.drop(tmp_path, ACCOUNT, DAY, name, payload)


def take_in(settings, tmp_path, warehouse, keyset, **kwargs):
    return intake_project.take_in(warehouse, settings, tmp_path, keyset, account_id=ACCOUNT, window=WINDOW, **kwargs)


FORMULA_ROWS = [
    # a clean sale whose CRM id and outcome look like formulas
    ["=cmd|' /C calc'!A0", "+47 912 34 567", "2026-11-27 10:00:00", FORMULA_OUTCOME, "100", "NOK"],
    ["+1+1", "-2+3", "2026-11-27 10:00:00", "sale", "1", "NOK"],  # phone unparseable
    ["@SUM(1+1)", "91234567", "=NOW()", "sale", "1", "NOK"],  # time unparseable
    ["-2+3", "91234567", "2026-11-27 10:00:00", "sale", "=1+2", "NOK"],  # value unparseable
]


def test_formula_cells_stay_text_and_every_spreadsheet_file_neutralises_them(tmp_path, warehouse, test_keyset):
    settings = make_settings(tmp_path)
    drop(tmp_path, "deals.csv", csv_bytes(FORMULA_ROWS))
    with warehouse.begin() as connection:
        connection.execute(
            call_logs.insert(),
            [
                {
                    "account_id": ACCOUNT,
                    "source_call_id": "c1",
                    "caller_number": "91234567",
                    "call_start": datetime(2026, 11, 27, 9, 0, tzinfo=UTC),
                    "duration_seconds": 120,
                    "via_google_forwarding": True,
                }
            ],
        )

    outcome = take_in(settings, tmp_path, warehouse, test_keyset)

    assert outcome.rows_read == 4 and outcome.sales == 1
    with warehouse.connect() as connection:
        sale = connection.execute(sa.select(crm_sales)).one()
        raw = {row.source_row: row.raw_record for row in connection.execute(sa.select(quarantine))}
    assert sale.crm_id == "=cmd|' /C calc'!A0" and sale.outcome == FORMULA_OUTCOME  # stored as the text it was
    assert raw[2]["crm_id"] == "+1+1" and raw[2]["caller_phone"] == "-2+3"
    assert raw[3]["crm_id"] == "@SUM(1+1)" and raw[3]["conversion_time"] == "=NOW()"
    assert raw[4]["crm_id"] == "-2+3" and raw[4]["value"] == "=1+2"

    # The quarantine export: the raw text, each formula-like cell behind an apostrophe.
    [export] = (tmp_path / "quarantine" / ACCOUNT / DAY.isoformat()).iterdir()
    assert export.name == f"quarantine_{ACCOUNT}_{DAY}.csv.enc"
    text = read_stored(warehouse, test_keyset, export, tmp_path / "quarantine", ACCOUNT, "quarantine").decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(row["source_row"], row["reason"]) for row in rows] == [
        ("2", "phone_unparseable"),
        ("3", "time_unparseable"),
        ("4", "value_unparseable"),
    ]
    assert [row["crm_id"] for row in rows] == ["'+1+1", "'@SUM(1+1)", "'-2+3"]
    assert rows[0]["caller_phone"] == "'-2+3" and rows[1]["conversion_time"] == "'=NOW()"
    assert rows[2]["value"] == "'=1+2"
    for row in rows:
        assert not any(cell.startswith(("=", "+", "-", "@")) for cell in row.values())

    # The conversion file: the formula-like action name is neutralised, the phone is tab-prefixed text.
    normalise_call_logs(warehouse, ACCOUNT, "NO", *WINDOW, timedelta(days=60))
    match_day(warehouse, ACCOUNT, DAY, settings.match, "run-1", keys=keys_from_airflow(DEFAULT_CONN_ID))
    written = write_conversion_file(warehouse, settings.account(ACCOUNT), DAY, tmp_path / "export", test_keyset)
    assert written.rows == 1 and written.path.endswith(".csv.enc")
    text = read_stored(warehouse, test_keyset, written.path, tmp_path / "export", ACCOUNT, "export").decode()
    lines = list(csv.reader(io.StringIO(text)))
    assert lines[1] == list(TEMPLATE_HEADER)
    cells = dict(zip(TEMPLATE_HEADER, lines[2], strict=True))
    assert cells["Conversion Name"] == f"'{FORMULA_ACTION_NAME}"
    assert cells["Caller's Phone Number"] == "\t+4791234567"


def test_a_file_read_in_small_chunks_gives_the_same_tables_as_read_whole(tmp_path, warehouse, test_keyset):
    rows = [[f"S{n}", f"9123456{n % 10}", "2026-11-27 10:00:00", "sale", f"{n}.5", "NOK"] for n in range(10)]
    rows[3][1] = "12"  # phone too short
    rows[6][2] = "whenever"  # time unparseable
    rows[8][0] = "S1"  # the CRM id of row 2, two chunks later: a duplicate
    rows.append(["", "91234567", "2026-11-27 11:00:00", "sale", "7", "NOK"])  # no id: keyed by content
    rows.append(["", "91234567", "2026-11-27 11:00:00", "sale", "7", "NOK"])  # the same row again: dropped
    payload = csv_bytes(rows)

    def tables(chunk_rows: int) -> tuple:
        with warehouse.begin() as connection:
            for table in (crm_sales, quarantine, crm_imports):
                connection.execute(table.delete())
        drop(tmp_path, "deals.csv", payload)
        outcome = take_in(make_settings(tmp_path, chunk_rows=chunk_rows), tmp_path, warehouse, test_keyset)
        with warehouse.connect() as connection:
            sales = connection.execute(
                sa.select(crm_sales.c.crm_id, crm_sales.c.source_row, crm_sales.c.caller_e164).order_by("source_row")
            ).all()
            quarantined = connection.execute(
                sa.select(quarantine.c.source_row, quarantine.c.reason).order_by("source_row")
            ).all()
            imported = connection.execute(sa.select(crm_imports.c.row_count)).scalars().all()
        return outcome.as_counts() | {"warnings": None}, sales, quarantined, imported

    whole = tables(chunk_rows=100_000)
    chunked = tables(chunk_rows=3)
    assert chunked == whole
    counts, sales, quarantined, imported = whole
    assert quarantined == [(4, "phone_too_short"), (7, "time_unparseable"), (9, "duplicate_crm_id")]
    assert imported == [11]  # the rows taken in: the identical copy is not one
    assert counts["read"] == 12 and counts["normalised"] == len(sales) == 8
    assert counts["identical_duplicates"] == 1
    assert len(list((tmp_path / "docs" / ACCOUNT / DAY.isoformat() / "validations").rglob("*.html.enc"))) > 4


def test_landing_files_move_to_the_encrypted_archive_and_are_recognised_when_dropped_again(
    tmp_path, warehouse, test_keyset
):
    settings = make_settings(tmp_path)
    payload = csv_bytes([["S1", "91234567", "2026-11-27 10:00:00", "sale", "1", "NOK"]])
    landing = drop(tmp_path, "deals.csv", payload)
    archived = tmp_path / "archive" / ACCOUNT / DAY.isoformat() / "deals.csv.enc"

    first = take_in(settings, tmp_path, warehouse, test_keyset)
    assert (first.files_seen, first.files_skipped, first.archived, first.rows_read) == (1, 0, 1, 1)
    assert not landing.exists()
    assert payload not in archived.read_bytes()
    assert read_stored(warehouse, test_keyset, archived, tmp_path / "archive", ACCOUNT, "archive") == payload

    # The same file dropped again, this time sealed by the CRM's exporter: recognised, archived, removed.
    encrypted_drop = landing.with_name("deals-again.csv.enc")
    landing_binding = Binding(ACCOUNT, "landing", f"{DAY.isoformat()}/deals-again.csv", 0)
    encrypted_drop.write_bytes(seal_bytes(payload, test_keyset, landing_binding))
    again = take_in(settings, tmp_path, warehouse, test_keyset)
    assert (again.files_seen, again.files_skipped, again.rows_read) == (2, 2, 0)  # the drop and the archived copy
    assert not encrypted_drop.exists()
    assert sorted(p.name for p in archived.parent.iterdir()) == ["deals-again.csv.enc", "deals.csv.enc"]

    # A rerun with nothing in the landing area: the archive says the day was taken in, no warning.
    rerun = take_in(settings, tmp_path, warehouse, test_keyset)
    assert (rerun.files_seen, rerun.files_skipped, rerun.warnings) == (2, 2, [])

    # A reimport reads the archived copies again, decrypting them as a stream.
    reimport = take_in(settings, tmp_path, warehouse, test_keyset, reimport=True)
    assert (reimport.files_seen, reimport.files_skipped, reimport.rows_read) == (2, 0, 2)
    with warehouse.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(crm_sales)) == 1
        assert connection.scalar(sa.select(sa.func.count()).select_from(crm_imports)) == 1  # one checksum


def test_a_rejected_file_stays_in_the_landing_area_and_nothing_is_stored(tmp_path, warehouse, test_keyset):
    settings = make_settings(tmp_path, max_file_mb=1)
    row = ["S1", "91234567", "2026-11-27 10:00:00", "sale", "1", "NOK"]
    landing = drop(tmp_path, "huge.csv", csv_bytes([row] * 40_000))
    with pytest.raises(ExtractError, match=r"^huge\.csv: larger than 1 MiB once decrypted and unzipped"):
        take_in(settings, tmp_path, warehouse, test_keyset)
    assert landing.exists()
    assert not (tmp_path / "archive").exists()
    with warehouse.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(crm_imports)) == 0


def test_identical_copies_of_rows_are_dropped_not_counted_as_bad_rows(tmp_path, warehouse, test_keyset):
    """A CRM that exports rows twice: 30% of the file are copies, and the default 0.2 limit lets it in."""
    distinct = [
        [f"S{n}", f"9123{n:04d}", f"2026-11-27 {8 + n % 10:02d}:00:00", "sale", f"{n}.5", "NOK"] for n in range(13)
    ]
    rows = list(distinct)
    rows.append(["S3", "91230003", "2026-11-27 11:00:00", "sale", "999", "NOK"])  # S3 again, other content
    for position, copy_of in [(2, 0), (5, 4), (9, 4), (14, 12), (16, 1), (19, 3)]:
        rows.insert(position, list(distinct[copy_of]))  # the same row again, some chunks later
    assert len(rows) == 20
    copies = [number for number, row in enumerate(rows, start=1) if rows.index(row) != number - 1]
    assert len(copies) == 6  # 30% of the rows
    payload = csv_bytes(rows)

    def tables(chunk_rows: int) -> tuple:
        with warehouse.begin() as connection:
            for table in (crm_sales, quarantine, crm_imports):
                connection.execute(table.delete())
        drop(tmp_path, "deals.csv", payload)
        settings = make_settings(tmp_path, validation={}, chunk_rows=chunk_rows)
        assert settings.validation.max_bad_row_share == 0.2  # the default
        outcome = take_in(settings, tmp_path, warehouse, test_keyset)
        with warehouse.connect() as connection:
            sales = connection.execute(
                sa.select(crm_sales.c.crm_id, crm_sales.c.source_row, crm_sales.c.conversion_value).order_by(
                    "source_row"
                )
            ).all()
            quarantined = connection.execute(
                sa.select(quarantine.c.source_row, quarantine.c.reason).order_by("source_row")
            ).all()
        return outcome.as_counts() | {"warnings": None}, sales, quarantined

    whole = tables(chunk_rows=100_000)
    assert tables(chunk_rows=3) == whole
    counts, sales, quarantined = whole
    assert counts["read"] == 20
    assert counts["identical_duplicates"] == 6
    assert counts["normalised"] == 13
    assert counts["quarantined"] == {"duplicate_crm_id": 1}
    # Each sale comes from the first copy of its row; the copies left no trace.
    first_rows = {row[0]: rows.index(row) + 1 for row in distinct}
    assert {crm_id: source_row for crm_id, source_row, _ in sales} == first_rows
    assert not {source_row for _, source_row, _ in sales} & set(copies)
    # The same id with other content is still quarantined, and the first row keeps the id.
    changed_row = next(number for number, row in enumerate(rows, start=1) if row[4] == "999")
    assert quarantined == [(changed_row, "duplicate_crm_id")]
    assert dict((crm_id, value) for crm_id, _, value in sales)["S3"] == Decimal("3.5")
