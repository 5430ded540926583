"""The delivery guarantee, attacked through the import DAG on PostgreSQL.

Each test is one of the sequences that used to send Google a duplicate or lose
a sale without a trace: a re-export after a late call, a lost answer followed
by a merge, and a later sale on a call already delivered. Each ends by saying
what the sandbox (playing Google) holds: exactly one conversion per sale under
the account's policy, or a recorded conflict with its reason.
"""

from __future__ import annotations

import csv
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from callconv.sandbox import ActionSpec
from callconv.schema import call_logs, crm_sales, delivery_conflicts, run_summary, upload_ledger

pytestmark = pytest.mark.integration

OSLO = ZoneInfo("Europe/Oslo")
ACCOUNT = "guard"
CUSTOMER = "2223334444"
ACTION = "111"
CALLER = "+4791234567"
HEADER = ["Deal", "Phone", "Closed at", "Outcome", "Amount", "Currency"]


def oslo(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=OSLO).astimezone(UTC)


@pytest.fixture()
def sandbox(make_sandbox, sandbox_conn):
    """Google, two days after the last sale, knowing every forwarded call the test adds."""
    server = make_sandbox(
        customers={CUSTOMER: [ActionSpec(id=ACTION, name="Phone sale")]},
        calls=[(CALLER, oslo("2026-11-27 09:00:00"))],
        clock=lambda: oslo("2026-11-30 12:00:00"),
    ).start()
    sandbox_conn(server)
    return server


@pytest.fixture()
def project(tmp_path, warehouse, airflow_db, sandbox, write_settings, warehouse_conn):
    def configure(late_sale: str = "conflict"):
        write_settings(
            {
                "id": ACCOUNT,
                "customer_id": CUSTOMER,
                "timezone": "Europe/Oslo",
                "conversion_actions": {"sale": {"id": ACTION, "name": "Phone sale"}},
            },
            columns={
                "crm_id": "Deal",
                "caller_phone": "Phone",
                "conversion_time": "Closed at",
                "outcome": "Outcome",
                "value": "Amount",
                "currency": "Currency",
            },
            crm_source={"delimiter": ";", "decimal": ","},
            warehouse_conn_id=warehouse_conn("guard_warehouse"),
            match={"window_days": 30, "late_sale": late_sale},
            freshness={"grace_minutes": 2880},
        )

    configure()
    add_call(warehouse, sandbox, "c1", "2026-11-27 09:00:00")
    return configure


def add_call(engine, sandbox, call_id: str, local_start: str) -> None:
    start = oslo(local_start)
    with engine.begin() as connection:
        connection.execute(
            call_logs.insert().values(
                account_id=ACCOUNT,
                source_call_id=call_id,
                caller_number="912 34 567",
                call_start=start,
                duration_seconds=120,
                via_google_forwarding=True,
            )
        )
    sandbox.add_calls([(CALLER, start)])


def drop_extract(tmp_path, day: str, name: str, rows: list[list[str]]) -> None:
    folder = tmp_path / "landing" / ACCOUNT / day
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=";")
        writer.writerow(HEADER)
        writer.writerows(rows)


def run_day(day: str, **options):
    """The import DAG for one account-local day, through ``dag.test()``."""
    from dags.call_conversion_import import build_import_dag

    logical_date = datetime.fromisoformat(day).replace(tzinfo=OSLO) + timedelta(days=1)
    dag = build_import_dag(ACCOUNT, "Europe/Oslo")
    for task in dag.tasks:
        task.retries = 0  # dag.test() would wait out the real retry delay; a failure shows at once
    dag_run = dag.test(logical_date=logical_date, **options)
    assert dag_run.state == "success", f"the import of {day} ended {dag_run.state}"
    return dag_run


def sent_rows(sandbox) -> list[bytes]:
    """Every conversion sent to be recorded, request by request, as it came on the wire (the preflight's
    validate_only test conversion records nothing, so it is not one of them)."""
    return [payload for request in sandbox.uploads() for payload in request["payloads"]]


def conflicts(engine) -> dict[str, str]:
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(crm_sales.c.crm_id, delivery_conflicts.c.reason).join(
                crm_sales,
                sa.and_(
                    crm_sales.c.account_id == delivery_conflicts.c.account_id,
                    crm_sales.c.sale_key == delivery_conflicts.c.sale_key,
                ),
            )
        ).all()
    return dict(rows)


def test_a_reexport_after_a_late_call_sends_nothing_twice(project, tmp_path, warehouse, sandbox):
    drop_extract(
        tmp_path, "2026-11-27", "deals.csv", [["S1", "912 34 567", "2026-11-27 12:00:00", "sale", "100", "NOK"]]
    )
    run_day("2026-11-27")
    assert [c.call_start for c in sandbox.accepted()] == [oslo("2026-11-27 09:00:00")]

    # A call from the same caller arrives late: after the matched call, before the sale.
    add_call(warehouse, sandbox, "c-late", "2026-11-27 10:00:00")
    # The CRM exports the same day again: the same deal, other bytes.
    drop_extract(
        tmp_path,
        "2026-11-27",
        "deals-again.csv",
        [["S1", "+47 912 34 567", "2026-11-27 12:00", "sale", "100,00", "nok"]],
    )
    run_day("2026-11-27")

    assert len(sandbox.accepted()) == 1
    assert len(sent_rows(sandbox)) == 1  # not even an identical resend
    with warehouse.connect() as connection:
        matched = connection.scalar(sa.select(crm_sales.c.matched_call_id).where(crm_sales.c.crm_id == "S1"))
        ledger = connection.execute(sa.select(upload_ledger.c.state)).scalars().all()
    assert matched == "c1"  # its delivered match survived the re-export
    assert ledger == ["uploaded"]
    assert conflicts(warehouse) == {}

    # Exported a third time with another value: recorded, never sent.
    drop_extract(
        tmp_path, "2026-11-27", "deals-third.csv", [["S1", "91234567", "2026-11-27 12:00:00", "sale", "150", "NOK"]]
    )
    run_day("2026-11-27")
    assert [(c.conversion_value, c.call_start) for c in sandbox.accepted()] == [(100.0, oslo("2026-11-27 09:00:00"))]
    assert len(sent_rows(sandbox)) == 1
    assert conflicts(warehouse) == {"S1": "changed_after_send"}
    with warehouse.connect() as connection:
        detail = connection.scalar(sa.select(delivery_conflicts.c.detail))
        counts = connection.execute(sa.select(run_summary.c.counts).order_by(run_summary.c.updated_at)).scalars().all()
    assert "conversion_value" in detail and "+47" not in detail
    assert counts[-1]["intake"]["conflicts"] == {"changed_after_send": 1}


def test_a_lost_answer_then_a_merge_resends_the_same_bytes(project, tmp_path, warehouse, sandbox):
    from callconv.config import load_settings
    from callconv.delivery.ads_client import client_from_settings
    from callconv.delivery.upload import upload_pending

    drop_extract(tmp_path, "2026-11-27", "deals.csv", [["S1", "91234567", "2026-11-27 12:00:00", "sale", "100", "NOK"]])
    # The first day runs up to its upload; the upload itself is the crash below.
    run_day("2026-11-27", mark_success_pattern="upload_conversions")
    account = load_settings().account(ACCOUNT)
    sandbox.die_after_accept(1)  # Google records the batch; the answer never arrives
    with pytest.raises(Exception, match="UNAVAILABLE|Unavailable|connection lost"):
        upload_pending(
            warehouse,
            account,
            client_from_settings(sandbox.client_settings()),
            oslo("2026-11-28 00:00:00"),
            "crashed-run",
            max_transient_retries=0,
        )
    with warehouse.connect() as connection:
        row = connection.execute(sa.select(upload_ledger)).one()
    assert (row.state, row.sends) == ("pending", 1)
    assert row.sent_at is not None and row.sent_payload is not None

    # The next day a second sale lands on the same call and action.
    drop_extract(tmp_path, "2026-11-28", "deals.csv", [["S2", "91234567", "2026-11-28 10:00:00", "sale", "200", "NOK"]])
    run_day("2026-11-28")

    accepted = sandbox.accepted()
    assert [(c.conversion_value, c.conversion_time) for c in accepted] == [(100.0, oslo("2026-11-27 12:00:00"))]
    first, resent = sent_rows(sandbox)
    assert resent == first  # the recovery resend is byte for byte the first send
    with warehouse.connect() as connection:
        row = connection.execute(sa.select(upload_ledger)).one()
    assert (row.state, row.sends, float(row.conversion_value)) == ("uploaded", 2, 100.0)
    assert conflicts(warehouse) == {"S2": "late_sale_on_delivered_call"}


@pytest.mark.parametrize("policy", ["conflict", "new_conversion"])
def test_a_later_sale_on_a_delivered_call_is_never_dropped_silently(project, tmp_path, warehouse, sandbox, policy):
    project(late_sale=policy)
    drop_extract(tmp_path, "2026-11-27", "deals.csv", [["S1", "91234567", "2026-11-27 12:00:00", "sale", "100", "NOK"]])
    run_day("2026-11-27")
    drop_extract(tmp_path, "2026-11-28", "deals.csv", [["S2", "91234567", "2026-11-28 10:00:00", "sale", "200", "NOK"]])
    run_day("2026-11-28")
    # And again: a rerun of the second day changes nothing.
    run_day("2026-11-28")

    accepted = sorted((c.conversion_time, c.conversion_value) for c in sandbox.accepted())
    with warehouse.connect() as connection:
        summary = connection.scalar(
            sa.select(run_summary.c.counts).where(run_summary.c.business_date == datetime(2026, 11, 28).date())
        )
        ledger = connection.execute(sa.select(upload_ledger.c.state)).scalars().all()
    assert conflicts(warehouse) == {"S2": "late_sale_on_delivered_call"}
    assert summary["match"]["conflicts"] == {"late_sale_on_delivered_call": 1}
    if policy == "conflict":
        assert accepted == [(oslo("2026-11-27 12:00:00"), 100.0)]
        assert ledger == ["uploaded"]
    else:
        # A conversion of its own, with its own time and value: Google counts both.
        assert accepted == [(oslo("2026-11-27 12:00:00"), 100.0), (oslo("2026-11-28 10:00:00"), 200.0)]
        assert ledger == ["uploaded", "uploaded"]
    assert len(sent_rows(sandbox)) == len(accepted)


def test_a_call_rewritten_under_the_same_id_is_a_reason_not_a_crash(project, tmp_path, warehouse, sandbox):
    drop_extract(tmp_path, "2026-11-27", "deals.csv", [["S1", "91234567", "2026-11-27 12:00:00", "sale", "100", "NOK"]])
    run_day("2026-11-27")

    # The telephony system rewrites call c1: another caller, another start, the same id.
    other_caller, new_start = "+4798765432", oslo("2026-11-28 08:00:00")
    with warehouse.begin() as connection:
        connection.execute(
            call_logs.update()
            .where(call_logs.c.source_call_id == "c1")
            .values(caller_number="98765432", caller_e164=None, caller_parse_status=None, call_start=new_start)
        )
    sandbox.add_calls([(other_caller, new_start)])
    # That caller buys the next day: a conversion on the same call id.
    drop_extract(tmp_path, "2026-11-28", "deals.csv", [["S3", "98765432", "2026-11-28 10:00:00", "sale", "70", "NOK"]])
    run_day("2026-11-28")
    run_day("2026-11-27")  # the first day again: its sent sale now points at a changed call

    with warehouse.connect() as connection:
        by_call = connection.execute(
            sa.select(crm_sales.c.crm_id, crm_sales.c.matched_call_id).order_by(crm_sales.c.crm_id)
        ).all()
    assert by_call == [("S1", "c1"), ("S3", "c1")]
    assert sorted((c.caller_id, c.conversion_value) for c in sandbox.accepted()) == [
        (CALLER, 100.0),
        (other_caller, 70.0),
    ]
    assert conflicts(warehouse) == {"S1": "call_changed_after_send"}
