"""
### Rerun or backfill chosen days of chosen accounts

For analysts, from **Trigger** in the UI. Pick a date range (account-local days,
both ends included), the accounts, and:

- `dry_run`: upload with `validate_only` (`validateOnly` for `delivery: data_manager`);
  nothing is recorded as uploaded (a file is published as it is);
- `rematch`: match the days' sales afresh (late call logs, changed rules). Conversions
  already uploaded are frozen and never sent again, whatever the setting;
- `reimport`: read the days' CRM files again even if already imported.

Airflow refuses a trigger whose form breaks the Params' schema: a missing or malformed
date, no account, an account that is not in the config, or one chosen twice. **plan**
then refuses, before any day runs, an end before the start and a range of more than
366 days. **api_days**, **file_days** and **dm_days** pick the planned days of the
accounts that deliver each way.

Each (account, day) runs the same steps as the daily import, the **preflight** first, with
the day's local-midnight window (an account whose set-up is broken fails its days at once,
and the other accounts' days go on), in a mapped task group named after the account's delivery:
**api_day** ends in `upload_conversions`, **file_day** in `publish_conversion_file`,
**dm_day** in `deliver_through_data_manager` (it settles the account's earlier requests
from `requestStatus`, then sends its due events).
A group is built only when the config has an account that delivers that way, and a
mapped instance is labelled with its account and day. Parked and pending rows are
shared with the daily runs through the ledger, so nothing is duplicated. For a plain
backfill of the schedule, `airflow backfill create --dag-id call_conversions_import__<account>`
works too.

**Access.** A run may cover several accounts, and whoever can read this DAG reads all of
its runs' logs and XComs, so no account's role is granted it (`access_control={}`): only
operators with global DAG permissions (Admin, Op) see or trigger it. An account's team
reruns its own days through its own import DAG (trigger with a logical date, which matches
the day afresh, with its `reimport` and `dry_run` Params; or a backfill), which its role is granted.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from airflow.sdk import Param, dag, task, task_group

from callconv.config import load_settings
from callconv.monitoring.alerts import failure_notifier

# The rendered map index of each task in a day's group: "<account> <day>", from the task's own
# arguments (passed by keyword, so they are in op_kwargs before and after the task runs).
DAY_LABEL = "{{ task.op_kwargs['account_id'] }} {{ task.op_kwargs['day'] }}"


def build_rerun_dag():
    """Built from the config, so the form offers exactly the configured accounts."""
    accounts = load_settings().accounts
    zones = {account.timezone for account in accounts}
    return _rerun_dag(
        [account.id for account in accounts],
        {account.id: account.delivery for account in accounts},
        # The accounts' zone, when they share one; UTC otherwise.
        zones.pop() if len(zones) == 1 else "UTC",
    )


def _rerun_dag(account_ids: list[str], deliveries: dict[str, str], timezone: str):
    @dag(
        dag_id="call_conversions_rerun",
        description="Runs chosen account-local days of chosen accounts again, from the trigger form",
        schedule=None,
        start_date=datetime(2024, 1, 1, tzinfo=UTC if timezone == "UTC" else ZoneInfo(timezone)),
        catchup=False,
        max_active_runs=1,
        max_active_tasks=4,
        # A run may cover several accounts, and whoever reads the DAG reads every run's logs and
        # XComs, so no per-account role is granted it (an empty mapping removes DAG-level grants).
        access_control={},
        default_args={
            "owner": "analytics",
            "retries": 2,
            "retry_delay": timedelta(minutes=5),
            "on_failure_callback": failure_notifier(),
        },
        doc_md=__doc__,
        tags=["call-conversions", "google-ads", "rerun"],
        params={
            "start_date": Param(
                type="string", format="date", title="First day", description="Account-local day, like 2026-11-27."
            ),
            "end_date": Param(
                type="string", format="date", title="Last day", description="Account-local day, included."
            ),
            "accounts": Param(
                account_ids,
                type="array",
                title="Accounts",
                description="Accounts to rerun, from the config.",
                examples=account_ids,
                items={"type": "string", "enum": account_ids},
                minItems=1,
                uniqueItems=True,
            ),
            "dry_run": Param(
                False,
                type="boolean",
                title="Dry run",
                description="Validate the upload with Google only; record nothing as uploaded. "
                "Accounts that deliver by file publish as usual.",
            ),
            "rematch": Param(
                True,
                type="boolean",
                title="Match again",
                description="Match the days' sales afresh (uploaded ones stay as they were sent).",
            ),
            "reimport": Param(
                False, type="boolean", title="Read the CRM files again", description="Read the days' CRM files again."
            ),
        },
    )
    def call_conversions_rerun():
        @task(retries=0)
        def plan(**context) -> list[dict]:
            """Refuses an end before the start or too long a range, before anything runs."""
            from callconv.rerun import plan_days

            params = context["params"]
            return plan_days(params["start_date"], params["end_date"], list(params["accounts"]), account_ids)

        @task
        def days_delivered_by(delivery: str, plan: list[dict]) -> list[dict]:
            """The plan's (account, day) pairs of the accounts that deliver this way."""
            from callconv.rerun import split_by_delivery

            return split_by_delivery(plan, deliveries)[delivery]

        def day_steps(account_id: str, day: str):
            """Preflight, intake, call logs and matching of one day; returns the task the delivery follows."""

            @task
            def preflight(account_id: str, day: str, **context) -> dict:
                """As in the daily import: a set-up problem fails this day at once, an outage is retried."""
                from callconv.steps import preflight as run

                return run(account_id, context, day=day)

            @task(retries=0)
            def take_in_crm_extracts(account_id: str, day: str, **context) -> dict:
                from callconv.steps import take_in_crm_extracts as run

                return run(account_id, context, reimport=bool(context["params"]["reimport"]), day=day)

            @task
            def normalise_call_logs(account_id: str, day: str, **context) -> dict:
                from callconv.steps import normalise_call_logs as run

                return run(account_id, context, day=day)

            @task
            def match_sales(account_id: str, day: str, **context) -> dict:
                from callconv.steps import match_sales as run

                return run(account_id, context, day=day, rematch=bool(context["params"]["rematch"]))

            @task
            def write_conversion_file(account_id: str, day: str, **context) -> dict:
                from callconv.steps import write_conversion_file as run

                return run(account_id, context, day=day)

            checked = preflight(account_id=account_id, day=day)
            matched = match_sales(account_id=account_id, day=day)
            checked >> take_in_crm_extracts(account_id=account_id, day=day) >> matched
            checked >> normalise_call_logs(account_id=account_id, day=day) >> matched
            written = write_conversion_file(account_id=account_id, day=day)
            matched >> written
            return written

        @task
        def check_anomalies(account_id: str, day: str, **context) -> dict:
            from callconv.monitoring.alerts import check_anomalies as run

            return run(account_id, context, day=day)

        # One delivery at a time in a rerun: a delivery sends (or publishes) every due row of
        # its account, so the days' mapped deliveries take turns (claims in the ledger keep any
        # overlap with the daily import exactly-once as well).
        @task(retries=3, retry_delay=timedelta(minutes=10), max_active_tis_per_dagrun=1)
        def upload_conversions(account_id: str, day: str, **context) -> dict:
            from callconv.steps import upload_conversions as run

            return run(account_id, context, dry_run=bool(context["params"]["dry_run"]), day=day)

        @task(retries=3, retry_delay=timedelta(minutes=10), max_active_tis_per_dagrun=1)
        def publish_conversion_file(account_id: str, day: str, **context) -> dict:
            from callconv.steps import publish_conversion_file as run

            return run(account_id, context, day=day)

        @task(retries=3, retry_delay=timedelta(minutes=10), max_active_tis_per_dagrun=1)
        def deliver_through_data_manager(account_id: str, day: str, **context) -> dict:
            """Settles the account's earlier requests, then sends its due events."""
            from callconv.steps import deliver_through_data_manager as run

            return run(account_id, context, dry_run=bool(context["params"]["dry_run"]), day=day)

        @task_group(default_args={"map_index_template": DAY_LABEL})
        def api_day(account_id: str, day: str):
            """One day of an account that uploads through the Google Ads API."""
            delivered = upload_conversions(account_id=account_id, day=day)
            day_steps(account_id, day) >> delivered >> check_anomalies(account_id=account_id, day=day)

        @task_group(default_args={"map_index_template": DAY_LABEL})
        def file_day(account_id: str, day: str):
            """One day of an account that delivers by file."""
            delivered = publish_conversion_file(account_id=account_id, day=day)
            day_steps(account_id, day) >> delivered >> check_anomalies(account_id=account_id, day=day)

        @task_group(default_args={"map_index_template": DAY_LABEL})
        def dm_day(account_id: str, day: str):
            """One day of an account that delivers through the Data Manager API."""
            delivered = deliver_through_data_manager(account_id=account_id, day=day)
            day_steps(account_id, day) >> delivered >> check_anomalies(account_id=account_id, day=day)

        planned = plan()
        # Only the groups some configured account needs are built.
        if "api" in deliveries.values():
            api_day.expand_kwargs(days_delivered_by.override(task_id="api_days")("api", planned))
        if "file" in deliveries.values():
            file_day.expand_kwargs(days_delivered_by.override(task_id="file_days")("file", planned))
        if "data_manager" in deliveries.values():
            dm_day.expand_kwargs(days_delivered_by.override(task_id="dm_days")("data_manager", planned))

    return call_conversions_rerun()


build_rerun_dag()
