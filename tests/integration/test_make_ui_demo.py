"""``make ui-demo``, run as a new user runs it: the demo day, run by the scheduler, with real task logs.

The Makefile's own target runs, in a shell with no virtualenv activated, on a free port, with an
Airflow home, a warehouse, a var dir and storage roots of the test's own (a copy of the shipped
config). It must seed the day, serve the sandbox with the day's calls, start Airflow under FAB and run the
day through the scheduler. Then: one run, of the demo day's interval, that succeeded and lasted as
long as it really ran (``airflow dags test`` gives a run days of duration); a task log file for every
task, which the api-server serves (``dags test`` writes none: "Log file not found"); conversions
accepted by the sandbox (it used to load 0 calls, and answer ``CALL_NOT_FOUND`` to every one).
Ctrl-C, sent to the command's process group as a terminal sends it, stops everything it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from datetime import UTC, datetime

import psutil
import pytest
import sqlalchemy as sa
from airflow_cli import as_utc, free_port, metadata_rows, stop
from test_demo import demo_config
from test_make_airflow import Startup, api, make_command, new_user_environment

from callconv.schema import run_summary, upload_ledger

pytestmark = pytest.mark.integration

DAG_ID = "call_conversions_import__nordic_plumbing"
RUN_ID = "ui_demo__2026-11-27"
# The Oslo day 2026-11-27 in UTC: the interval a scheduled run of that day covers.
DAY_START, DAY_END = datetime(2026, 11, 26, 23, tzinfo=UTC), datetime(2026, 11, 27, 23, tzinfo=UTC)
# A bound on waiting (a fresh metadata DB, four components, one run on a loaded 2-core machine),
# not a timing assertion.
SECONDS = 900


def the_run_ended(home) -> dict | None:
    """The demo run's row once it has ended; None while the metadata DB or the run is not there yet."""
    if not (home / "airflow.db").exists():
        return None
    try:
        rows = metadata_rows({"AIRFLOW_HOME": str(home)}, "select * from dag_run where dag_id = :dag_id", dag_id=DAG_ID)
    except sa.exc.OperationalError:  # not migrated yet, or locked for a moment
        return None
    ended = [row for row in rows if row["run_id"] == RUN_ID and row["state"] in ("success", "failed")]
    return {"run": ended[0], "all": rows} if ended else None


def descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_make_ui_demo_runs_the_day_through_the_scheduler_and_stops_on_ctrl_c(tmp_path):
    demo_config(tmp_path)
    port = free_port()
    home = tmp_path / "airflow-home"
    warehouse_url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    env = new_user_environment(port)
    env["CALL_CONVERSIONS_CONFIG"] = str(tmp_path / "config.yaml")
    env.pop("CALL_CONVERSIONS_ENCRYPTION_KEYS", None)  # a new user's demo: the shipped config opts out
    command = make_command("ui-demo", home, warehouse_url, f"UI_DEMO_VAR={tmp_path / 'var'}", "DEMO_DATE=2026-11-27")
    log_path = tmp_path / "make-ui-demo.log"
    launched_at = datetime.now(UTC)
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # As from a terminal: Ctrl-C not ignored, even where pytest itself was started in the background.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        startup = Startup(process, log_path, SECONDS, name="make ui-demo")
        ended = startup.until(f"end of run {RUN_ID}", lambda: the_run_ended(home))
        observed_at = datetime.now(UTC)
        run = ended["run"]
        assert run["state"] == "success", startup.log_tail()
        assert run["run_type"] == "manual"
        assert (as_utc(run["data_interval_start"]), as_utc(run["data_interval_end"])) == (DAY_START, DAY_END)
        assert as_utc(run["logical_date"]) == DAY_START
        # As long as it really ran: within this test's own lifetime, not days before it.
        assert launched_at <= as_utc(run["start_date"]) <= as_utc(run["end_date"]) <= observed_at
        assert [row["run_id"] for row in ended["all"]] == [RUN_ID]  # the scheduler made no run of its own

        tasks = metadata_rows(
            {"AIRFLOW_HOME": str(home)},
            "select task_id, state, try_number from task_instance where dag_id = :dag_id and run_id = :run_id",
            dag_id=DAG_ID,
            run_id=RUN_ID,
        )
        assert {task["task_id"] for task in tasks} >= {"take_in_crm_extracts", "match_sales", "upload_conversions"}
        assert {task["state"] for task in tasks} == {"success"}
        run_logs = home / "logs" / f"dag_id={DAG_ID}" / f"run_id={RUN_ID}"
        for task in tasks:
            log_file = run_logs / f"task_id={task['task_id']}" / f"attempt={task['try_number']}.log"
            assert log_file.is_file() and log_file.stat().st_size > 0, f"no task log {log_file}"

        # The UI's log view reads that file: what "Log file not found" used to be.
        password = (home / "admin-password").read_text().strip()
        banner = log_path.read_text(errors="replace")
        for shown_to_the_user in (f"http://localhost:{port}", f"admin with password {password}", DAG_ID, RUN_ID):
            assert shown_to_the_user in banner
        assert '"Call conversions" in the navigation bar' in banner
        status, answer = api(port, "POST", "/auth/token", body={"username": "admin", "password": password})
        assert status == 201, answer
        path = f"/api/v2/dags/{DAG_ID}/dagRuns/{RUN_ID}/taskInstances/upload_conversions/logs/1"
        status, shown = api(port, "GET", path, token=answer["access_token"])
        assert status == 200, shown
        events = [str(line.get("event", "")) for line in shown["content"]]
        assert any(event.endswith("task_id=upload_conversions/attempt=1.log") for event in events), events[:5]
        assert not any("not found" in event.lower() for event in events)

        engine = sa.create_engine(warehouse_url)
        with engine.connect() as connection:
            ledger = dict(
                connection.execute(
                    sa.select(upload_ledger.c.state, sa.func.count()).group_by(upload_ledger.c.state)
                ).all()
            )
            counts = connection.scalar(sa.select(run_summary.c.counts).order_by(run_summary.c.updated_at.desc()))
        engine.dispose()
        upload = (json.loads(counts) if isinstance(counts, str) else counts)["upload"]
        assert upload["accepted"] > 0 and ledger.get("uploaded") == upload["accepted"]
        assert "CALL_NOT_FOUND" not in upload["failed"], upload

        # Ctrl-C, as a terminal sends it to the foreground process group.
        started = descendants(process.pid)
        commands = []
        for child in started:
            with contextlib.suppress(psutil.Error):  # a task process that has just ended
                commands.append(" ".join(child.cmdline()))
        assert any("callconv.local_airflow" in command for command in commands), commands
        assert any("scheduler" in command for command in commands), commands
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=180)
        output = log_path.read_text(errors="replace")
        stopped = re.search(r"Stopped\. The sandbox accepted (\d+) conversions\.", output)
        assert stopped and int(stopped.group(1)) == upload["accepted"], output[-3000:]
        left = [child for child in started if alive(child)]
        assert left == [], [child.pid for child in left]
    finally:
        stop([process])
