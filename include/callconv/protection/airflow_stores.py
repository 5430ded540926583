"""Retention for what Airflow itself keeps about our runs: task logs, XComs, rendered fields, run conf.

Why: the warehouse forgets a caller after the retention period, but Airflow's own stores keep
each run's debug data forever. Those can hold personal data (a task log line, an XCom returned
by a task, a templated argument, a rerun's conf), so they follow the same rule: once a run's
day is past the account's retention cutoff, its XComs and rendered fields are deleted, its
conf is emptied and its task-log folder removed. The dag_run and task_instance rows stay
(they hold ids, dates and states only), so Airflow's history and the page's links keep working.

Plain SQLAlchemy on the metadata database, so this stays importable and testable without Airflow.
Only our own DAG ids are touched, and deleting what is already gone changes nothing.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import sqlalchemy as sa

log = logging.getLogger(__name__)

RERUN_DAG_ID = "call_conversions_rerun"

_meta = sa.MetaData()
dag_run = sa.Table(
    "dag_run",
    _meta,
    sa.Column("dag_id", sa.String),
    sa.Column("run_id", sa.String),
    sa.Column("data_interval_start", sa.DateTime(timezone=True)),
    sa.Column("conf", sa.JSON),
)
xcom = sa.Table("xcom", _meta, sa.Column("dag_id", sa.String), sa.Column("run_id", sa.String))
rendered = sa.Table(
    "rendered_task_instance_fields", _meta, sa.Column("dag_id", sa.String), sa.Column("run_id", sa.String)
)


def import_dag_id(account_id: str) -> str:
    return f"call_conversions_import__{account_id}"


@dataclass(frozen=True)
class StoresPurge:
    runs: int  # runs whose debug data was (or had already been) removed
    affected: int  # XCom rows, rendered-field rows, non-empty confs and log folders removed now


def expired_runs(connection, account_id: str, zone: ZoneInfo, last_day: date) -> list[tuple[str, str]]:
    """(dag_id, run_id) of the runs that hold this account's data of ``last_day`` or earlier.

    An import run covers the local day its data interval starts on. A rerun names its accounts
    and days in its conf; it goes once its last day is past the cutoff of any account it names,
    so the strictest account's rule wins for the shared run.
    """
    # In UTC: on SQLite the metadata DB keeps naive UTC strings, and a zone offset would be dropped.
    end = datetime.combine(last_day + timedelta(days=1), time.min, tzinfo=zone).astimezone(UTC)
    imports = connection.execute(
        sa.select(dag_run.c.dag_id, dag_run.c.run_id).where(
            dag_run.c.dag_id == import_dag_id(account_id), dag_run.c.data_interval_start < end
        )
    ).all()
    found = [(row.dag_id, row.run_id) for row in imports]
    reruns = connection.execute(
        sa.select(dag_run.c.run_id, dag_run.c.conf).where(dag_run.c.dag_id == RERUN_DAG_ID)
    ).all()
    for row in reruns:
        conf = row.conf or {}
        if account_id in (conf.get("accounts") or []) and _last_day(conf) is not None and _last_day(conf) <= last_day:
            found.append((RERUN_DAG_ID, row.run_id))
    return found


def _last_day(conf: dict) -> date | None:
    try:
        return date.fromisoformat(str(conf.get("end_date") or conf.get("start_date")))
    except ValueError:
        return None


def purge_runs(engine: sa.Engine, log_folder: Path, runs: list[tuple[str, str]]) -> StoresPurge:
    affected = 0
    with engine.begin() as connection:
        for dag_id, run_id in runs:
            for table in (xcom, rendered):
                affected += connection.execute(
                    table.delete().where(table.c.dag_id == dag_id, table.c.run_id == run_id)
                ).rowcount
            # A rerun's conf names the account whose expiry picked it: emptied, kept readable.
            affected += connection.execute(
                dag_run.update()
                .where(dag_run.c.dag_id == dag_id, dag_run.c.run_id == run_id, _non_empty(dag_run.c.conf))
                .values(conf={})
            ).rowcount
    for dag_id, run_id in runs:
        folder = log_folder / f"dag_id={dag_id}" / f"run_id={run_id}"
        if folder.is_symlink():
            folder.unlink()
            affected += 1
        elif folder.exists():
            shutil.rmtree(folder)
            affected += 1
    log.info("Airflow stores: %d runs past retention, %d items removed", len(runs), affected)
    return StoresPurge(runs=len(runs), affected=affected)


def _non_empty(conf):
    return sa.and_(conf.is_not(None), sa.cast(conf, sa.String).notin_(["{}", "null"]))


def purge_account(engine, log_folder: Path, account_id: str, zone: ZoneInfo, last_day: date) -> StoresPurge:
    with engine.connect() as connection:
        runs = expired_runs(connection, account_id, zone, last_day)
    return purge_runs(engine, log_folder, runs)
