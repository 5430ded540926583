"""The import DAG, run through ``dag.test()`` on PostgreSQL with a data set whose answers are known.

The CRM extract below mixes every case the matcher must get right, and the
assertions name the exact conversions, quarantine rows and unmatched reasons.
"""

from __future__ import annotations

import csv
import json
import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
import yaml
from stored import read_stored

from callconv.intake.normalise import normalise_phone
from callconv.sandbox import ActionSpec
from callconv.schema import call_logs, crm_imports, crm_sales, matches, quarantine, run_summary, upload_ledger

pytestmark = pytest.mark.integration

OSLO = ZoneInfo("Europe/Oslo")
DAY = date(2026, 11, 27)
ACCOUNT = "test_shop"
SALE_ACTION, UPSELL_ACTION = "111", "222"


def oslo(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=OSLO).astimezone(UTC)


CALLS = [
    # source id, caller as the switchboard wrote it, local start, seconds, forwarded
    ("a-old", "+47 912 34 567", "2026-11-20 10:00:00", 300, True),
    ("a-new", "0047 91234567", "2026-11-27 09:00:00", 120, True),
    ("b-old", "41234567", "2026-10-10 10:00:00", 300, True),  # 48 days before: outside the window
    ("c-short", "92345678", "2026-11-26 10:00:00", 10, True),
    ("d-direct", "93456789", "2026-11-26 11:00:00", 200, False),
    ("f-after", "95678901", "2026-11-27 15:00:00", 200, True),  # after the sale only
    ("g-1", "46789012", "2026-11-27 08:00:00", 400, True),
    ("h-2", "47890123", "2026-11-25 12:00:00", 60, True),  # same second as h-1
    ("h-1", "47890123", "2026-11-25 12:00:00", 60, True),
    ("i-crm", "48901234", "2026-11-25 09:00:00", 60, True),  # the CRM names this one
    ("i-late", "48901234", "2026-11-26 09:00:00", 60, True),
    ("x-junk", "not a number", "2026-11-26 09:00:00", 60, True),
]

HEADER = ["Deal", "Phone", "Call started", "Closed at", "Outcome", "Amount", "Currency"]
CRM_ROWS = [
    ["S1", "+47 912 34 567", "", "2026-11-27 10:00:00", "sale", "1 234,50", "nok"],
    ["S2", "412 34 567", "", "2026-11-27 10:00:00", "sale", "100,00", ""],
    ["S3", "92 34 56 78", "", "2026-11-27 10:00:00", "sale", "", ""],
    ["S4", "(+47) 93.45.67.89", "", "2026-11-27 10:00:00", "upsell", "50", "NOK"],
    ["S5", "94567890", "", "2026-11-27 10:00:00", "sale", "75", "NOK"],
    ["S6", "95678901", "", "2026-11-27 11:00:00", "sale", "10", "NOK"],
    ["S7", "46789012", "", "2026-11-27 09:00:00", "sale", "100", "NOK"],
    ["S8", "+4746789012", "", "2026-11-27 12:30:00", "sale", "250,25", "NOK"],
    ["S9", "47890123", "", "2026-11-27 10:00:00", "sale", "20", "EUR"],
    ["S10", "48901234", "2026-11-25 09:01:00", "2026-11-27 10:00:00", "sale", "30", "NOK"],
    ["S11", "+47 99 88 77 66", "", "2026-11-27T09:00:00+00:00", "upsell", "5", "NOK"],
    ["Q1", "12", "", "2026-11-27 10:00:00", "sale", "1", "NOK"],
    ["Q2", "91234567", "", "not a time", "sale", "1", "NOK"],
    ["Q3", "91234567", "", "2026-11-27 10:00:00", "refund", "1", "NOK"],
    ["Q4", "91234567", "", "2026-11-27 10:00:00", "sale", "-5", "NOK"],
    ["Q5", "91234567", "", "2026-11-28 10:00:00", "sale", "1", "NOK"],
    ["S1", "+47 912 34 567", "", "2026-11-27 10:05:00", "sale", "1", "NOK"],
]

EXPECTED_CONVERSIONS = {
    # caller, call (source id), action, conversion time (UTC), value, currency, sales merged
    ("+4791234567", "a-new", SALE_ACTION, oslo("2026-11-27 10:00:00"), Decimal("1234.5"), "NOK", 1),
    ("+4746789012", "g-1", SALE_ACTION, oslo("2026-11-27 12:30:00"), Decimal("350.25"), "NOK", 2),
    ("+4747890123", "h-1", SALE_ACTION, oslo("2026-11-27 10:00:00"), Decimal("20"), "EUR", 1),
    ("+4748901234", "i-crm", SALE_ACTION, oslo("2026-11-27 10:00:00"), Decimal("30"), "NOK", 1),
}
EXPECTED_UNMATCHED = {
    "S2": "calls_outside_window",
    "S3": "calls_too_short",
    "S4": "only_non_forwarded_calls",
    "S5": "no_call_from_number",
    "S6": "calls_outside_window",
    "S11": "no_call_from_number",
}
EXPECTED_QUARANTINE = {
    # 1-based data row: reason
    12: "phone_too_short",
    13: "time_unparseable",
    14: "outcome_unknown",
    15: "value_negative",
    16: "time_in_future",
    17: "duplicate_crm_id",
}


@pytest.fixture()
def sandbox(make_sandbox, sandbox_conn):
    """Google Ads as the sandbox: it knows the forwarded calls, and it is two days after the sales."""
    forwarded = [
        (normalise_phone(number, "NO")[0], oslo(start))
        for _, number, start, _, via in CALLS
        if via and number[0] != "n"
    ]
    server = make_sandbox(
        customers={
            "1112223333": [ActionSpec(id=SALE_ACTION, name="Phone sale"), ActionSpec(id=UPSELL_ACTION, name="Upsell")]
        },
        calls=forwarded,
        clock=lambda: oslo("2026-11-29 12:00:00"),
    ).start()
    sandbox_conn(server)
    return server


@pytest.fixture()
def project(tmp_path, warehouse, airflow_db, sandbox, write_settings, warehouse_conn):
    """A config, landing area and warehouse for the test account, wired through env vars."""
    write_settings(
        {
            "id": ACCOUNT,
            "customer_id": "111-222-3333",
            "timezone": "Europe/Oslo",
            "conversion_actions": {
                "sale": {"id": SALE_ACTION, "name": "Phone sale"},
                "upsell": {"id": UPSELL_ACTION, "name": "Upsell"},
            },
        },
        columns={
            "crm_id": "Deal",
            "caller_phone": "Phone",
            "call_start": "Call started",
            "conversion_time": "Closed at",
            "outcome": "Outcome",
            "value": "Amount",
            "currency": "Currency",
        },
        crm_source={"delimiter": ";", "decimal": ","},
        name="call_conversions.yaml",
        warehouse_conn_id=warehouse_conn("test_warehouse"),
        match={"window_days": 30, "min_duration_seconds": 30, "forwarded_only": True},
        validation={"max_bad_row_share": 0.5},
        freshness={"grace_minutes": 1440},
    )

    with warehouse.begin() as connection:
        connection.execute(
            call_logs.insert(),
            [
                {
                    "account_id": ACCOUNT,
                    "source_call_id": call_id,
                    "caller_number": number,
                    "call_start": oslo(start),
                    "duration_seconds": seconds,
                    "via_google_forwarding": forwarded,
                }
                for call_id, number, start, seconds, forwarded in CALLS
            ],
        )
    folder = tmp_path / "landing" / ACCOUNT / DAY.isoformat()
    folder.mkdir(parents=True)
    with open(folder / "deals.csv", "w", newline="", encoding="utf-8-sig") as handle:
        writer = csv.writer(handle, delimiter=";")
        writer.writerow(HEADER)
        writer.writerows(CRM_ROWS)
    return tmp_path


def run_import_dag(logical_date: datetime):
    from dags.call_conversion_import import build_import_dag

    dag = build_import_dag(ACCOUNT, "Europe/Oslo")
    return dag.test(logical_date=logical_date)


def snapshot(engine) -> dict:
    tables = {}
    with engine.connect() as connection:
        for table in (crm_imports, crm_sales, quarantine, matches, upload_ledger, call_logs):
            ordered = connection.execute(sa.select(table).order_by(*table.primary_key.columns)).mappings().all()
            # run_id only says which run last touched a row; everything else must not move.
            tables[table.name] = [{k: v for k, v in row.items() if k != "run_id"} for row in ordered]
    return tables


def test_one_day_gives_the_known_matches_quarantine_and_reasons(project, warehouse, sandbox, test_keyset):
    started = time.monotonic()
    dag_run = run_import_dag(datetime(2026, 11, 28, tzinfo=OSLO))
    run_seconds = time.monotonic() - started
    assert dag_run.state == "success"
    assert dag_run.data_interval_start == oslo("2026-11-27 00:00:00")
    assert dag_run.data_interval_end == oslo("2026-11-28 00:00:00")

    with warehouse.connect() as connection:
        conversions = {
            (
                row.caller_e164,
                row.source_call_id,
                row.conversion_action_id,
                row.conversion_time,
                row.conversion_value.normalize(),
                row.currency_code,
                row.sale_count,
            )
            for row in connection.execute(sa.select(matches))
        }
        call_starts = dict(connection.execute(sa.select(matches.c.source_call_id, matches.c.call_start)).all())
        unmatched = dict(
            connection.execute(
                sa.select(crm_sales.c.crm_id, crm_sales.c.unmatched_reason).where(
                    crm_sales.c.unmatched_reason.is_not(None)
                )
            ).all()
        )
        quarantined = dict(connection.execute(sa.select(quarantine.c.source_row, quarantine.c.reason)).all())
        ledger = connection.execute(sa.select(upload_ledger.c.state, sa.func.count()).group_by("state")).all()
        summary = connection.scalar(sa.select(run_summary.c.counts))

    assert conversions == EXPECTED_CONVERSIONS
    assert call_starts["a-new"] == oslo("2026-11-27 09:00:00")
    assert unmatched == EXPECTED_UNMATCHED
    assert quarantined == EXPECTED_QUARANTINE
    assert ledger == [("uploaded", 4)]
    assert summary["intake"]["read"] == len(CRM_ROWS)
    assert summary["match"]["matched"] == 5 and summary["match"]["conversions"] == 4
    assert summary["upload"]["accepted"] == 4
    stages = ("intake", "call_logs", "match", "conversion_file", "upload")
    # Each stage records its own duration in seconds: positive, and together within the run.
    seconds = {stage: summary[stage]["seconds"] for stage in stages}
    assert all(value > 0 for value in seconds.values()) and sum(seconds.values()) <= run_seconds, (seconds, run_seconds)
    accepted = {(c.caller_id, c.conversion_date_time, c.conversion_action) for c in sandbox.accepted()}
    assert ("+4791234567", "2026-11-27 10:00:00+01:00", "customers/1112223333/conversionActions/111") in accepted
    assert len(accepted) == 4

    exported = project / "export" / ACCOUNT / DAY.isoformat() / f"call_conversions_{ACCOUNT}_{DAY}.csv.enc"
    lines = read_stored(warehouse, test_keyset, exported, project / "export", ACCOUNT, "export")
    lines = lines.decode("utf-8").splitlines()
    assert lines[0] == "Parameters:TimeZone=Europe/Oslo"
    assert lines[1].startswith("Caller's Phone Number,Call Start Time,Conversion Name,Conversion Time")
    assert (
        "\t+4791234567,2026-11-27 09:00:00+01:00,Phone sale,2026-11-27 10:00:00+01:00,1234.5,NOK,Unknown,Unknown"
        in lines
    )
    assert len(lines) == 2 + len(EXPECTED_CONVERSIONS)


def test_running_the_same_day_twice_leaves_identical_tables(project, warehouse, sandbox, test_keyset):
    logical_date = datetime(2026, 11, 28, tzinfo=OSLO)
    assert run_import_dag(logical_date).state == "success"
    first = snapshot(warehouse)
    exported = project / "export" / ACCOUNT / DAY.isoformat() / f"call_conversions_{ACCOUNT}_{DAY}.csv.enc"
    first_file = read_stored(warehouse, test_keyset, exported, project / "export", ACCOUNT, "export")

    assert run_import_dag(logical_date).state == "success"
    second = snapshot(warehouse)
    assert second == first
    # the same plaintext, freshly sealed under the path's next generation
    assert read_stored(warehouse, test_keyset, exported, project / "export", ACCOUNT, "export") == first_file
    assert len(first["matches"]) == len(EXPECTED_CONVERSIONS)
    assert len(sandbox.accepted()) == len(EXPECTED_CONVERSIONS)  # nothing sent twice


def test_a_file_without_the_phone_column_fails_the_task_with_a_clear_message(project, warehouse, capfd):
    folder = project / "landing" / ACCOUNT / DAY.isoformat()
    (folder / "deals.csv").write_text("Deal;Closed at;Outcome\nS1;2026-11-27 10:00:00;sale\n", encoding="utf-8")
    dag_run = run_import_dag(datetime(2026, 11, 28, tzinfo=OSLO))
    assert dag_run.state == "failed"
    output = "".join(capfd.readouterr())
    assert "required column 'Phone' (for caller_phone) not found" in output
    with warehouse.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(crm_sales)) == 0
        assert connection.scalar(sa.select(sa.func.count()).select_from(crm_imports)) == 0


def test_no_phone_number_reaches_the_log(project, caplog, capfd):
    caplog.set_level("DEBUG")
    assert run_import_dag(datetime(2026, 11, 28, tzinfo=OSLO)).state == "success"
    logged = caplog.text + "".join(capfd.readouterr())
    digits = {"".join(ch for ch in row[1] if ch.isdigit())[-8:] for row in CRM_ROWS if len(row[1]) > 6}
    digits |= {"".join(ch for ch in number if ch.isdigit())[-8:] for _, number, *_ in CALLS if number[0] != "n"}
    leaked = sorted(d for d in digits if d in logged)
    assert leaked == []
    assert "quarantined" in logged and "matched" in logged


def test_window_is_the_local_day_across_a_dst_change(project, warehouse):
    """2026-03-29 in Oslo is 23 hours long; the run's window must be exactly that day."""
    dag_run = run_import_dag(datetime(2026, 3, 30, tzinfo=OSLO))
    assert dag_run.data_interval_start == oslo("2026-03-29 00:00:00")
    assert dag_run.data_interval_end == oslo("2026-03-30 00:00:00")
    assert dag_run.data_interval_end - dag_run.data_interval_start == timedelta(hours=23)


def test_a_crm_database_query_is_a_second_source(project, warehouse, pg_schema_url, monkeypatch):
    """The same deals, read from a CRM table through the connection's common-sql hook."""
    schema = sa.make_url(pg_schema_url).query["options"].removeprefix("-csearch_path=")
    with warehouse.begin() as connection:
        connection.execute(
            sa.text(
                "create table crm_deals (batch_day date, deal text, phone text, call_started text,"
                " closed_at text, outcome text, amount text, currency text)"
            )
        )
        connection.execute(
            sa.text("insert into crm_deals values (:day, :d, :p, :s, :c, :o, :a, :cur)"),
            [dict(zip(("d", "p", "s", "c", "o", "a", "cur"), row, strict=True), day=DAY) for row in CRM_ROWS]
            + [
                {
                    "day": date(2026, 11, 26),
                    "d": "OLD",
                    "p": "91234567",
                    "s": None,
                    "c": "2026-11-26 10:00:00",
                    "o": "sale",
                    "a": "1",
                    "cur": "NOK",
                }
            ],
        )
    config_path = project / "call_conversions.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["crm_source"].update(
        kind="sql",
        conn_id="test_crm",
        query=(
            'select deal as "Deal", phone as "Phone", call_started as "Call started", closed_at as "Closed at",'
            f' outcome as "Outcome", amount as "Amount", currency as "Currency" from "{schema}".crm_deals'
            " where batch_day = (%(window_start)s::timestamptz at time zone 'Europe/Oslo')::date"
            " and %(account_id)s = 'test_shop' order by deal = 'S1' desc, closed_at, deal"
        ),
    )
    config_path.write_text(yaml.safe_dump(config))
    url = sa.make_url(pg_schema_url)
    monkeypatch.setenv(
        "AIRFLOW_CONN_TEST_CRM",
        json.dumps(
            {"conn_type": "postgres", "host": url.host, "port": url.port, "login": url.username, "schema": url.database}
        ),
    )
    assert run_import_dag(datetime(2026, 11, 28, tzinfo=OSLO)).state == "success"
    with warehouse.connect() as connection:
        conversions = {
            (
                r.caller_e164,
                r.source_call_id,
                r.conversion_action_id,
                r.conversion_time,
                r.conversion_value.normalize(),
                r.currency_code,
                r.sale_count,
            )
            for r in connection.execute(sa.select(matches))
        }
        imports = connection.execute(sa.select(crm_imports.c.source_uri, crm_imports.c.row_count)).all()
        quarantined = connection.scalars(sa.select(quarantine.c.reason).order_by(quarantine.c.reason)).all()
    assert conversions == EXPECTED_CONVERSIONS
    assert imports == [(f"sql:test_crm:{ACCOUNT}:{DAY}", len(CRM_ROWS))]
    assert sorted(quarantined) == sorted(EXPECTED_QUARANTINE.values())
