"""The rerun DAG over three days across the autumn DST change in Oslo, on PostgreSQL and the sandbox.

Each day's window must be its local midnight to midnight (the 25th of October
2026 is 25 hours long), each sale is uploaded once, and running the same days
again uploads nothing.
"""

from __future__ import annotations

import csv
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from callconv.sandbox import ActionSpec
from callconv.schema import call_logs, run_summary, upload_ledger

pytestmark = pytest.mark.integration

OSLO = ZoneInfo("Europe/Oslo")
DAYS = (date(2026, 10, 24), date(2026, 10, 25), date(2026, 10, 26))
ACCOUNT = "rerun_shop"
CALLERS = ("91234567", "41234567", "92345678")


def local(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=OSLO)


@pytest.fixture()
def three_days(tmp_path, warehouse, airflow_db, write_settings, warehouse_conn, make_sandbox, sandbox_conn):
    write_settings(
        {
            "id": ACCOUNT,
            "customer_id": "2223334444",
            "timezone": "Europe/Oslo",
            "conversion_actions": {"sale": {"id": "77", "name": "Phone sale"}},
        },
        columns={"caller_phone": "phone", "conversion_time": "sold_at", "outcome": "outcome", "crm_id": "id"},
        warehouse_conn_id=warehouse_conn("rerun_warehouse"),
        freshness={"grace_minutes": 60, "poke_minutes": 1},
    )
    calls, known = [], []
    for day in DAYS:
        folder = tmp_path / "landing" / ACCOUNT / day.isoformat()
        folder.mkdir(parents=True)
        with open(folder / "sales.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "phone", "sold_at", "outcome"])
            for index, caller in enumerate(CALLERS):
                # 02:30 happens twice on the 25th: read as the first, summer-time, occurrence.
                call_start = local(day, 1 + index, 10)
                calls.append(
                    {
                        "account_id": ACCOUNT,
                        "source_call_id": f"{day}-{index}",
                        "caller_number": caller,
                        "call_start": call_start.astimezone(UTC),
                        "duration_seconds": 120,
                        "via_google_forwarding": True,
                    }
                )
                known.append((f"+47{caller}", call_start.astimezone(UTC)))
                writer.writerow([f"{day}-{index}", caller, f"{day} 0{2 + index}:30:00", "sale"])
    # One more call at the end of the last day, so the call logs cover every window.
    calls.append({**calls[-1], "source_call_id": "late", "call_start": local(DAYS[-1], 23, 59).astimezone(UTC)})
    with warehouse.begin() as connection:
        connection.execute(call_logs.insert(), calls)

    sandbox = make_sandbox(
        customers={"2223334444": [ActionSpec(id="77", name="Phone sale")]},
        calls=known,
        clock=lambda: local(DAYS[-1], 12) + timedelta(days=3),
    ).start()
    sandbox_conn(sandbox)
    return sandbox


def rerun(conf: dict):
    from dags.call_conversions_rerun import build_rerun_dag

    dag = build_rerun_dag()
    for task in dag.tasks:
        task.retries = 0  # dag.test() would wait out real retry delays
    return dag.test(run_conf=conf)


def test_three_days_across_dst_upload_each_sale_once_and_again_nothing(three_days, warehouse):
    conf = {"start_date": "2026-10-24", "end_date": "2026-10-26", "accounts": [ACCOUNT]}
    first = rerun(conf)
    assert first.state == "success"

    with warehouse.connect() as connection:
        windows = connection.execute(
            sa.select(
                run_summary.c.business_date, run_summary.c.window_start, run_summary.c.window_end, run_summary.c.dag_id
            )
            .where(run_summary.c.run_id == first.run_id)
            .order_by(run_summary.c.business_date)
        ).all()
        ledger = connection.execute(sa.select(upload_ledger.c.state, sa.func.count()).group_by("state")).all()
    assert [row.business_date for row in windows] == list(DAYS)
    # The page links each day to its run in the rerun DAG, not in the import DAG.
    assert {row.dag_id for row in windows} == {"call_conversions_rerun"}
    for row in windows:
        assert row.window_start == local(row.business_date, 0)
        assert row.window_end == local(row.business_date + timedelta(days=1), 0)
    lengths = {row.business_date: row.window_end - row.window_start for row in windows}
    assert lengths == {DAYS[0]: timedelta(hours=24), DAYS[1]: timedelta(hours=25), DAYS[2]: timedelta(hours=24)}
    assert ledger == [("uploaded", 9)]
    accepted = three_days.accepted()
    assert len(accepted) == 9
    assert "2026-10-25 02:30:00+02:00" in {row.conversion_date_time for row in accepted}
    # Each mapped day is labelled with its account and day, and only the API delivery was built.
    tis = first.get_task_instances()
    labels = {ti.rendered_map_index for ti in tis if ti.task_id == "api_day.upload_conversions"}
    assert labels == {f"{ACCOUNT} {day}" for day in DAYS}
    assert not [ti for ti in tis if "publish_conversion_file" in ti.task_id or ti.state == "skipped"]

    def uploads():  # each day's preflight sends one validate_only test conversion, which records nothing
        return [request for request in three_days.requests if not request["validate_only"]]

    uploads_before = len(uploads())
    checks_before = len(three_days.requests) - uploads_before
    second = rerun({**conf, "rematch": True, "reimport": True})
    assert second.state == "success"
    assert len(three_days.accepted()) == 9
    assert len(uploads()) == uploads_before  # nothing was even sent
    # The preflight ran first on each of the three days, in both runs.
    assert checks_before == 3
    assert len(three_days.requests) - len(uploads()) == 6
    with warehouse.connect() as connection:
        counts = connection.scalars(sa.select(run_summary.c.counts).where(run_summary.c.run_id == second.run_id)).all()
    assert [c["upload"]["sent"] for c in counts] == [0, 0, 0]


def test_a_dry_run_records_nothing_as_uploaded(three_days, warehouse):
    run = rerun({"start_date": "2026-10-24", "end_date": "2026-10-24", "accounts": [ACCOUNT], "dry_run": True})
    assert run.state == "success"
    with warehouse.connect() as connection:
        states = connection.execute(sa.select(upload_ledger.c.state, sa.func.count()).group_by("state")).all()
    assert states == [("pending", 3)]
    assert three_days.accepted() == []


def test_end_before_start_fails_at_once_and_runs_no_day(three_days, warehouse):
    run = rerun({"start_date": "2026-10-26", "end_date": "2026-10-24", "accounts": [ACCOUNT]})
    assert run.state == "failed"
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["plan"] == "failed"
    with warehouse.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(upload_ledger)) == 0


def test_a_broken_set_up_fails_the_days_at_their_preflight_before_any_work(three_days, warehouse):
    three_days.set_action("2223334444", ActionSpec(id="77", name="Phone sale", status="REMOVED"))
    run = rerun({"start_date": "2026-10-24", "end_date": "2026-10-25", "accounts": [ACCOUNT]})
    assert run.state == "failed"
    states = {}
    for ti in run.get_task_instances():
        states.setdefault(ti.task_id, set()).add(ti.state)
    assert states["api_day.preflight"] == {"failed"}
    # Nothing after the preflight ran: no sale was read, matched or sent.
    for task_id in ("take_in_crm_extracts", "normalise_call_logs", "match_sales", "upload_conversions"):
        assert states[f"api_day.{task_id}"] == {"upstream_failed"}, task_id
    with warehouse.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(upload_ledger)) == 0
        assert connection.scalar(sa.select(sa.func.count()).select_from(run_summary)) == 0
    assert [request for request in three_days.requests if not request["validate_only"]] == []
