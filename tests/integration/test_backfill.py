"""A real Airflow backfill of the daily import DAG: scheduler, LocalExecutor and api-server,
with a fresh PostgreSQL database for Airflow's metadata.

``airflow backfill create`` makes the runs from the DAG's own timetable, the
scheduler runs them, and the tasks talk to PostgreSQL and the Google Ads
sandbox. Three days across the autumn DST change in Oslo; then the same
backfill again, which must upload nothing.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa
from airflow_cli import airflow_env, as_utc, background, free_port, prepare_home, wait_for_port
from airflow_cli import run_backfill as run_airflow_backfill
from test_rerun_dag import ACCOUNT, DAYS, local, three_days  # noqa: F401 - shared fixture

from callconv.schema import upload_ledger

pytestmark = pytest.mark.integration

DAG_ID = f"call_conversions_import__{ACCOUNT}"


@pytest.fixture()
def airflow_stack(tmp_path, metadata_database, three_days):  # noqa: F811 - pytest fixture
    """An Airflow home of its own, with an api-server and a scheduler running the LocalExecutor."""
    port = free_port()
    env = airflow_env(tmp_path, port, "LocalExecutor", AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=metadata_database)
    prepare_home(env, DAG_ID)
    logs = tmp_path / "logs"
    commands = {"api-server": ["api-server", "--port", str(port)], "scheduler": ["scheduler"]}
    with background(env, logs, commands) as processes:
        wait_for_port(port, processes, logs)
        yield env, three_days


def run_backfill(env: dict, *extra: str, seconds: int = 300) -> list[dict]:
    return run_airflow_backfill(env, DAG_ID, local(DAYS[0], 0), local(DAYS[-1], 0), *extra, seconds=seconds)


def test_backfill_of_three_days_across_dst_uploads_each_sale_once(airflow_stack, warehouse):
    env, sandbox = airflow_stack
    runs = run_backfill(env)
    assert [run["state"] for run in runs] == ["success"] * 3, runs
    windows = sorted((as_utc(run["data_interval_start"]), as_utc(run["data_interval_end"])) for run in runs)
    assert windows == [(local(day, 0), local(day + timedelta(days=1), 0)) for day in DAYS]
    assert windows[1][1] - windows[1][0] == timedelta(hours=25)

    with warehouse.connect() as connection:
        states = connection.execute(sa.select(upload_ledger.c.state, sa.func.count()).group_by("state")).all()
    assert states == [("uploaded", 9)]
    assert len(sandbox.accepted()) == 9

    # Uploads only: each run's preflight sends one validate_only test conversion, which records nothing.
    requests_before = len(sandbox.uploads())
    again = run_backfill(env, "--reprocess-behavior", "completed")
    assert [run["state"] for run in again] == ["success"] * 3, again
    assert len(sandbox.accepted()) == 9
    assert len(sandbox.uploads()) == requests_before
    assert len(sandbox.searches) == 6  # each run's preflight read the account's actions
