"""Each day's state on the call-conversions page, from Airflow's runs: failed, running or done.

The runs are given as :class:`AirflowRun` (what the page reads from Airflow's database), so
these checks need neither Airflow nor a warehouse. The page itself is rendered from them too.
"""

from __future__ import annotations

import importlib.util
import re
from datetime import UTC, date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from callconv.monitoring import report_queries as q

PROJECT_ROOT = Path(__file__).resolve().parents[2]
OSLO = ZoneInfo("Europe/Oslo")
D1, D2, D3 = date(2026, 11, 25), date(2026, 11, 26), date(2026, 11, 27)
IMPORT = q.import_dag_id("shop_a")
RERUN = q.RERUN_DAG_ID
IMPORT_TASKS = (
    "take_in_crm_extracts",
    "wait_for_call_logs",
    "normalise_call_logs",
    "match_sales",
    "write_conversion_file",
    "upload_conversions",
    "check_anomalies",
)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def import_run(run_id, day, state, started, **task_states) -> q.AirflowRun:
    """An import run of shop_a's day: every task success unless named."""
    tasks = tuple(q.TaskState(task, task_states.get(task, "success")) for task in IMPORT_TASKS)
    return q.AirflowRun(IMPORT, run_id, state, at(started), (("shop_a", day),), tasks)


def rerun(run_id, state, started, days, tasks) -> q.AirflowRun:
    """A rerun of shop_a; ``tasks``: (task, state, day or None for a task that has not started)."""
    return q.AirflowRun(
        RERUN,
        run_id,
        state,
        at(started),
        tuple(("shop_a", day) for day in days),
        tuple(q.TaskState(task, state, f"shop_a {day}" if day else None) for task, state, day in tasks),
    )


# ------------------------------------------------------------------ which days a run covers


def test_an_import_run_covers_the_local_day_its_interval_starts_on():
    zones = {"shop_a": OSLO}
    # Oslo's midnight of the 26th is 23:00 UTC on the 25th.
    assert q.days_covered(IMPORT, at("2026-11-25T23:00:00"), {}, zones) == (("shop_a", D2),)
    assert q.days_covered(q.import_dag_id("other"), at("2026-11-25T23:00:00"), {}, zones) == ()


def test_a_rerun_covers_its_forms_days_of_the_shown_accounts():
    conf = {"start_date": "2026-11-25", "end_date": "2026-11-26", "accounts": ["shop_b", "shop_a"]}
    assert q.days_covered(RERUN, None, conf, {"shop_a": OSLO}) == (("shop_a", D1), ("shop_a", D2))
    # A form that plan refused covers nothing.
    assert q.days_covered(RERUN, None, {**conf, "end_date": "2026-11-01"}, {"shop_a": OSLO}) == ()
    assert q.days_covered(RERUN, None, {"accounts": "shop_a"}, {"shop_a": OSLO}) == ()
    assert q.days_covered("some_other_dag", None, conf, {"shop_a": OSLO}) == ()


# ------------------------------------------------------------------ one run's state for one day


def test_an_import_run_whose_matching_failed_is_failed_and_names_the_task():
    run = import_run(
        "scheduled_1",
        D1,
        "failed",
        "2026-11-26T00:00:00",
        match_sales="failed",
        write_conversion_file="upstream_failed",
        upload_conversions="upstream_failed",
        check_anomalies="upstream_failed",
    )
    assert q.day_state(run, "shop_a", D1) == q.DayState("failed", IMPORT, "scheduled_1", ("match_sales",))


def test_an_import_run_is_failed_as_soon_as_a_task_failed_for_good_even_while_others_run():
    run = import_run(
        "scheduled_1",
        D1,
        "running",
        "2026-11-26T00:00:00",
        take_in_crm_extracts="failed",
        wait_for_call_logs="up_for_reschedule",
        normalise_call_logs=None,
        match_sales=None,
        write_conversion_file=None,
        upload_conversions=None,
        check_anomalies=None,
    )
    assert q.day_state(run, "shop_a", D1).state == "failed"


def test_an_import_run_retrying_or_waiting_is_running_and_one_that_succeeded_is_done():
    waiting = import_run(
        "scheduled_1", D1, "running", "2026-11-26T00:00:00", match_sales="up_for_retry", check_anomalies=None
    )
    assert q.day_state(waiting, "shop_a", D1).state == "running"
    queued = import_run("scheduled_1", D1, "queued", "2026-11-26T00:00:00", **dict.fromkeys(IMPORT_TASKS))
    assert q.day_state(queued, "shop_a", D1).state == "running"
    assert q.day_state(import_run("scheduled_1", D1, "success", "2026-11-26T00:00:00"), "shop_a", D1).state == "done"


def test_a_rerun_day_is_judged_by_its_own_labelled_tasks():
    run = rerun(
        "manual_1",
        "running",
        "2026-11-28T09:00:00",
        [D1, D2, D3],
        [
            ("plan", "success", None),
            ("match_sales", "success", D1),
            ("check_anomalies", "success", D1),
            ("match_sales", "failed", D2),
            ("check_anomalies", "upstream_failed", None),  # never started, so never labelled
            ("take_in_crm_extracts", "running", D3),
        ],
    )
    assert q.day_state(run, "shop_a", D1).state == "done"
    assert q.day_state(run, "shop_a", D2) == q.DayState("failed", RERUN, "manual_1", ("match_sales",))
    assert q.day_state(run, "shop_a", D3).state == "running"


def test_a_finished_rerun_that_never_finished_a_day_leaves_it_failed():
    run = rerun("manual_1", "failed", "2026-11-28T09:00:00", [D1], [("take_in_crm_extracts", "success", D1)])
    assert q.day_state(run, "shop_a", D1).state == "failed"
    # A rerun from before the days were labelled: the run's own state.
    assert q.day_state(rerun("old", "success", "2026-11-28T09:00:00", [D1], []), "shop_a", D1).state == "done"
    assert q.day_state(rerun("old", "running", "2026-11-28T09:00:00", [D1], []), "shop_a", D1).state == "running"


# ------------------------------------------------------------------ the days of the page


def summary(day, *runs, **counts) -> q.DaySummary:
    return q.DaySummary("shop_a", day, runs=list(runs), **counts)


def test_the_latest_run_decides_and_a_rerun_link_gets_its_dag():
    failed_import = import_run(
        "scheduled_1", D1, "failed", "2026-11-26T00:00:00", match_sales="failed", check_anomalies="upstream_failed"
    )
    fixed_by_rerun = rerun("manual_1", "success", "2026-11-28T09:00:00", [D1], [("check_anomalies", "success", D1)])
    # The summary of the rerun was written before the summary kept the DAG.
    days = q.apply_airflow_runs(
        [
            summary(
                D1,
                q.RunRef("manual_1", at("2026-11-28T09:05:00"), None),
                q.RunRef("scheduled_1", at("2026-11-26T00:05:00"), IMPORT),
            )
        ],
        [failed_import, fixed_by_rerun],
        ["shop_a"],
        D1,
        D3,
    )
    (day,) = days
    assert day.state == q.DayState("done", RERUN, "manual_1")
    assert [(run.dag_id, run.run_id) for run in day.runs] == [(RERUN, "manual_1"), (IMPORT, "scheduled_1")]


def test_a_day_only_airflow_knows_is_shown_with_its_state_and_no_counts():
    # Intake refused the day's file, so no stage reported; and a run is queued for the next day.
    refused = import_run(
        "scheduled_2",
        D2,
        "failed",
        "2026-11-27T00:00:00",
        take_in_crm_extracts="failed",
        match_sales="upstream_failed",
        check_anomalies="upstream_failed",
    )
    queued = import_run("scheduled_3", D3, "queued", "2026-11-28T00:00:00", **dict.fromkeys(IMPORT_TASKS))
    outside = import_run("scheduled_0", date(2026, 11, 1), "success", "2026-11-02T00:00:00")
    days = q.apply_airflow_runs(
        [summary(D1, q.RunRef("x", at("2026-11-26T00:00:00"), IMPORT))], [refused, queued, outside], ["shop_a"], D1, D3
    )
    assert [(d.business_date, d.state.state if d.state else None) for d in days] == [
        (D3, "running"),
        (D2, "failed"),
        (D1, None),  # its run is not in Airflow's database any more
    ]
    assert (days[1].intake_runs, days[1].sales, days[1].state.failed_tasks) == (0, None, ("take_in_crm_extracts",))
    assert [run.run_id for run in days[1].runs] == ["scheduled_2"]


def test_a_run_id_found_in_both_dags_is_listed_once_per_dag_without_a_guess():
    same_id = "manual__2026-11-28T09:00:00+00:00"
    days = q.apply_airflow_runs(
        [summary(D1, q.RunRef(same_id, at("2026-11-28T09:05:00"), None))],
        [
            import_run(same_id, D1, "success", "2026-11-28T09:00:00"),
            rerun(same_id, "success", "2026-11-28T09:00:00", [D1], [("check_anomalies", "success", D1)]),
        ],
        ["shop_a"],
        D1,
        D3,
    )
    assert {(run.dag_id, run.run_id) for run in days[0].runs} == {(IMPORT, same_id), (RERUN, same_id)}


# ------------------------------------------------------------------ on the page


@pytest.fixture(scope="module")
def page_module():
    spec = importlib.util.spec_from_file_location(
        "call_conversions_page_states", PROJECT_ROOT / "plugins" / "call_conversions_page.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_page_shows_each_days_state_and_links_each_run_to_its_own_dag(page_module):
    failed = import_run(
        "scheduled_1", D1, "failed", "2026-11-26T00:00:00", match_sales="failed", check_anomalies="upstream_failed"
    )
    running = rerun("manual_1", "running", "2026-11-28T09:00:00", [D2], [("take_in_crm_extracts", "running", D2)])
    days = q.apply_airflow_runs(
        [summary(D1, q.RunRef("scheduled_1", at("2026-11-26T00:05:00"), IMPORT), intake_runs=1, read=4)],
        [failed, running],
        ["shop_a"],
        D1,
        D3,
    )
    html = str(page_module._templates().get_template("tables.html").module.days(days, "shop_a", "/"))
    rows = dict(re.findall(r'<tr data-day="([0-9-]+)">(.*?)</tr>', html, re.S))
    assert 'data-state="failed"' in rows["2026-11-25"] and "match_sales" in rows["2026-11-25"]
    assert 'data-state="running"' in rows["2026-11-26"]
    assert '<td data-col="read">–</td>' in rows["2026-11-26"]  # no intake reported yet
    assert '<td data-col="read">4</td>' in rows["2026-11-25"]
    assert 'href="/dags/call_conversions_rerun/runs/manual_1"' in rows["2026-11-26"]
    assert 'href="/dags/call_conversions_import__shop_a/runs/scheduled_1"' in rows["2026-11-25"]
