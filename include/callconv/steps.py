"""One function per DAG task: take the window from the context, run the stage, record its counts.

``day`` (an account-local ISO date) overrides the run's data interval; the
rerun DAG uses it to process chosen days of chosen accounts.

DAG files call these from inside their task bodies, so nothing here runs at
parse time, and each returns only a small dict of counts for XCom.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from datetime import timedelta

from callconv.runtime import log_group, storage_root, task_scope

log = logging.getLogger(__name__)


@contextlib.contextmanager
def fail_at_once(*kinds: type[BaseException]) -> Iterator[None]:
    """Errors of these kinds fail the task without retries: the same data gives the same error.

    The message is the error's first line, which with ``hide_parameters`` names no value.
    """
    try:
        yield
    except kinds as error:
        from airflow.sdk.exceptions import AirflowFailException

        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        raise AirflowFailException(
            f"{type(error).__name__}: {first_line} (not retried: a retry would meet the same data)"
        ) from error


def _permanent_database_errors() -> tuple[type[BaseException], ...]:
    from sqlalchemy import exc

    return (exc.IntegrityError, exc.DataError)


def _record(scope, stage: str, counts: dict) -> dict:
    from callconv.intake.take_in import business_date_of
    from callconv.monitoring.reporting import record_stage

    window = scope.window
    record_stage(
        scope.engine,
        window.run_id,
        scope.account.id,
        business_date_of(scope.account, window.start),
        (window.start, window.end),
        stage,
        {**counts, "seconds": scope.seconds_so_far()},
        dag_id=window.dag_id,
    )
    return counts


class PreflightUnreachable(RuntimeError):
    """Google could not be asked (unreachable, 5xx, quota): Airflow's retries may get through."""


def preflight(account_id: str, context, day: str | None = None) -> dict:
    """The account's delivery set-up, checked before the day's work (see :mod:`callconv.preflight`).

    A set-up problem fails the task at once (a retry would meet the same set-up); an outage is
    raised as an ordinary error, so Airflow retries it. Nothing is written to the warehouse.
    """
    from callconv.preflight import check_account

    scope = task_scope(account_id, context, day)
    with log_group(f"preflight {account_id}"):
        verdict = check_account(scope.settings, scope.account, now=scope.window.end)
        log.info("preflight %s", verdict.line())
    if verdict.outage:
        raise PreflightUnreachable(verdict.line())
    if not verdict.ok:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"preflight {verdict.line()} (not retried: fix the set-up, then clear the task)")
    return {"preflight": "ok"}


def take_in_crm_extracts(account_id: str, context, reimport: bool = False, day: str | None = None) -> dict:
    from callconv.intake.take_in import take_in_day
    from callconv.protection.storage import keyset_for
    from callconv.warehouse import serialised_session

    scope = task_scope(account_id, context, day)
    settings = scope.settings
    keyset = keyset_for(settings)  # refuses to run without one when encryption is required
    # The daily import and a rerun of the same account take turns: one lists, reads and
    # archives the landing files while the other waits, then finds them taken in.
    with (
        serialised_session(scope.engine, "intake", account_id),
        log_group(f"intake {account_id} {scope.window.start:%Y-%m-%d %H:%M} to {scope.window.end:%Y-%m-%d %H:%M} UTC"),
    ):
        outcome = take_in_day(
            scope.engine,
            settings,
            scope.account,
            scope.window.start,
            scope.window.end,
            scope.window.run_id,
            landing_root=storage_root(settings.crm_source_for(scope.account).landing_uri, settings),
            data_docs_root=storage_root(settings.data_docs_uri, settings),
            reimport=reimport,
            query_crm=crm_query_runner(settings.crm_source_for(scope.account)),
            archive_root=storage_root(settings.archive_uri, settings),
            quarantine_root=storage_root(settings.quarantine_uri, settings),
            keyset=keyset,
            keys=pseudonym_keys(settings),
        )
    return _record(scope, "intake", outcome.as_counts())


def crm_query_runner(source):
    """Run the configured CRM query through the connection's common-sql hook (DbApiHook.get_df)."""
    if source.kind != "sql":
        return None
    from airflow.sdk import BaseHook

    hook = BaseHook.get_hook(source.conn_id)
    return lambda parameters: hook.get_df(source.query, parameters=parameters, df_type="pandas")


def normalise_call_logs(account_id: str, context, day: str | None = None) -> dict:
    from callconv.matching.call_logs import normalise_call_logs as normalise

    scope = task_scope(account_id, context, day)
    with log_group(f"normalise call logs {account_id}"):
        counts = normalise(
            scope.engine,
            account_id,
            scope.account.default_region,
            scope.window.start,
            scope.window.end,
            # Twice the match window, so a sale whose caller called only long ago is told apart
            # from one whose caller never called (calls_outside_window vs no_call_from_number).
            2 * scope.settings.match_window(scope.account),
        )
    return _record(scope, "call_logs", counts)


def call_logs_ready(account_id: str, context, day: str | None = None) -> bool:
    """The sensor's poke: do the warehouse's call logs cover this run's window yet?"""
    from callconv.matching.freshness import call_log_coverage

    scope = task_scope(account_id, context, day)
    grace = timedelta(minutes=scope.settings.freshness.grace_minutes)
    coverage = call_log_coverage(scope.engine, account_id, scope.window.end, grace)
    log.info("freshness %s: %s", account_id, coverage.describe())
    return coverage.covered


def match_sales(account_id: str, context, day: str | None = None, rematch: bool = True) -> dict:
    from callconv.intake.take_in import business_date_of
    from callconv.matching.match import match_day

    scope = task_scope(account_id, context, day)
    with log_group(f"match {account_id}"), fail_at_once(*_permanent_database_errors()):
        outcome = match_day(
            scope.engine,
            account_id,
            business_date_of(scope.account, scope.window.start),
            scope.settings.match_rules(scope.account),
            scope.window.run_id,
            rematch=rematch,
            keys=pseudonym_keys(scope.settings),
        )
    return _record(scope, "match", outcome.as_counts())


def write_conversion_file(account_id: str, context, day: str | None = None) -> dict:
    from callconv.delivery.conversion_file import write_conversion_file as write
    from callconv.intake.take_in import business_date_of
    from callconv.protection.storage import keyset_for

    scope = task_scope(account_id, context, day)
    keyset = keyset_for(scope.settings)  # refuses to run without one when encryption is required
    with log_group(f"conversion file {account_id}"):
        written = write(
            scope.engine,
            scope.account,
            business_date_of(scope.account, scope.window.start),
            storage_root(scope.settings.export_uri, scope.settings),
            keyset=keyset,
        )
    return _record(scope, "conversion_file", {"written": written.rows, "path": written.path})


def upload_conversions(account_id: str, context, dry_run: bool = False, day: str | None = None) -> dict:
    """Send the account's due conversions (pending, and parked ones now due) to Google Ads."""
    from callconv.delivery.ads_client import client_from_airflow_connection
    from callconv.delivery.upload import ledger_counts, upload_pending

    scope = task_scope(account_id, context, day)
    if scope.account.delivery != "api":
        log.info("upload: account %s delivers by file; nothing to send through the API", account_id)
        return _record(scope, "upload", {"skipped": "delivery is file"})
    from callconv.delivery.upload import UploadConfigError

    with (
        log_group(f"upload {account_id}{' (dry run)' if dry_run else ''}"),
        fail_at_once(UploadConfigError, *_permanent_database_errors()),
    ):
        client = client_from_airflow_connection(scope.settings.google_ads_conn_id)
        outcome = upload_pending(
            scope.engine,
            scope.account,
            client,
            scope.window.end,
            scope.window.run_id,
            dry_run=dry_run,
            batch_size=scope.settings.upload.batch_size,
            max_concurrent_batches=scope.settings.upload.max_concurrent_batches,
            lease=timedelta(minutes=scope.settings.upload.lease_minutes),
            parked_wait=timedelta(hours=scope.settings.upload.parked_wait_hours),
        )
        counts = {**outcome.as_dict(), "ledger": ledger_counts(scope.engine, account_id)}
    return _record(scope, "upload" if not dry_run else "upload_dry_run", counts)


def deliver_through_data_manager(account_id: str, context, dry_run: bool = False, day: str | None = None) -> dict:
    """Settle the account's Data Manager requests, then send its due conversions (delivery 'data_manager')."""
    from callconv.delivery.data_manager.client import service_from_airflow_connection
    from callconv.delivery.data_manager.deliver import deliver_pending
    from callconv.delivery.data_manager.settle import settle_requests
    from callconv.delivery.upload import ledger_counts

    scope = task_scope(account_id, context, day)
    if scope.account.delivery != "data_manager":
        log.info("data manager: account %s delivers by %s; nothing to send", account_id, scope.account.delivery)
        return _record(scope, "data_manager", {"skipped": f"delivery is {scope.account.delivery}"})
    section = scope.settings.data_manager
    with log_group(f"data manager {account_id}{' (dry run)' if dry_run else ''}"):
        service = service_from_airflow_connection(section.conn_id, section.api_endpoint)
        # The run's own clock: its data interval's end (never wall time in business logic).
        settled = {} if dry_run else settle_requests(scope.engine, scope.account, service, now=scope.window.end)
        outcome = deliver_pending(
            scope.engine,
            scope.account,
            service,
            window_end=scope.window.end,
            run_id=scope.window.run_id,
            now=scope.window.end,
            batch_size=section.batch_size,
            quota_wait=timedelta(minutes=section.quota_wait_minutes),
            dry_run=dry_run,
        )
        counts = {
            "sent": outcome.sent,
            "requests": outcome.requests,
            "resent_requests": outcome.resent_requests,
            "failed": outcome.failed,
            "parked": outcome.parked,
            "validated": outcome.validated,
            "settled": settled,
            "ledger": ledger_counts(scope.engine, account_id),
        }
    return _record(scope, "data_manager" if not dry_run else "data_manager_dry_run", counts)


def publish_conversion_file(account_id: str, context, day: str | None = None) -> dict:
    """Publish the account's cumulative file where Google Ads' scheduled upload fetches it (delivery 'file')."""
    from callconv.delivery.file_delivery import publish_day_file, sftp_publisher
    from callconv.delivery.upload import ledger_counts
    from callconv.intake.take_in import business_date_of

    scope = task_scope(account_id, context, day)
    if scope.account.delivery != "file":
        log.info("file delivery: account %s delivers through the API; nothing to publish", account_id)
        return _record(scope, "file_delivery", {"skipped": "delivery is api"})
    target = scope.settings.file_delivery_for(scope.account)
    with log_group(f"file delivery {account_id}"):
        counts = publish_day_file(
            scope.engine,
            scope.account,
            business_date_of(scope.account, scope.window.start),
            sftp_publisher(target.conn_id, target.remote_dir),
            scope.window.end,
            scope.window.run_id,
            lookback_days=target.lookback_days,
        )
        counts["ledger"] = ledger_counts(scope.engine, account_id)
    return _record(scope, "file_delivery", counts)


def pseudonym_keys(settings):
    """The pseudonym keyring from the connection ``pseudonym_conn_id`` (its keys masked in logs)."""
    from callconv.protection.pseudonyms import keys_from_airflow

    return keys_from_airflow(settings.pseudonym_conn_id)


def hmac_key(conn_id: str) -> bytes:
    """The key that replaces phone numbers with their keyed hash, from a connection's password."""
    from airflow.sdk import Connection

    from callconv.runtime import register_secret

    secret = Connection.get(conn_id).password
    if not secret or len(secret) < 16:
        raise ValueError(f"connection {conn_id!r} must hold an HMAC key of at least 16 characters in its password")
    register_secret(secret)
    return secret.encode()


def apply_retention(data_class: str, context) -> list[dict]:
    """Purge one data class for every account, as of the run's own day; returns the audit counts."""
    from dataclasses import replace

    from callconv.config import load_settings
    from callconv.protection.retention import (
        cutoff,
        purge_quarantine,
        purge_stored_files,
        record_audit,
        redact_warehouse,
        stored_file_roots,
    )
    from callconv.runtime import TaskWindow, warehouse_engine

    settings = load_settings()
    window = TaskWindow.from_context(context)
    engine = warehouse_engine(settings.warehouse_conn_id)
    key = hmac_key(settings.hmac_conn_id) if data_class == "warehouse" else None
    done = []
    with log_group(f"retention {data_class}"):
        for account in settings.accounts:
            retention = settings.retention_for(account)
            as_of = window.end.astimezone(account.tz).date()
            # Airflow's own stores follow the warehouse: debug data lives no longer than the numbers.
            last_day = cutoff(retention, "warehouse" if data_class == "airflow_stores" else data_class, as_of)
            files = [storage_root(uri, settings) for uri in stored_file_roots(settings, data_class, account)]
            if data_class == "airflow_stores":
                purge = _purge_airflow_stores(account, last_day)
            elif data_class == "quarantine":
                rows = purge_quarantine(engine, account, last_day)
                removed = purge_stored_files(files, account, data_class, last_day).affected
                purge = replace(rows, affected=rows.affected + removed)
            elif files:
                purge = purge_stored_files(files, account, data_class, last_day)
            else:
                hard_last_day = as_of - timedelta(days=retention.hard_max_days + 1)
                purge = redact_warehouse(
                    engine, account, last_day, hard_last_day, key, window.end, call_logs_mode=retention.call_logs
                )
            record_audit(engine, window.run_id, purge, window.end)
            done.append({"account": account.id, "affected": purge.affected, "forced": purge.forced})
    return done


def _purge_airflow_stores(account, last_day):
    """Airflow's own debug data of the account's runs up to ``last_day``, under the warehouse's rule.

    Why here and not ``airflow db clean``: that command cleans every DAG by timestamp alone,
    while these data must go per account, by the day a run covers, and only for our DAGs.
    """
    from pathlib import Path

    import sqlalchemy as sa
    from airflow.configuration import conf

    from callconv.protection.airflow_stores import purge_account
    from callconv.protection.retention import Purge

    engine = sa.create_engine(conf.get("database", "sql_alchemy_conn"), hide_parameters=True)
    try:
        done = purge_account(engine, Path(conf.get("logging", "base_log_folder")), account.id, account.tz, last_day)
    finally:
        engine.dispose()
    return Purge("airflow_stores", account.id, last_day, done.affected)
