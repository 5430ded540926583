"""The daily import DAG on the CeleryExecutor, as docker-compose.yaml runs it, without Docker.

The compose stack runs every task on a Celery worker fed through Redis, which
no other test exercised: the LocalExecutor of ``test_backfill.py`` runs tasks
in the scheduler's own children. Here a scheduler, an api-server (the workers'
execution API) and an ``airflow celery worker`` run as real processes, with
Redis as the broker and a fresh PostgreSQL database as Airflow's metadata DB
and Celery's result backend (dropped afterwards). One day is backfilled.

Proof that each task ran on the Celery worker, not anywhere else:

- the worker alone is configured with a ``[core] hostname_callable`` naming it,
  and every task instance's ``hostname`` (set by the task runner) is that name;
- every task instance's ``external_executor_id`` is a Celery task id whose row
  in the result backend (``celery_taskmeta``, extended results) says SUCCESS,
  on that worker, from this test's own queue.

Redis that cannot be reached fails the test with a message saying so; it never skips.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa
from airflow_cli import (
    airflow_env,
    as_utc,
    background,
    free_port,
    metadata_rows,
    prepare_home,
    run_backfill,
    wait_for_port,
)
from test_rerun_dag import ACCOUNT, DAYS, local, three_days  # noqa: F401 - shared fixture

from callconv.schema import upload_ledger

pytestmark = pytest.mark.integration

DAG_ID = f"call_conversions_import__{ACCOUNT}"
TASKS = {
    "preflight",
    "take_in_crm_extracts",
    "wait_for_call_logs",
    "normalise_call_logs",
    "match_sales",
    "write_conversion_file",
    "upload_conversions",
    "check_anomalies",
}
# A database of its own on the shared Redis; queues are per test run too, so runs never meet.
DEFAULT_BROKER_TEST_URL = "redis://127.0.0.1:6379/5"


@pytest.fixture()
def redis_broker():
    """The Celery broker URL (``CELERY_BROKER_TEST_URL``), checked; this run's keys are removed afterwards."""
    import redis

    url = os.environ.get("CELERY_BROKER_TEST_URL") or DEFAULT_BROKER_TEST_URL
    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    problem = None
    try:
        client.ping()
    except redis.RedisError as error:
        problem = f"{type(error).__name__}: {error}"
    if problem:  # failed outside the except block, so the message is not buried under redis's tracebacks
        pytest.fail(
            f"Redis is required for the CeleryExecutor test (the Celery broker) and could not be reached "
            f"at {url} (CELERY_BROKER_TEST_URL): {problem}",
            pytrace=False,
        )
    queue = f"callconv_test_{uuid.uuid4().hex[:10]}"
    yield url, queue
    for key in client.scan_iter(match=f"*{queue}*"):
        client.delete(key)
    client.close()


@pytest.fixture()
def celery_stack(tmp_path, redis_broker, metadata_database, three_days):  # noqa: F811 - pytest fixture
    """Scheduler and api-server, then a Celery worker that names itself; yields what the test checks."""
    broker_url, queue = redis_broker
    worker_name = f"callconv-celery-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = airflow_env(
        tmp_path,
        port,
        "CeleryExecutor",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=metadata_database,
        AIRFLOW__CELERY__BROKER_URL=broker_url,
        AIRFLOW__CELERY__RESULT_BACKEND=f"db+{metadata_database}",
        # Celery then records, per task, the worker that ran it and the queue it came from.
        AIRFLOW__CELERY__EXTRA_CELERY_CONFIG=json.dumps({"result_extended": True}),
        AIRFLOW__CELERY__WORKER_CONCURRENCY="2",
        AIRFLOW__OPERATORS__DEFAULT_QUEUE=queue,
    )
    # Only the worker's processes name themselves so: a task instance with this hostname ran there.
    identity = tmp_path / "worker-identity"
    identity.mkdir()
    (identity / "celery_worker_identity.py").write_text(f"def hostname():\n    return {worker_name!r}\n")
    worker_env = {
        **env,
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "celery_worker_identity.hostname",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(identity), env.get("PYTHONPATH")])),
    }
    prepare_home(env, DAG_ID)
    logs = tmp_path / "logs"
    components = {"api-server": ["api-server", "--host", "127.0.0.1", "--port", str(port)], "scheduler": ["scheduler"]}
    worker = {
        "celery-worker": [
            "celery",
            "worker",
            "--celery-hostname",
            worker_name,
            "--without-mingle",
            "--without-gossip",
            # No log server: nothing here reads task logs over HTTP.
            "--skip-serve-logs",
        ]
    }
    with background(env, logs, components) as processes:
        wait_for_port(port, processes, logs)
        with background(worker_env, logs, worker) as worker_processes:
            yield {
                "env": env,
                "sandbox": three_days,
                "processes": processes + worker_processes,
                "queue": queue,
                "worker_name": worker_name,
                "logs": logs,
            }


def celery_results(stack: dict, celery_task_ids: list[str], seconds: int = 60) -> dict[str, dict]:
    """The result-backend rows of the Celery tasks, once each is final.

    A task instance is success as soon as its task runner says so to the execution API; the
    Celery task that ran it ends a moment later, when the worker's supervisor has reaped the
    task process. So the run can be over while a Celery task is still STARTED: wait for it.
    """
    assert all(celery_task_ids), f"a task instance without a Celery task id: {celery_task_ids}"
    deadline = time.monotonic() + seconds
    while True:
        rows = metadata_rows(stack["env"], "select task_id, status, worker, queue from celery_taskmeta")
        results = {row["task_id"]: row for row in rows if row["task_id"] in celery_task_ids}
        final = {task_id for task_id, row in results.items() if row["status"] in ("SUCCESS", "FAILURE", "REVOKED")}
        if final == set(celery_task_ids):
            return results
        for process in stack["processes"]:
            assert process.poll() is None, f"{process.args[3:]} exited; logs in {stack['logs']}"
        if time.monotonic() > deadline:
            pytest.fail(f"Celery tasks not final after {seconds}s: {results}; logs in {stack['logs']}")
        time.sleep(1)


def test_one_day_runs_every_task_on_the_celery_worker_and_uploads_each_sale_once(celery_stack, warehouse):
    env, sandbox, logs = celery_stack["env"], celery_stack["sandbox"], celery_stack["logs"]
    day = DAYS[0]
    # The run's end is enough: no second backfill follows, so no waiting for the scheduler to mark it completed.
    processes = celery_stack["processes"]
    runs = run_backfill(env, DAG_ID, local(day, 0), local(day, 0), processes=processes, until_completed=False)
    assert [run["state"] for run in runs] == ["success"], f"{runs}; logs in {logs}"
    (run,) = runs
    assert (as_utc(run["data_interval_start"]), as_utc(run["data_interval_end"])) == (
        local(day, 0),
        local(day + timedelta(days=1), 0),
    )

    tis = metadata_rows(
        env,
        "select task_id, state, hostname, queue, external_executor_id from task_instance"
        " where dag_id = :dag_id and run_id = :run_id",
        dag_id=DAG_ID,
        run_id=run["run_id"],
    )
    assert {ti["task_id"] for ti in tis} == TASKS
    assert {ti["task_id"]: ti["state"] for ti in tis} == dict.fromkeys(TASKS, "success")
    # Set by the task runner itself; only the worker's environment has this hostname callable.
    assert {ti["task_id"]: ti["hostname"] for ti in tis} == dict.fromkeys(TASKS, celery_stack["worker_name"])
    assert {ti["task_id"]: ti["queue"] for ti in tis} == dict.fromkeys(TASKS, celery_stack["queue"])

    # Celery's own record of each task instance's Celery task: done, by this worker, from this queue.
    results = celery_results(celery_stack, [ti["external_executor_id"] for ti in tis])
    for ti in tis:
        result = results[ti["external_executor_id"]]
        assert (result["status"], result["worker"], result["queue"]) == (
            "SUCCESS",
            f"celery@{celery_stack['worker_name']}",
            celery_stack["queue"],
        ), ti["task_id"]
    worker_log = (logs / "celery-worker.log").read_text()
    for task_id in TASKS:
        assert f"task_id='{task_id}'" in worker_log, f"{task_id} not in the worker's log"

    with warehouse.connect() as connection:
        states = connection.execute(sa.select(upload_ledger.c.state, sa.func.count()).group_by("state")).all()
    assert states == [("uploaded", 3)]
    accepted = sandbox.accepted()
    assert len(accepted) == 3
    assert len({(row.caller_id, row.conversion_date_time) for row in accepted}) == 3
    assert {row.conversion_time.astimezone(local(day, 0).tzinfo).date() for row in accepted} == {day}
    assert sum(request["rows"] for request in sandbox.requests if not request["validate_only"]) == 3
