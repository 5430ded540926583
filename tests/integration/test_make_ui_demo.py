"""``make ui-demo``, run as a new user runs it: each account's demo day, run by the scheduler, with real task logs.

The Makefile's own target runs, in a shell with no virtualenv activated, on a free port, with an
Airflow home, a warehouse, a var dir and storage roots of the test's own (a copy of the shipped
config, whose two accounts take the two API paths). It must seed the day of both accounts, serve the
Google Ads sandbox with the day's calls and the Data Manager sandbox behind its connection, start
Airflow under FAB and run both accounts' day through the scheduler. Then, for each import DAG: one run,
of the demo day's interval, that succeeded and lasted as long as it really ran (``airflow dags test``
gives a run days of duration); a task log file for every task, which the api-server serves (``dags
test`` writes none: "Log file not found"). The Google Ads account's conversions are accepted by the
sandbox (it used to load 0 calls, and answer ``CALL_NOT_FOUND`` to every one); the Data Manager
account's events reach its sandbox hashed, wait in ``processing`` after the run, and settle as the
next run would settle them (``make ui-demo`` used to run the first account only). No phone number
is printed. Ctrl-C, sent to the command's process group as a terminal sends it, stops everything it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from datetime import UTC, date, datetime

import psutil
import pytest
import sqlalchemy as sa
from airflow_cli import as_utc, free_port, metadata_rows, stop
from test_demo import ADS, DM, demo_config, summaries
from test_make_airflow import Startup, api, make_command, new_user_environment

from callconv.schema import data_manager_requests, run_summary, upload_ledger

pytestmark = pytest.mark.integration

DAG_ID = f"call_conversions_import__{ADS}"  # the Google Ads API path
DM_DAG_ID = f"call_conversions_import__{DM}"  # the Data Manager API path
RUN_ID = "ui_demo__2026-11-27"
DAY = date(2026, 11, 27)
# The Oslo (and Stockholm) day 2026-11-27 in UTC: the interval a scheduled run of that day covers.
DAY_START, DAY_END = datetime(2026, 11, 26, 23, tzinfo=UTC), datetime(2026, 11, 27, 23, tzinfo=UTC)
# The task that hands each DAG's conversions to Google.
DELIVERY_TASK = {DAG_ID: "upload_conversions", DM_DAG_ID: "deliver_through_data_manager"}
# A phone number as the demo's data writes one in E.164: it must appear in no output and no task log.
E164 = re.compile(r"\+\d{8,15}")
# A bound on waiting (a fresh metadata DB, four components, one run on a loaded 2-core machine),
# not a timing assertion.
SECONDS = 900


def the_runs_ended(home) -> dict | None:
    """Each import DAG's demo run and all its runs, once both demo runs have ended; None until then."""
    if not (home / "airflow.db").exists():
        return None
    try:
        rows = metadata_rows({"AIRFLOW_HOME": str(home)}, "select * from dag_run")
    except sa.exc.OperationalError:  # not migrated yet, or locked for a moment
        return None
    found = {}
    for dag_id in (DAG_ID, DM_DAG_ID):
        runs = [row for row in rows if row["dag_id"] == dag_id]
        ended = [row for row in runs if row["run_id"] == RUN_ID and row["state"] in ("success", "failed")]
        if not ended:
            return None
        found[dag_id] = {"run": ended[0], "all": runs}
    return found


def ledger_of(connection, account: str) -> dict:
    """The account's ledger rows of the demo day, counted by state."""
    return dict(
        connection.execute(
            sa.select(upload_ledger.c.state, sa.func.count())
            .where(upload_ledger.c.account_id == account, upload_ledger.c.business_date == DAY)
            .group_by(upload_ledger.c.state)
        ).all()
    )


def latest_counts(connection, account: str) -> dict:
    """The counts of the account's latest run summary (the other account's run may have ended later)."""
    counts = connection.scalar(
        sa.select(run_summary.c.counts)
        .where(run_summary.c.account_id == account)
        .order_by(run_summary.c.updated_at.desc())
    )
    return json.loads(counts) if isinstance(counts, str) else counts


def descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_make_ui_demo_runs_each_accounts_day_through_the_scheduler_and_stops_on_ctrl_c(tmp_path):
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
        ended = startup.until(f"end of run {RUN_ID} of both import DAGs", lambda: the_runs_ended(home))
        observed_at = datetime.now(UTC)
        logged = {}
        for dag_id, found in ended.items():
            run = found["run"]
            assert run["state"] == "success", (dag_id, startup.log_tail())
            assert run["run_type"] == "manual"
            assert (as_utc(run["data_interval_start"]), as_utc(run["data_interval_end"])) == (DAY_START, DAY_END)
            assert as_utc(run["logical_date"]) == DAY_START
            # As long as it really ran: within this test's own lifetime, not days before it.
            assert launched_at <= as_utc(run["start_date"]) <= as_utc(run["end_date"]) <= observed_at
            assert [row["run_id"] for row in found["all"]] == [RUN_ID]  # the scheduler made no run of its own

            tasks = metadata_rows(
                {"AIRFLOW_HOME": str(home)},
                "select task_id, state, try_number from task_instance where dag_id = :dag_id and run_id = :run_id",
                dag_id=dag_id,
                run_id=RUN_ID,
            )
            assert {task["task_id"] for task in tasks} >= {"take_in_crm_extracts", "match_sales", DELIVERY_TASK[dag_id]}
            assert {task["state"] for task in tasks} == {"success"}
            # Each task ran once: nothing needed a retry (two runs writing the SQLite warehouse
            # side by side met "database is locked", and a retry waits minutes).
            assert {task["try_number"] for task in tasks} == {1}, tasks
            run_logs = home / "logs" / f"dag_id={dag_id}" / f"run_id={RUN_ID}"
            for task in tasks:
                log_file = run_logs / f"task_id={task['task_id']}" / f"attempt={task['try_number']}.log"
                assert log_file.is_file() and log_file.stat().st_size > 0, f"no task log {log_file}"
                logged[log_file] = log_file.read_text(errors="replace")
        assert set(DELIVERY_TASK) == set(ended)
        # The runs took turns, in the config's order: the embedded warehouse has one writer.
        first, second = ended[DAG_ID]["run"], ended[DM_DAG_ID]["run"]
        assert as_utc(first["end_date"]) <= as_utc(second["start_date"])
        for log_file, text in logged.items():
            assert not E164.search(text), f"a phone number in {log_file}"

        # The UI's log view reads that file: what "Log file not found" used to be.
        password = (home / "admin-password").read_text().strip()
        banner = log_path.read_text(errors="replace")
        for shown_to_the_user in (f"http://localhost:{port}", f"admin with password {password}", DAG_ID, RUN_ID):
            assert shown_to_the_user in banner
        assert '"Call conversions" in the navigation bar' in banner
        for dag_id, task_id in DELIVERY_TASK.items():  # both runs, each with its direct link and delivery task
            assert f"http://localhost:{port}/dags/{dag_id}/runs/{RUN_ID}" in banner
            assert task_id in banner
        status, answer = api(port, "POST", "/auth/token", body={"username": "admin", "password": password})
        assert status == 201, answer
        for dag_id, task_id in DELIVERY_TASK.items():
            path = f"/api/v2/dags/{dag_id}/dagRuns/{RUN_ID}/taskInstances/{task_id}/logs/1"
            status, shown = api(port, "GET", path, token=answer["access_token"])
            assert status == 200, shown
            events = [str(line.get("event", "")) for line in shown["content"]]
            assert any(event.endswith(f"task_id={task_id}/attempt=1.log") for event in events), events[:5]
            assert not any("not found" in event.lower() for event in events)

        # Both runs' summaries are printed once they have ended, the Data Manager one with its settle.
        startup.until("the summaries", lambda: "Everything keeps running" in log_path.read_text(errors="replace"))
        output = log_path.read_text(errors="replace")
        printed = summaries(output)
        assert set(printed) == {ADS, DM}, output[-3000:]

        engine = sa.create_engine(warehouse_url)
        with engine.connect() as connection:
            ledger, dm_ledger = ledger_of(connection, ADS), ledger_of(connection, DM)
            counts, dm_counts = latest_counts(connection, ADS), latest_counts(connection, DM)
            requests = data_manager_requests.c
            dm_sent = connection.execute(
                sa.select(requests.run_id, requests.events, requests.body).where(requests.account_id == DM)
            ).all()
        engine.dispose()
        upload = counts["upload"]
        assert upload["accepted"] > 0 and ledger.get("uploaded") == upload["accepted"]
        assert "CALL_NOT_FOUND" not in upload["failed"], upload
        assert f"sandbox holds:      {upload['accepted']} accepted conversions" in printed[ADS]

        # The Data Manager account: its run sent the day's events through deliver_through_data_manager ...
        sent = dm_counts["data_manager"]["sent"]
        assert sent > 0 and "upload" not in dm_counts, dm_counts
        assert {run_id for run_id, _, _ in dm_sent} == {RUN_ID}
        assert sum(events for _, events, _ in dm_sent) == sent
        assert all(json.loads(body)["validateOnly"] is False for _, _, body in dm_sent)
        # ... the Data Manager sandbox received them, hashed, and the run left their rows in 'processing' ...
        assert re.search(
            rf"sandbox received:   {len(dm_sent)} ingest request\(s\) with {sent} events"
            r"(, and \d+ validateOnly request\(s\))?; every phone number a SHA-256 hash\n",
            printed[DM],
        ), printed[DM]
        assert f"upload ledger:      {{'processing': {sent}}}" in printed[DM]
        assert f"requestStatus now:  PROCESSING for {len(dm_sent)} request(s) of {sent} events" in printed[DM]
        # ... until the settle step a later run starts with: delivered, as the warehouse holds them.
        assert f"upload ledger now:  {{'delivered': {sent}}}" in printed[DM]
        assert dm_ledger == {"delivered": sent}
        assert not E164.search(output), "a phone number in the output of make ui-demo"

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
        assert f"The Data Manager sandbox received {sent} events." in output, output[-3000:]
        left = [child for child in started if alive(child)]
        assert left == [], [child.pid for child in left]
    finally:
        stop([process])
