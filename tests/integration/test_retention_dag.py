"""The retention DAG on PostgreSQL and real files, with data aged 10, 89, 91 and 400 days.

Ages are set through the run's data interval, not the clock.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import pytest
import sqlalchemy as sa

from callconv.protection.retention import caller_hmac
from callconv.schema import crm_sales, matches, quarantine, retention_audit, upload_ledger

pytestmark = pytest.mark.integration

RUN_DAY = date(2026, 11, 27)  # the retention run covers this UTC day; age is counted to its end
AS_OF = RUN_DAY + timedelta(days=1)
AGES = (10, 89, 91, 400)
HMAC_KEY = "test-hmac-key-0123456789"
ACCOUNT = "keep_tidy"


def day_aged(age: int) -> date:
    return AS_OF - timedelta(days=age)


def phone(age: int, suffix: int = 0) -> str:
    return f"+47912{age:03d}{suffix:02d}"


@pytest.fixture()
def aged_data(tmp_path, warehouse, airflow_db, write_settings, warehouse_conn, monkeypatch):
    write_settings(
        {
            "id": ACCOUNT,
            "customer_id": "1112223333",
            "timezone": "UTC",
            "conversion_actions": {"sale": {"id": "1", "name": "Sale"}},
        },
        warehouse_conn_id=warehouse_conn("retention_warehouse"),
        hmac_conn_id="retention_hmac",
        retention={"default_days": 90, "hard_max_days": 365},
    )
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_HMAC", json.dumps({"conn_type": "generic", "password": HMAC_KEY}))

    for root in ("landing", "docs", "export"):
        for age in AGES:
            folder = tmp_path / root / ACCOUNT / day_aged(age).isoformat()
            folder.mkdir(parents=True)
            (folder / "file.bin").write_bytes(b"x")
    sales, match_rows, ledger, quarantined = [], [], [], []
    for age in AGES:
        day = day_aged(age)
        moment = datetime.combine(day, datetime.min.time(), tzinfo=UTC) + timedelta(hours=12)
        for suffix, state in enumerate(("uploaded", "pending", "parked")):
            key = f"{age:03d}-{state}"
            common = {
                "conversion_key": key,
                "account_id": ACCOUNT,
                "business_date": day,
                "caller_e164": phone(age, suffix),
                "call_start": moment - timedelta(hours=1),
                "conversion_action_id": "1",
                "conversion_time": moment,
                "run_id": "seed",
            }
            sales.append(
                {
                    "account_id": ACCOUNT,
                    "sale_key": key,
                    "import_checksum": "c",
                    "source_row": suffix,
                    "business_date": day,
                    "caller_e164": phone(age, suffix),
                    "conversion_time": moment,
                    "outcome": "sale",
                    "conversion_action_id": "1",
                    "conversion_key": key,
                }
            )
            match_rows.append({**common, "source_call_id": key, "sale_count": 1})
            # A sent row keeps the bytes sent to Google, the number inside them.
            sent = phone(age, suffix).encode() if state == "uploaded" else None
            ledger.append({**common, "state": state, "attempts": 1, "sent_payload": sent})
        quarantined.append(
            {
                "account_id": ACCOUNT,
                "import_checksum": "c",
                "source_row": age,
                "business_date": day,
                "reason": "phone_too_short",
                "raw_record": {"p": "12"},
                "run_id": "seed",
            }
        )
    with warehouse.begin() as connection:
        connection.execute(crm_sales.insert(), sales)
        connection.execute(matches.insert(), match_rows)
        connection.execute(upload_ledger.insert(), ledger)
        connection.execute(quarantine.insert(), quarantined)
    return tmp_path


def run_retention():
    from dags.call_conversions_retention import call_conversions_retention

    dag = call_conversions_retention()
    for task in dag.tasks:
        task.retries = 0  # dag.test() would wait out the real retry delay
    return dag.test(logical_date=datetime.combine(AS_OF, datetime.min.time(), tzinfo=UTC))


def test_exactly_the_expired_data_goes_and_waiting_rows_survive(aged_data, warehouse):
    dag_run = run_retention()
    assert dag_run.state == "success"
    assert dag_run.data_interval_end == datetime.combine(AS_OF, datetime.min.time(), tzinfo=UTC)

    for root in ("landing", "docs", "export"):
        left = sorted(p.name for p in (aged_data / root / ACCOUNT).iterdir())
        assert left == sorted(day_aged(age).isoformat() for age in (10, 89)), root

    with warehouse.connect() as connection:
        kept_quarantine = sorted(connection.scalars(sa.select(quarantine.c.source_row)))
        ledger = {row.conversion_key: row for row in connection.execute(sa.select(upload_ledger))}
        sales = {row.sale_key: row for row in connection.execute(sa.select(crm_sales))}
        audit = {
            row.data_class: (row.affected, row.forced)
            for row in connection.execute(sa.select(retention_audit).where(retention_audit.c.run_id == dag_run.run_id))
        }
    assert kept_quarantine == [10, 89]

    for age in (10, 89):  # young: untouched everywhere
        for state in ("uploaded", "pending", "parked"):
            assert ledger[f"{age:03d}-{state}"].caller_e164 is not None
            assert ledger[f"{age:03d}-{state}"].state == state
    # 91 days: delivered rows redacted to the keyed hash, waiting rows kept whole
    delivered = ledger["091-uploaded"]
    assert delivered.caller_e164 is None and delivered.caller_hmac == caller_hmac(HMAC_KEY.encode(), phone(91, 0))
    assert delivered.sent_payload is None and ledger["400-uploaded"].sent_payload is None
    assert ledger["089-uploaded"].sent_payload == phone(89, 0).encode()
    assert sales["091-uploaded"].caller_e164 is None
    for state in ("pending", "parked"):
        assert ledger[f"091-{state}"].caller_e164 == phone(91, ("uploaded", "pending", "parked").index(state))
        assert ledger[f"091-{state}"].state == state
        assert sales[f"091-{state}"].caller_e164 is not None
    # 400 days: past the hard maximum, even waiting rows are given up and redacted
    for state in ("uploaded", "pending", "parked"):
        row = ledger[f"400-{state}"]
        assert row.caller_e164 is None and row.caller_hmac is not None
    assert ledger["400-pending"].state == "failed" and ledger["400-pending"].error_code == "EXPIRED_BY_RETENTION"

    assert audit["landing"] == (2, 0)
    assert audit["data_docs"] == (2, 0)
    assert audit["conversion_files"] == (2, 0)
    assert audit["quarantine"] == (2, 0)
    # sales, matches and ledger: 91 uploaded (3 rows) + 400 all three (9 rows)
    assert audit["warehouse"] == (12, 2)


def test_a_second_run_removes_nothing_more(aged_data, warehouse):
    assert run_retention().state == "success"
    with warehouse.connect() as connection:
        before = connection.execute(sa.select(upload_ledger).order_by(upload_ledger.c.conversion_key)).all()
    second = run_retention()
    assert second.state == "success"
    with warehouse.connect() as connection:
        after = connection.execute(sa.select(upload_ledger).order_by(upload_ledger.c.conversion_key)).all()
        counts = connection.execute(
            sa.select(retention_audit.c.data_class, retention_audit.c.affected).where(
                retention_audit.c.run_id == second.run_id
            )
        ).all()
    assert after == before
    assert sorted(counts) == sorted(
        (name, 0) for name in ("landing", "data_docs", "conversion_files", "quarantine", "warehouse", "airflow_stores")
    )


def test_a_failing_step_fails_the_run_but_later_steps_still_run(aged_data, warehouse, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_RETENTION_HMAC")
    dag_run = run_retention()
    assert dag_run.state == "failed"
    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    assert states["purge_warehouse"] == "failed"
    assert states["purge_quarantine"] == "success"
    assert states["fail_if_any_step_failed"] == "failed"
    assert sorted(p.name for p in (aged_data / "landing" / ACCOUNT).iterdir()) == sorted(
        day_aged(age).isoformat() for age in (10, 89)
    )
