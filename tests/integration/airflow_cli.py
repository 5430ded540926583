"""Real Airflow processes for integration tests: the CLI, background components, backfills.

Shared by ``test_backfill.py`` (LocalExecutor) and ``test_celery_executor.py``
(CeleryExecutor), both with PostgreSQL metadata, and the UI tests (SQLite metadata). The metadata
database is the one named by ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` in the
environment given, else the SQLite file under its ``AIRFLOW_HOME``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa

PROJECT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def airflow_env(home: Path, port: int, executor: str, **settings: str) -> dict:
    """An environment for an Airflow home of its own under ``home``: this project's DAGs, no
    examples, an api-server on ``port``, a quick scheduler; ``settings`` add or override."""
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(home / "no-plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": executor,
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": "integration-test-secret-" + "x" * 48,
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "300",
        # Only the backfill's runs: no scheduled run of today's interval alongside them.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        **settings,
    }


def prepare_home(env: dict, dag_id: str) -> None:
    """Metadata database migrated, DAGs serialised, ``dag_id`` unpaused."""
    airflow(env, "db", "migrate")
    airflow(env, "dags", "reserialize")
    airflow(env, "dags", "unpause", dag_id)


def airflow(env: dict, *args: str, timeout: int = 180) -> str:
    # A SQLite metadata DB is shared with the running scheduler: a CLI write can meet
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


@contextlib.contextmanager
def background(env: dict, logs: Path, commands: dict[str, list[str]]) -> Iterator[list[subprocess.Popen]]:
    """Starts ``airflow <command>`` for each name, each in a session of its own, logging to ``logs/<name>.log``.

    On exit, however the block ends, each process group gets SIGTERM, then SIGKILL after 30 s;
    so does any descendant that left its group (the Task SDK supervisor puts each task in a group
    of its own).
    """
    logs.mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen] = []
    with contextlib.ExitStack() as stack:
        try:
            for name, command in commands.items():
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
            yield processes
        finally:
            stop(processes)


def stop(processes: list[subprocess.Popen]) -> None:
    descendants: list[psutil.Process] = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            descendants += psutil.Process(process.pid).children(recursive=True)
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                child.kill()


def wait_for_port(port: int, processes, logs: Path, seconds: int = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for process in processes:
            assert process.poll() is None, f"an Airflow process died at start; logs in {logs}"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(1)
    pytest.fail(f"the Airflow api-server did not listen on {port} within {seconds}s; logs in {logs}")


def metadata_url(env: dict) -> str:
    return env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN") or f"sqlite:///{env['AIRFLOW_HOME']}/airflow.db"


def metadata_rows(env: dict, query: str, **params) -> list[dict]:
    engine = sa.create_engine(metadata_url(env), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(sa.text(query), params)]
    finally:
        engine.dispose()


def backfill_runs(env: dict, dag_id: str, backfill_id: int | None = None) -> list[dict]:
    query = (
        "select dr.run_id, dr.state, dr.data_interval_start, dr.data_interval_end, dr.backfill_id"
        " from dag_run dr where dr.dag_id = :dag_id and dr.run_type = 'backfill'"
    )
    rows = metadata_rows(env, query, dag_id=dag_id)
    return [row for row in rows if backfill_id is None or row["backfill_id"] == backfill_id]


def backfill_completed(env: dict, backfill_id: int) -> bool:
    """The scheduler marks a backfill completed after its runs end; only then may another start."""
    rows = metadata_rows(env, "select completed_at from backfill where id = :id", id=backfill_id)
    return bool(rows) and rows[0]["completed_at"] is not None


def skipped_days(env: dict, backfill_id: int) -> list[dict]:
    """The backfill's days that got no run, with Airflow's reason (say, ``in flight``)."""
    query = (
        "select logical_date, exception_reason from backfill_dag_run"
        " where backfill_id = :id and (dag_run_id is null or exception_reason is not null)"
    )
    return metadata_rows(env, query, id=backfill_id)


def run_backfill(
    env: dict,
    dag_id: str,
    from_date: datetime,
    to_date: datetime,
    *extra: str,
    seconds: int = 300,
    processes=(),
    until_completed: bool = True,
) -> list[dict]:
    """``airflow backfill create`` for the dates, then waits until its runs have ended.

    With ``until_completed``, also until the scheduler has marked the backfill completed, which
    it checks only every 30 s, and which another backfill of the DAG must wait for. Fails at once
    if one of ``processes`` (the running components) dies meanwhile.
    """
    before = {row["backfill_id"] for row in backfill_runs(env, dag_id)}
    create = ["backfill", "create", "--dag-id", dag_id, "--from-date", from_date.isoformat()]
    create += ["--to-date", to_date.isoformat(), "--max-active-runs", "1", *extra]
    airflow(env, *create)
    new_ids = {row["backfill_id"] for row in backfill_runs(env, dag_id)} - before
    assert len(new_ids) == 1, f"expected one new backfill, found {new_ids}"
    backfill_id = new_ids.pop()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for process in processes:
            assert process.poll() is None, f"{process.args[3:]} exited with {process.returncode} during the backfill"
        runs = backfill_runs(env, dag_id, backfill_id)
        ended = runs and all(run["state"] in ("success", "failed") for run in runs)
        if ended and (not until_completed or backfill_completed(env, backfill_id)):
            skipped = skipped_days(env, backfill_id)
            assert not skipped, f"backfill {backfill_id} left days out: {skipped}; its runs: {runs}"
            return runs
        time.sleep(2)
    pytest.fail(f"backfill {backfill_id} did not finish in {seconds}s: {backfill_runs(env, dag_id, backfill_id)}")


def as_utc(value) -> datetime:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
