"""A real Airflow backfill of the daily import DAG: scheduler, LocalExecutor and api-server.

``airflow backfill create`` makes the runs from the DAG's own timetable, the
scheduler runs them, and the tasks talk to PostgreSQL and the Google Ads
sandbox. Three days across the autumn DST change in Oslo; then the same
backfill again, which must upload nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from test_rerun_dag import ACCOUNT, DAYS, local, three_days  # noqa: F401 - shared fixture

from callconv.schema import upload_ledger

pytestmark = pytest.mark.integration

PROJECT = Path(__file__).resolve().parents[2]
DAG_ID = f"call_conversions_import__{ACCOUNT}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def airflow(env: dict, *args: str, timeout: int = 180) -> str:
    # The metadata DB is SQLite, shared with the running scheduler: a CLI write can meet
    # its lock. A few tries with a pause, as an operator would.
    for attempt in range(5):
        result = subprocess.run(
            [sys.executable, "-m", "airflow", *args], env=env, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode == 0 or "database is locked" not in result.stdout + result.stderr:
            break
        time.sleep(2 + 2 * attempt)
    assert result.returncode == 0, f"airflow {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture()
def airflow_stack(tmp_path, three_days):  # noqa: F811 - pytest fixture
    """An Airflow home of its own, with an api-server and a scheduler running the LocalExecutor."""
    port = free_port()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(tmp_path / "no-plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": "backfill-test-secret",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "300",
        # Only the backfill's runs: no scheduled run of today's interval alongside them.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
    }
    airflow(env, "db", "migrate")
    airflow(env, "dags", "reserialize")
    airflow(env, "dags", "unpause", DAG_ID)
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = []
    with contextlib.ExitStack() as stack:
        for name, command in (("api-server", ["api-server", "--port", str(port)]), ("scheduler", ["scheduler"])):
            log_file = stack.enter_context(open(logs / f"{name}.log", "w"))
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "airflow", *command],
                    env=env,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        try:
            wait_for_port(port, processes, logs)
            yield env, three_days
        finally:
            for process in processes:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, 15)
            for process in processes:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, 9)


def wait_for_port(port: int, processes, logs: Path, seconds: int = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for process in processes:
            assert process.poll() is None, f"an Airflow process died at start; logs in {logs}"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(1)
    pytest.fail(f"the Airflow api-server did not listen on {port} within {seconds}s; logs in {logs}")


def backfill_runs(env: dict, backfill_id: int | None = None) -> list[dict]:
    engine = sa.create_engine(f"sqlite:///{env['AIRFLOW_HOME']}/airflow.db")
    query = (
        "select dr.run_id, dr.state, dr.data_interval_start, dr.data_interval_end, dr.backfill_id"
        " from dag_run dr where dr.dag_id = :dag_id and dr.run_type = 'backfill'"
    )
    with engine.connect() as connection:
        rows = [dict(row._mapping) for row in connection.execute(sa.text(query), {"dag_id": DAG_ID})]
    engine.dispose()
    return [row for row in rows if backfill_id is None or row["backfill_id"] == backfill_id]


def backfill_completed(env: dict, backfill_id: int) -> bool:
    """The scheduler marks a backfill completed after its runs end; only then may another start."""
    engine = sa.create_engine(f"sqlite:///{env['AIRFLOW_HOME']}/airflow.db")
    with engine.connect() as connection:
        done = connection.scalar(sa.text("select completed_at from backfill where id = :id"), {"id": backfill_id})
    engine.dispose()
    return done is not None


def run_backfill(env: dict, *extra: str, seconds: int = 300) -> list[dict]:
    before = {row["backfill_id"] for row in backfill_runs(env)}
    airflow(
        env,
        "backfill",
        "create",
        "--dag-id",
        DAG_ID,
        "--from-date",
        local(DAYS[0], 0).isoformat(),
        "--to-date",
        local(DAYS[-1], 0).isoformat(),
        "--max-active-runs",
        "1",
        *extra,
    )
    new_ids = {row["backfill_id"] for row in backfill_runs(env)} - before
    assert len(new_ids) == 1, f"expected one new backfill, found {new_ids}"
    backfill_id = new_ids.pop()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        runs = backfill_runs(env, backfill_id)
        if runs and all(run["state"] in ("success", "failed") for run in runs) and backfill_completed(env, backfill_id):
            return runs
        time.sleep(2)
    pytest.fail(f"backfill {backfill_id} did not finish in {seconds}s: {backfill_runs(env, backfill_id)}")


def as_utc(text) -> object:
    from datetime import datetime

    moment = datetime.fromisoformat(str(text))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


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

    requests_before = len(sandbox.requests)
    again = run_backfill(env, "--reprocess-behavior", "completed")
    assert [run["state"] for run in again] == ["success"] * 3, again
    assert len(sandbox.accepted()) == 9
    assert len(sandbox.requests) == requests_before
