"""A 7-day backfill of a ``delivery: file`` account through the import DAG, on PostgreSQL and a real sftp server.

Google's scheduled upload fetches one file on its own clock; in a backfill only
the last of the week's files may ever be fetched. So the file must be
cumulative, and a row may count as delivered only under the rule of
:mod:`callconv.delivery.file_delivery`: it leaves the file, delivered, with the first
publication whose data-interval end puts its call outside the lookback (60
days), after earlier publications carried it.

Each day has 10 sales: 8 on calls of the same morning, one on a call 59 days
earlier (it leaves the lookback with the next day's run) and one on a call 57
days earlier (it leaves it three runs later). After every run the test reads
the published file with paramiko and checks it against the rule, computed here
from the data, not by the code under test.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from test_file_delivery import CONN_ID, read_remote, remote_dir, sftp  # noqa: F401 - shared fixtures

from callconv.delivery.file_delivery import remote_file_name
from callconv.schema import call_logs, run_summary, upload_ledger

pytestmark = pytest.mark.integration

OSLO = ZoneInfo("Europe/Oslo")
ACCOUNT = "file_week"
DAYS = [date(2026, 11, 2) + timedelta(days=n) for n in range(7)]
SALES_PER_DAY = 10
LOOKBACK = timedelta(days=60)
# Call age (before the sale's day, 10:00) of the last two sales of each day.
OLD_CALLS = {8: timedelta(days=59), 9: timedelta(days=57)}


def local(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=OSLO)


def window_end(day: date) -> datetime:
    return local(day + timedelta(days=1), 0).astimezone(UTC)


@dataclass(frozen=True)
class Sale:
    day_index: int  # 0..6
    number: str  # as the CRM and the switchboard write it
    call_start: datetime  # UTC

    @property
    def caller(self) -> str:
        return f"+47{self.number}"


def make_sales() -> list[Sale]:
    sales = []
    for d, day in enumerate(DAYS):
        for i in range(SALES_PER_DAY):
            if i in OLD_CALLS:
                start = local(day, 10).astimezone(UTC) - OLD_CALLS[i]
            else:
                start = local(day, 8, 5 * i).astimezone(UTC)
            sales.append(Sale(d, f"9{d}{i:02d}1234", start))
    return sales


SALES = make_sales()
CALLER_DAY = {sale.caller: sale.day_index for sale in SALES}


# ------------------------------------------------------------------ the rule, from the data


def in_file(sale: Sale, run: int) -> bool:
    """Run ``run`` (0..6) carries the sale: taken in by then, call within the lookback, not yet delivered."""
    return sale.day_index <= run and sale.call_start >= window_end(DAYS[run]) - LOOKBACK


def delivered_by_rule(sale: Sale, run: int) -> int | None:
    """The run whose publication confirms the sale, if it is ``run`` or earlier."""
    for later in range(sale.day_index + 1, run + 1):
        if not in_file(sale, later):
            return later
    return None


# ------------------------------------------------------------------ fixtures


@pytest.fixture()
def week(tmp_path, warehouse, airflow_db, write_settings, warehouse_conn, remote_dir):  # noqa: F811 - fixture
    write_settings(
        {
            "id": ACCOUNT,
            "customer_id": "3334445555",
            "timezone": "Europe/Oslo",
            "delivery": "file",
            "conversion_actions": {"sale": {"id": "111", "name": "Phone sale"}},
        },
        columns={"caller_phone": "phone", "conversion_time": "sold_at", "outcome": "outcome", "crm_id": "id"},
        warehouse_conn_id=warehouse_conn("file_week_warehouse"),
        file_delivery={"conn_id": CONN_ID, "remote_dir": remote_dir},
        match={"window_days": 90},
        freshness={"grace_minutes": 1440, "poke_minutes": 1},
    )
    calls = []
    for n, sale in enumerate(SALES):
        calls.append(
            {
                "account_id": ACCOUNT,
                "source_call_id": f"call-{n:03d}",
                "caller_number": sale.number,
                "call_start": sale.call_start,
                "duration_seconds": 120,
                "via_google_forwarding": True,
            }
        )
    with warehouse.begin() as connection:
        connection.execute(call_logs.insert(), calls)
    for d, day in enumerate(DAYS):
        folder = tmp_path / "landing" / ACCOUNT / day.isoformat()
        folder.mkdir(parents=True)
        with open(folder / "sales.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "phone", "sold_at", "outcome"])
            for i, sale in enumerate(s for s in SALES if s.day_index == d):
                writer.writerow([f"{day}-{i}", sale.number, f"{day} 12:{i:02d}:00", "sale"])
    return remote_dir


def run_day(day: date):
    """The import DAG for one account-local day, through ``dag.test()``."""
    from dags.call_conversion_import import build_import_dag

    dag_run = build_import_dag(ACCOUNT, "Europe/Oslo").test(logical_date=local(day + timedelta(days=1), 0))
    assert dag_run.state == "success", f"the import of {day} ended {dag_run.state}"
    assert dag_run.data_interval_end == window_end(day)
    return dag_run


def file_callers(content: bytes) -> list[str]:
    lines = list(csv.reader(io.StringIO(content.decode("utf-8"), newline="")))
    assert lines[0] == ["Parameters:TimeZone=Europe/Oslo"]
    assert lines[1][0] == "Caller's Phone Number"
    return [row[0].strip() for row in lines[2:]]


def ledger_by_caller(engine) -> dict[str, dict]:
    with engine.connect() as connection:
        rows = connection.execute(sa.select(upload_ledger)).mappings().all()
    return {row["caller_e164"]: dict(row) for row in rows}


# ------------------------------------------------------------------ the test


def test_a_week_backfill_keeps_every_unconfirmed_row_in_the_file_google_fetches(week, warehouse, sftp):  # noqa: F811
    path = f"{week}/{remote_file_name(ACCOUNT)}"
    carried: dict[str, list[int]] = {sale.caller: [] for sale in SALES}

    for run, day in enumerate(DAYS):
        run_day(day)
        content = read_remote(sftp, path)
        callers = file_callers(content)
        assert len(callers) == len(set(callers))
        for caller in callers:
            carried[caller].append(run)
        ledger = ledger_by_caller(warehouse)
        taken_in = [sale for sale in SALES if sale.day_index <= run]
        assert set(ledger) == {sale.caller for sale in taken_in}, f"run {run}: every sale so far is a conversion"

        # The file holds every row not yet confirmed, and only those: exactly the rule's set.
        unconfirmed = {caller for caller, row in ledger.items() if row["state"] == "pending"}
        assert set(callers) == unconfirmed, f"run {run}: the file is not the set of unconfirmed rows"
        assert unconfirmed == {sale.caller for sale in taken_in if in_file(sale, run)}, f"run {run}"

        # Delivered: exactly the rule's set, each one confirmed by the run the rule names.
        delivered = {caller: row for caller, row in ledger.items() if row["state"] == "delivered"}
        expected = {sale.caller: delivered_by_rule(sale, run) for sale in taken_in}
        assert set(delivered) == {caller for caller, confirmed_by in expected.items() if confirmed_by is not None}
        for caller, row in delivered.items():
            confirmed_by = expected[caller]
            assert (row["delivered_by"], row["delivered_at"]) == ("file", window_end(DAYS[confirmed_by]))
            # Never marked delivered unless earlier files, kept up until the confirming run, carried it.
            assert carried[caller] == list(range(CALLER_DAY[caller], confirmed_by))
        assert {row["state"] for row in ledger.values()} <= {"pending", "delivered"}

        # Frozen at its first publication; one send per publication that carried it.
        for caller, row in ledger.items():
            runs = carried[caller]
            if row["state"] == "pending":  # in every file since its day
                assert runs == list(range(CALLER_DAY[caller], run + 1))
            assert row["sent_at"] == window_end(DAYS[runs[0]])
            assert row["last_published_at"] == window_end(DAYS[runs[-1]])
            assert row["sends"] == len(runs)

    # Across the week every one of the 70 conversions was in the file Google fetches.
    assert {caller for caller, runs in carried.items() if runs} == {sale.caller for sale in SALES}
    assert len(SALES) == 70
    final = ledger_by_caller(warehouse)
    assert sum(row["state"] == "delivered" for row in final.values()) == 10  # six 59-day calls, four 57-day ones
    assert len(file_callers(read_remote(sftp, path))) == 60
    with warehouse.connect() as connection:
        counts = connection.scalar(sa.select(run_summary.c.counts).where(run_summary.c.business_date == DAYS[-1]))[
            "file_delivery"
        ]
    assert (counts["conversions"], counts["newly_published"], counts["newly_delivered"]) == (60, 10, 2)

    # A rerun of the last day publishes the same bytes and changes no ledger row.
    last_bytes = read_remote(sftp, path)
    run_day(DAYS[-1])
    assert read_remote(sftp, path) == last_bytes
    assert ledger_by_caller(warehouse) == final
