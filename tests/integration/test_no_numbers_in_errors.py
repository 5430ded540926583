"""No phone number reaches a task log through a database error, and one bad cell is one quarantined row.

Through the real intake on the real PostgreSQL warehouse, with the production engine
(:func:`callconv.warehouse.create_engine`):

* a cell the warehouse cannot hold (a CRM id longer than its column, a NUL character, a
  time that overflows in year 1 or 9999) is one quarantined row with its reason code, and
  the rest of the file is taken in;
* with those guards switched off, the database refuses the file (value too long, numeric
  overflow), and so does a unique clash with a concurrent writer: the error text and the
  log name no number, in E.164, as written in the file, or as national digits. (A NUL never
  reaches the database: the driver refuses it client-side, without values.)
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
from datetime import UTC, date, datetime
from decimal import Decimal

import intake_project
import pytest
import sqlalchemy as sa

from callconv.intake import normalise
from callconv.intake.take_in import sale_key
from callconv.intake.validate import ExtractValidator
from callconv.protection.pseudonyms import DEFAULT_CONN_ID, keys_from_airflow
from callconv.schema import crm_imports, crm_sales, quarantine
from callconv.warehouse import create_engine

pytestmark = pytest.mark.integration

ACCOUNT = "numbers"
DAY = date(2026, 11, 27)
WINDOW = (datetime(2026, 11, 26, 23, tzinfo=UTC), datetime(2026, 11, 27, 23, tzinfo=UTC))  # the day in Oslo
HEADER = ["id", "phone", "sold_at", "outcome", "amount", "currency", "call_at"]
# Five good sales; their callers as written, in E.164 and as national digits.
WRITTEN = [f"+47 912 34 5{n:02d}" for n in range(5)]
E164 = [f"+479123450{n}" for n in range(5)]
NATIONAL = [f"9123450{n}" for n in range(5)]
BAD_CALLER = ("+47 913 00 777", "+4791300777", "91300777")
ANY_E164 = re.compile(r"\+\d{8,15}")


def good_rows() -> list[list[str]]:
    return [[f"S-{n}", WRITTEN[n], "2026-11-27 10:00:00", "sale", "100", "NOK", ""] for n in range(5)]


def bad_row(**cells) -> list[str]:
    row = dict(zip(HEADER, ["S-bad", BAD_CALLER[0], "2026-11-27 11:00:00", "sale", "1", "NOK", ""], strict=True))
    row.update(cells)
    return [row[name] for name in HEADER]


def drop_file(tmp_path, rows: list[list[str]]):
    return intake_project.drop(tmp_path, ACCOUNT, DAY, "deals.csv", intake_project.csv_bytes(HEADER, rows))


@pytest.fixture()
def production_engine(pg_schema_url, warehouse):
    """The engine tasks use, on the test schema (``warehouse`` has emptied it)."""
    engine = create_engine(pg_schema_url)
    yield engine
    engine.dispose()


def take_in(tmp_path, engine, keyset):
    settings = intake_project.make_settings(
        tmp_path,
        header=HEADER,
        validation={"max_bad_row_share": 1.0},
        accounts=[intake_project.account(ACCOUNT, timezone="Europe/Oslo")],
    )
    return intake_project.take_in(engine, settings, tmp_path, keyset, account_id=ACCOUNT, window=WINDOW)


def numbers_in(text: str) -> list[str]:
    """The file's phone numbers found in ``text``, in any of the forms, and anything E.164-like."""
    forms = [*WRITTEN, *E164, *NATIONAL, *BAD_CALLER]
    return sorted({form for form in forms if form in text} | set(ANY_E164.findall(text)))


# ----------------------------------------------------------------------------- one bad cell, one row


@pytest.mark.parametrize(
    ("cells", "reason"),
    [
        ({"id": "C" * 129}, "crm_id_too_long"),  # the column holds 128
        ({"id": "S-\x00"}, "nul_byte"),
        ({"sold_at": "0001-01-01 00:30:00"}, "time_out_of_range"),  # before year 1 in UTC
        ({"sold_at": "9999-12-31 23:30:00-05:00"}, "time_out_of_range"),  # year 10000 in UTC
        ({"sold_at": "1899-12-31 12:00:00"}, "time_out_of_range"),
    ],
    ids=["crm_id_129_characters", "nul_in_crm_id", "year_0001", "year_9999_negative_offset", "year_1899"],
)
def test_a_cell_the_warehouse_cannot_hold_is_one_quarantined_row(
    cells, reason, tmp_path, production_engine, test_keyset, caplog
):
    caplog.set_level(logging.DEBUG)
    landing_file = drop_file(tmp_path, [*good_rows(), bad_row(**cells)])

    outcome = take_in(tmp_path, production_engine, test_keyset)

    assert (outcome.rows_read, outcome.sales, outcome.quarantined) == (6, 5, {reason: 1})
    with production_engine.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(crm_sales)) == 5
        held = connection.execute(sa.select(quarantine.c.source_row, quarantine.c.reason, quarantine.c.crm_id)).all()
        assert connection.scalar(sa.select(sa.func.count()).select_from(crm_imports)) == 1
    assert [(row.source_row, row.reason) for row in held] == [(6, reason)]
    assert held[0].crm_id in (None, "S-bad")  # a CRM id the column cannot hold stays in the raw record only
    assert not landing_file.exists()  # taken in, so archived
    assert numbers_in(caplog.text) == []


def test_a_call_start_that_overflows_is_dropped_as_a_hint_and_the_sale_kept(
    tmp_path, production_engine, test_keyset, caplog
):
    caplog.set_level(logging.DEBUG)
    drop_file(tmp_path, [*good_rows(), bad_row(call_at="9999-12-31 23:30:00-05:00")])

    outcome = take_in(tmp_path, production_engine, test_keyset)

    assert (outcome.sales, outcome.quarantined) == (6, {})
    with production_engine.connect() as connection:
        hint = connection.scalar(sa.select(crm_sales.c.crm_call_start).where(crm_sales.c.crm_id == "S-bad"))
    assert hint is None
    assert numbers_in(caplog.text) == []


# ----------------------------------------------------------------------------- database errors, guards off


def _no_row_checks(monkeypatch) -> None:
    """Validation passes every row, as a guard that missed something would."""
    monkeypatch.setattr(ExtractValidator, "check_rows", lambda self, chunk, part=None: {})


def _fails_without_numbers(tmp_path, engine, keyset, caplog) -> BaseException:
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the class is checked by the caller
        take_in(tmp_path, engine, keyset)
    shown = "".join(traceback.format_exception(caught.value)) + caplog.text
    assert numbers_in(shown) == [], "a database error showed phone numbers"
    return caught.value


def _nothing_taken_in(engine, landing_file) -> None:
    with engine.connect() as connection:
        for table in (crm_sales, quarantine, crm_imports):
            assert connection.scalar(sa.select(sa.func.count()).select_from(table)) == 0
    assert landing_file.exists()  # a file that fails stays in the landing area


def test_a_value_too_long_for_its_column_names_no_number(tmp_path, production_engine, test_keyset, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    _no_row_checks(monkeypatch)
    landing_file = drop_file(tmp_path, [*good_rows(), bad_row(id="C" * 129)])

    error = _fails_without_numbers(tmp_path, production_engine, test_keyset, caplog)

    assert isinstance(error, sa.exc.DataError) and "value too long" in str(error)
    assert "parameters hidden" in str(error)
    _nothing_taken_in(production_engine, landing_file)


def test_a_numeric_overflow_names_no_number(tmp_path, production_engine, test_keyset, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    _no_row_checks(monkeypatch)
    monkeypatch.setattr(normalise, "_MAX_MONEY", Decimal(10) ** 30)  # the guard for Numeric(18, 4), off
    landing_file = drop_file(tmp_path, [*good_rows(), bad_row(amount="1000000000000000")])

    error = _fails_without_numbers(tmp_path, production_engine, test_keyset, caplog)

    assert isinstance(error, sa.exc.DataError) and "numeric field overflow" in str(error)
    assert "parameters hidden" in str(error)
    _nothing_taken_in(production_engine, landing_file)


def test_a_unique_clash_with_a_concurrent_writer_names_no_number(
    tmp_path, production_engine, warehouse, test_keyset, caplog
):
    """Another writer holds an uncommitted sale with the key of the file's first sale: the
    intake's insert waits for it, and fails on the key once that writer commits."""
    caplog.set_level(logging.DEBUG)
    landing_file = drop_file(tmp_path, good_rows())
    holder = warehouse.connect()
    holding = holder.begin()
    holder.execute(
        crm_sales.insert().values(
            account_id=ACCOUNT,
            sale_key=sale_key(ACCOUNT, "S-0", {}, keys_from_airflow(DEFAULT_CONN_ID).primary),
            crm_id="S-0",
            import_checksum="0" * 64,
            source_row=1,
            business_date=DAY,
            conversion_time=datetime(2026, 11, 27, 9, tzinfo=UTC),
            outcome="sale",
            conversion_action_id="1",
        )
    )
    holder_pid = holder.scalar(sa.text("select pg_backend_pid()"))
    failure: list[BaseException] = []

    def run() -> None:
        try:
            take_in(tmp_path, production_engine, test_keyset)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            failure.append(error)

    intake = threading.Thread(target=run)
    intake.start()
    waiting = False
    with warehouse.connect() as watcher:
        while intake.is_alive() and not waiting:
            waiting = bool(
                watcher.scalar(
                    sa.text("select count(*) from pg_stat_activity where :pid = any(pg_blocking_pids(pid))"),
                    {"pid": holder_pid},
                )
            )
            watcher.rollback()  # pg_stat_activity is read once per transaction
            intake.join(0.01)
    holding.commit()
    holder.close()
    intake.join()

    assert waiting, "the intake never waited for the concurrent writer's sale"
    [error] = failure
    assert isinstance(error, sa.exc.IntegrityError) and "duplicate key" in str(error)
    shown = "".join(traceback.format_exception(error)) + caplog.text
    assert numbers_in(shown) == []
    assert "parameters hidden" in str(error)
    assert landing_file.exists()
    with production_engine.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(crm_imports)) == 0
