"""
### Daily call-conversion import

One DAG per account in `config/call_conversions.yaml` (or `$CALL_CONVERSIONS_CONFIG`),
scheduled at local midnight in the account's time zone. Each run covers one
account-local day, `[data_interval_start, data_interval_end)`:

0. **preflight**: is the account's delivery set up? Its conversion actions exist, are of type
   `UPLOAD_CALLS` and `ENABLED`, the credentials reach Google, and a `validate_only` request with
   one synthetic conversion passes (`python -m callconv.preflight` asks the same for every
   account). A set-up problem fails the run at once with one line saying what to fix; an outage
   is retried.
1. **take_in_crm_extracts**: read the day's CRM files from the landing area,
   validate them with Great Expectations, normalise phones, times and money,
   and store sales and quarantined rows. Files already imported are skipped.
2. **wait_for_call_logs**: a sensor in reschedule mode (no worker slot held while
   waiting) until the call logs cover the day (`freshness` in the config).
   **normalise_call_logs** then gives the window's call-log rows an E.164 caller.
3. **match_sales**: match each sale to its call inside the warehouse.
4. **write_conversion_file**: write the day's file in Google's import template.
5. The account's one delivery task, from `delivery` in its config:
   - **upload_conversions** (`delivery: api`): send due conversions through
     `ConversionUploadService.UploadCallConversions`, exactly once (the upload ledger), parking
     too-recent calls and retrying them in later runs. `dry_run` sends with `validate_only` and
     records nothing as uploaded.
   - **publish_conversion_file** (`delivery: file`): the account's file on the SFTP server that
     Google Ads' scheduled upload reads is replaced atomically with every conversion not yet
     confirmed within the lookback (`file_delivery.lookback_days`); a published conversion counts
     as delivered once its call leaves the lookback. `dry_run` does not apply.
6. **check_anomalies**: compare the run with the account's history (match rate, missing data,
   parked rows) and alert. Any task failure alerts too, without personal data.

CRM files taken in are kept as encrypted copies in the archive and removed from the landing
area; quarantined rows are exported encrypted; conversion files are written encrypted
(`.csv.enc`, read with `python -m callconv.protection.sealed open`; README, data protection).

Every task is safe to rerun, and a backfill of a day gives the same tables.
Logs carry counts and reason codes, never a phone number.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from airflow.sdk import CronDataIntervalTimetable, Param, dag, task

from callconv.config import Settings, load_settings
from callconv.monitoring.alerts import failure_notifier

DEFAULT_ARGS = {
    "owner": "data-engineering",
    "retries": 2,
    "retry_delay": timedelta(minutes=5),
    "retry_exponential_backoff": True,
}
# The first day a run may cover, at local midnight: the DAG's time zone is taken from it.
FIRST_DAY = (2024, 1, 1)


def _params(delivery: str) -> dict:
    params = {
        "reimport": Param(
            False,
            type="boolean",
            title="Read the CRM files again",
            description="Read the day's CRM files again even if already imported.",
        )
    }
    if delivery in ("api", "data_manager"):  # a file is published as it is: nothing to validate
        params["dry_run"] = Param(
            False,
            type="boolean",
            title="Dry run",
            description="Validate the upload with Google (validate_only); record nothing.",
        )
    return params


def build_import_dag(account_id: str, timezone: str, settings: Settings | None = None):
    settings = settings or load_settings()
    freshness = settings.freshness
    account = settings.account(account_id)
    access_role = account.access_role
    delivery = account.delivery

    @dag(
        dag_id=f"call_conversions_import__{account_id}",
        description=(
            f"Call conversions of {account_id}: one {timezone} day of CRM sales matched to calls, "
            + {
                "api": "uploaded to Google Ads",
                "data_manager": "sent through Google's Data Manager API",
            }.get(delivery, "published in the file Google Ads fetches")
        ),
        schedule=CronDataIntervalTimetable("0 0 * * *", timezone=timezone),
        start_date=datetime(*FIRST_DAY, tzinfo=ZoneInfo(timezone)),
        catchup=False,
        max_active_runs=1,
        default_args={**DEFAULT_ARGS, "on_failure_callback": failure_notifier(account_id=account_id)},
        access_control=(
            {access_role: {"DAGs": {"can_read", "can_edit"}, "DAG Runs": {"can_read", "can_create"}}}
            if access_role
            else None
        ),
        doc_md=__doc__,
        tags=["call-conversions", "google-ads", f"account:{account_id}"],
        params=_params(delivery),
    )
    def call_conversions_import():
        @task
        def preflight(**context) -> dict:
            """A set-up problem (action, customer, credentials) fails at once; an outage is retried."""
            from callconv.steps import preflight as run

            return run(account_id, context)

        @task(retries=0)
        def take_in_crm_extracts(**context) -> dict:
            """Validation failures are about the data, so retrying cannot help."""
            from callconv.steps import take_in_crm_extracts as run

            return run(account_id, context, reimport=bool(context["params"]["reimport"]))

        @task.sensor(
            mode="reschedule",
            poke_interval=timedelta(minutes=freshness.poke_minutes),
            timeout=timedelta(hours=freshness.timeout_hours),
        )
        def wait_for_call_logs(**context) -> bool:
            """Times out with the coverage found in its last log line."""
            from callconv.steps import call_logs_ready

            return call_logs_ready(account_id, context)

        @task
        def normalise_call_logs(**context) -> dict:
            from callconv.steps import normalise_call_logs as run

            return run(account_id, context)

        @task
        def match_sales(**context) -> dict:
            from callconv.steps import match_sales as run

            return run(account_id, context)

        @task
        def write_conversion_file(**context) -> dict:
            from callconv.steps import write_conversion_file as run

            return run(account_id, context)

        @task(retries=3, retry_delay=timedelta(minutes=10))
        def upload_conversions(**context) -> dict:
            """For accounts with delivery 'api': due conversions through the Google Ads API, exactly once."""
            from callconv.steps import upload_conversions as run

            return run(account_id, context, dry_run=bool(context["params"]["dry_run"]))

        @task(retries=3, retry_delay=timedelta(minutes=10))
        def publish_conversion_file(**context) -> dict:
            """For accounts with delivery 'file': the cumulative file over SFTP, replaced atomically."""
            from callconv.steps import publish_conversion_file as run

            return run(account_id, context)

        @task(retries=3, retry_delay=timedelta(minutes=10))
        def deliver_through_data_manager(**context) -> dict:
            """For accounts with delivery 'data_manager': settle earlier requests, then send due events."""
            from callconv.steps import deliver_through_data_manager as run

            return run(account_id, context, dry_run=bool(context["params"]["dry_run"]))

        @task
        def check_anomalies(**context) -> dict:
            """Compares the run with the account's history and alerts; fails only if alerting fails."""
            from callconv.monitoring.alerts import check_anomalies as run

            return run(account_id, context)

        checked = preflight()
        matched = match_sales()
        checked >> take_in_crm_extracts() >> matched
        checked >> wait_for_call_logs() >> normalise_call_logs() >> matched
        # Only the delivery that applies to the account is built.
        if delivery == "api":
            delivered = upload_conversions()
        elif delivery == "data_manager":
            delivered = deliver_through_data_manager()
        else:
            delivered = publish_conversion_file()
        matched >> write_conversion_file() >> delivered
        delivered >> check_anomalies()

    return call_conversions_import()


_settings = load_settings()
for _account in _settings.accounts:
    build_import_dag(_account.id, _account.timezone, _settings)
