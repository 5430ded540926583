"""
### Retention cleanup for call-conversion data

Runs daily and removes personal data once its retention period is over
(`retention` in the config, per data class and account; 90 days by default):

- **landing** (and the encrypted archive copies), **data_docs**, **conversion_files**: day folders
  older than the period are deleted;
- **quarantine**: quarantined CRM rows and their encrypted exports are deleted;
- **warehouse**: per call, the call-log row and every sale, conversion and ledger row on it together:
  phone numbers are replaced by a keyed hash (HMAC-SHA256, key from the `call_conversions_hmac`
  connection), call ids by `redacted`, CRM ids and the bytes sent to Google removed, and the call-log
  row's caller columns emptied or the row deleted (`retention.call_logs`: redact | drop). Nothing left
  joins back to a number. A call with a conversion still pending or parked for upload is kept whole,
  unless older than `hard_max_days`.

- **airflow_stores**: Airflow's own debug data of our runs (import DAG of the account, and reruns
  naming it) whose day is past the warehouse period: XComs and rendered template fields deleted,
  run conf emptied, task-log folders removed. Other DAGs are never touched.

Files that hold numbers (landing, quarantine, conversion files) never outlive the warehouse's numbers.

It touches every account, so no account's role is granted it (`access_control={}`): only
operators with global DAG permissions (Admin, Op) can see, run or read it.

Age is counted up to the run's own day (its data interval), never the clock, so a rerun
or backfill removes exactly the same data. Every step writes an audit row. The steps run
even when an earlier one fails, and the `fail_if_any_step_failed` watcher then fails the run.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import CronDataIntervalTimetable, TriggerRule, dag, task

from callconv.monitoring.alerts import failure_notifier

DATA_CLASSES = ("landing", "data_docs", "conversion_files", "quarantine", "warehouse", "airflow_stores")


@dag(
    dag_id="call_conversions_retention",
    description="Removes or hashes personal data of every account once its retention period is over",
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    # One run for all accounts, whatever their zones: its day is a UTC day, and each account's
    # age is counted in its own zone from the run's end.
    start_date=datetime(2024, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    # Every account's data in one run: no per-account role is granted it (an empty mapping
    # removes any DAG-level grant), so only roles with global DAG permissions (Admin, Op) see it.
    access_control={},
    default_args={
        "owner": "data-engineering",
        "retries": 2,
        "retry_delay": timedelta(minutes=10),
        "on_failure_callback": failure_notifier(),
    },
    doc_md=__doc__,
    tags=["call-conversions", "retention", "privacy"],
)
def call_conversions_retention():
    @task(trigger_rule=TriggerRule.ALL_DONE)
    def purge(data_class: str, **context) -> list[dict]:
        from callconv.steps import apply_retention

        return apply_retention(data_class, context)

    @task(trigger_rule=TriggerRule.ONE_FAILED, retries=2)
    def fail_if_any_step_failed() -> None:
        raise RuntimeError("a retention step failed; see its task log. Data of that class may be kept too long")

    steps = [purge.override(task_id=f"purge_{name}")(name) for name in DATA_CLASSES]
    for earlier, later in zip(steps, steps[1:], strict=False):
        earlier >> later
    steps >> fail_if_any_step_failed()


call_conversions_retention()
