"""
### Rerun or backfill chosen days of chosen accounts

For analysts, from **Trigger** in the UI. Pick a date range (account-local days,
both ends included), the accounts, and:

- `dry_run`: upload with `validate_only`; nothing is recorded as uploaded;
- `rematch`: match the days' sales afresh (late call logs, changed rules). Conversions
  already uploaded are frozen and never sent again, whatever the setting;
- `reimport`: read the days' CRM files again even if already imported.

Each (account, day) runs the same steps as the daily import, in a mapped task group,
with the day's local-midnight window. Parked and pending rows are shared with the
daily runs through the ledger, so nothing is duplicated. For a plain backfill of the
schedule, `airflow backfill create --dag-id call_conversions_import__<account>` works too.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag, task, task_group

from callconv.alerts import failure_notifier
from callconv.config import load_settings


def build_rerun_dag():
    """Built from the config, so the form offers exactly the configured accounts."""
    account_ids = [account.id for account in load_settings().accounts]
    return _rerun_dag(account_ids)


def _rerun_dag(account_ids: list[str]):
    @dag(
        dag_id="call_conversions_rerun",
        schedule=None,
        catchup=False,
        max_active_runs=1,
        max_active_tasks=4,
        default_args={
            "owner": "analytics",
            "retries": 2,
            "retry_delay": timedelta(minutes=5),
            "on_failure_callback": failure_notifier(),
        },
        doc_md=__doc__,
        tags=["call-conversions", "google-ads", "rerun"],
        params={
            "start_date": Param(type="string", format="date", title="First day", description="Account-local day."),
            "end_date": Param(type="string", format="date", title="Last day", description="Included."),
            "accounts": Param(
                account_ids,
                type="array",
                items={"type": "string", "enum": account_ids},
                minItems=1,
                uniqueItems=True,
                description="Accounts to rerun, from the config.",
            ),
            "dry_run": Param(
                False, type="boolean", description="Validate the upload only; record nothing as uploaded."
            ),
            "rematch": Param(True, type="boolean", description="Match the days' sales afresh (uploaded ones stay)."),
            "reimport": Param(False, type="boolean", description="Read the days' CRM files again."),
        },
    )
    def call_conversions_rerun():
        @task(retries=0)
        def plan(**context) -> list[dict]:
            """Refuses an end before the start or an unknown account, before anything runs."""
            from callconv.rerun import plan_days

            params = context["params"]
            return plan_days(params["start_date"], params["end_date"], list(params["accounts"]), account_ids)

        @task_group
        def one_day(account_id: str, day: str):
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

            # One delivery at a time in a rerun: an upload sends every due row of its account,
            # so the days' mapped uploads take turns (claims in the ledger keep any overlap
            # with the daily import exactly-once as well).
            @task(retries=3, retry_delay=timedelta(minutes=10), max_active_tis_per_dagrun=1)
            def upload_conversions(account_id: str, day: str, **context) -> dict:
                from callconv.steps import upload_conversions as run

                return run(account_id, context, dry_run=bool(context["params"]["dry_run"]), day=day)

            @task(retries=3, retry_delay=timedelta(minutes=10), max_active_tis_per_dagrun=1)
            def publish_conversion_file(account_id: str, day: str, **context) -> dict:
                from callconv.steps import publish_conversion_file as run

                return run(account_id, context, day=day)

            @task
            def check_anomalies(account_id: str, day: str, **context) -> dict:
                from callconv.alerts import check_anomalies as run

                return run(account_id, context, day=day)

            matched = match_sales(account_id, day)
            take_in_crm_extracts(account_id, day) >> matched
            normalise_call_logs(account_id, day) >> matched
            delivered = [upload_conversions(account_id, day), publish_conversion_file(account_id, day)]
            matched >> write_conversion_file(account_id, day) >> delivered
            delivered >> check_anomalies(account_id, day)

        one_day.expand_kwargs(plan())

    return call_conversions_rerun()


build_rerun_dag()
