"""``python -m callconv.demo ui``: the demo day of every account in the Airflow UI, run by the scheduler.

``make demo`` runs the day with ``airflow dags test``. That writes no task log
files, so every task log in the UI says "Log file not found", and the run's
start date is its logical date, so it shows a duration of days. Here the day
is run as production runs it: the scheduler, api-server, dag-processor and
triggerer under the FAB auth manager (:mod:`callconv.local_airflow`, as
``make airflow``; standalone would force the simple auth manager), with the
Google Ads sandbox behind the Google Ads connection and, when an account
delivers through the Data Manager API, the Data Manager sandbox behind that
connection (both as ``make demo`` sets them up). Each account's import DAG gets
one run of the demo day, created through the REST API, which alone lets a
manual run cover a given data interval (``airflow dags trigger`` would give it
the interval before now). The scheduler creates no other run
(``use_job_schedule`` off), and the command keeps everything up until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import date, datetime, timedelta
from pathlib import Path

from callconv.config import Account, Settings

# Migrating a fresh metadata database and starting four components takes a minute or two
# on a small machine; a bound on waiting, after which the command gives up and says why.
START_SECONDS = 600
PASSWORD_FILE = "admin-password"  # written by callconv.local_airflow
# The task that hands an account's conversions to Google, by delivery: the log worth opening first.
DELIVERY_TASKS = {"api": "upload_conversions", "data_manager": "deliver_through_data_manager"}


class Api:
    """The api-server's REST API as the admin user: JSON in, (status, JSON) out."""

    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"
        self.token: str | None = None

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict | str]:
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode(errors="replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def login(self, password: str) -> None:
        status, answer = self.call("POST", "/auth/token", {"username": "admin", "password": password})
        if status != 201:
            raise RuntimeError(f"the admin login was refused ({status}): {answer}")
        self.token = answer["access_token"]


def airflow_env(settings: Settings, warehouse_url: str, sandbox, port: int, var_dir: Path) -> dict[str, str]:
    """The environment the Airflow components get, and they pass to each task."""
    from callconv.config import PROJECT_ROOT
    from callconv.delivery.ads_client import SSL_ROOTS_ENV_VAR
    from callconv.protection.pseudonyms import local_connection

    env = dict(os.environ)
    # The components are started as `airflow ...` by name: this venv's bin comes first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(PROJECT_ROOT / "dags"))
    env.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(PROJECT_ROOT / "plugins"))
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    env.setdefault("AIRFLOW__CORE__PARALLELISM", "4")  # a demo needs few task slots, not 32 worker processes
    env["AIRFLOW__API__PORT"] = str(port)
    env.setdefault("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", f"http://localhost:{port}/execution/")
    # Only the demo day's run: no scheduled run of the day before today beside it.
    env["AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE"] = "False"
    env[f"AIRFLOW_CONN_{settings.warehouse_conn_id.upper()}"] = json.dumps(
        {"conn_type": "generic", "extra": {"sqlalchemy_url": warehouse_url}}
    )
    pseudonym_env = f"AIRFLOW_CONN_{settings.pseudonym_conn_id.upper()}"
    if not env.get(pseudonym_env):  # the demo's keyring, as `make demo` keeps it
        env[pseudonym_env] = local_connection(var_dir / "demo-pseudonym-keyring.json")
    env[SSL_ROOTS_ENV_VAR] = str(sandbox.cert_path)
    env[f"AIRFLOW_CONN_{settings.google_ads_conn_id.upper()}"] = json.dumps(
        {"conn_type": "google_ads", "extra": {"sandbox": True, **sandbox.client_settings()}}
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


def airflow_home(env: dict[str, str]) -> Path:
    return Path(env.get("AIRFLOW_HOME") or "~/airflow").expanduser()


def day_run(api: Api, account: Account, business_date: date) -> str:
    """Creates the run of the account's local day, or clears the one there is; its run id.

    The data interval is given, not inferred: local midnight to local midnight, as the
    scheduler would have made it, with the logical date at its start.
    """
    dag_id = f"call_conversions_import__{account.id}"
    start = datetime.combine(business_date, datetime.min.time(), tzinfo=account.tz)
    end = datetime.combine(business_date + timedelta(days=1), datetime.min.time(), tzinfo=account.tz)
    body = {
        "dag_run_id": f"ui_demo__{business_date.isoformat()}",
        "logical_date": start.isoformat(),
        "data_interval_start": start.isoformat(),
        "data_interval_end": end.isoformat(),
        "note": "make ui-demo: the demo day, run by the scheduler",
    }
    status, answer = api.call("POST", f"/api/v2/dags/{dag_id}/dagRuns", body)
    if status == 200:
        return answer["dag_run_id"]
    if status != 409:
        raise RuntimeError(f"triggering {dag_id} failed ({status}): {answer}")
    # The day has a run already (an earlier `make ui-demo`): run its tasks again.
    when = urllib.parse.quote(start.isoformat())
    path = f"/api/v2/dags/{dag_id}/dagRuns?logical_date_gte={when}&logical_date_lte={when}"
    status, answer = api.call("GET", path)
    if status != 200 or not answer["dag_runs"]:
        raise RuntimeError(f"the run of {business_date} exists but was not found ({status}): {answer}")
    run_id = answer["dag_runs"][0]["dag_run_id"]
    status, answer = api.call("POST", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/clear", {"dry_run": False})
    if status != 200:
        raise RuntimeError(f"clearing run {run_id} failed ({status}): {answer}")
    return run_id


def wait_until(what: str, probe, process: subprocess.Popen, log_path: Path, seconds: int = START_SECONDS):
    """``probe()``'s first truthy answer, polled every 2 s; fails if Airflow exits first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Airflow exited with {process.returncode} before {what}; see {log_path}")
        with contextlib.suppress(OSError, KeyError, ValueError):
            answer = probe()
            if answer:
                return answer
        time.sleep(2)
    raise RuntimeError(f"no {what} within {seconds} s; see {log_path}")


def stop_airflow(process: subprocess.Popen) -> None:
    """As Ctrl-C would: the launcher stops its components and waits; then its group, then stragglers.

    A task's supervisor puts the task in a process group of its own, so any descendant still
    alive at the end is killed by its id.
    """
    import psutil

    descendants: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        descendants = psutil.Process(process.pid).children(recursive=True)
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGINT)
    for sig, seconds in ((None, 60), (signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
        try:
            process.wait(timeout=seconds)
            break
        except subprocess.TimeoutExpired:
            continue
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                child.kill()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_ui(settings: Settings, warehouse_url: str, business_date: date, var_dir: Path, port: int) -> int:
    """Seeds the day, starts the sandboxes and Airflow, runs each account's day, and waits for Ctrl-C."""
    from callconv.demo import report, runnable_accounts, seed_accounts, start_data_manager, start_sandbox_from_warehouse
    from callconv.monitoring.report_queries import import_dag_id
    from callconv.warehouse import create_engine, migrate

    var_dir.mkdir(parents=True, exist_ok=True)
    migrate(warehouse_url)
    engine = create_engine(warehouse_url)
    seed_accounts(engine, settings, business_date)
    accounts = runnable_accounts(settings)
    sandbox, loaded = start_sandbox_from_warehouse(settings, engine, business_date, var_dir / "sandbox")
    print(f"Google Ads sandbox serving on {sandbox.endpoint}, knowing {loaded} forwarded calls from the warehouse")

    log_path = var_dir / "ui-demo-airflow.log"
    # Ctrl-C and SIGTERM stop everything in order, even where the shell started us with SIGINT
    # ignored (a background job); Airflow, started after this, then gets Python's own handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    api = Api(port)
    process: subprocess.Popen | None = None
    dm = None
    code = 0
    try:
        env = airflow_env(settings, warehouse_url, sandbox, port, var_dir)
        dm = start_data_manager(settings, engine, var_dir / "sandbox", env)
        home = airflow_home(env)
        home.mkdir(parents=True, exist_ok=True)
        print(f"Starting Airflow (FAB auth manager) in {home} (its output: {log_path}); the first start takes minutes")
        with open(log_path, "w") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "callconv.local_airflow", "--port", str(port)],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches this command, which then stops Airflow in order
            )
        wait_until("healthy api-server", lambda: _healthy(api), process, log_path)
        password_file = home / PASSWORD_FILE
        password = wait_until("admin password", lambda: password_file.read_text().strip(), process, log_path)
        api.login(password)
        # Every account's run is created up front (the banner links them all), each DAG still
        # paused; the DAGs are then unpaused one at a time, so the runs take turns. The embedded
        # SQLite warehouse has one writer: two matches side by side can meet "database is locked"
        # (a transaction that read, then writes after the other's commit), and a retry waits minutes.
        runs: list[tuple[Account, str, str]] = []
        for account in accounts:
            dag_id = import_dag_id(account.id)
            parsed = functools.partial(_parsed, api, dag_id)
            wait_until(f"DAG {dag_id} parsed", parsed, process, log_path)
            runs.append((account, dag_id, day_run(api, account, business_date)))
        print(_banner(port, password, password_file, runs, business_date), flush=True)
        for account, dag_id, run_id in runs:
            status, answer = api.call("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
            if status != 200:
                raise RuntimeError(f"unpausing {dag_id} failed ({status}): {answer}")
            ended = functools.partial(_ended, api, dag_id, run_id)
            state = wait_until(f"end of run {run_id} of {dag_id}", ended, process, log_path, 3600)
            print(f"Run {run_id} of {dag_id} ended: {state}")
            if state != "success":
                print("Open the run in the UI and read the log of its failed task.")
                code = 1
            print(report(engine, account, business_date, sandbox, dm, state == "success"), flush=True)
        print("Everything keeps running for you to click through; Ctrl-C stops it.", flush=True)
        while process.poll() is None:
            time.sleep(1)
        print(f"Airflow exited with {process.returncode}; see {log_path}")
        code = 1
    except KeyboardInterrupt:
        print("\nStopping Airflow and the sandboxes ...", flush=True)
    except RuntimeError as error:
        print(f"The UI demo could not finish: {error}", flush=True)
        code = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not leave processes behind
            signal.signal(sig, signal.SIG_IGN)
        if process is not None:
            stop_airflow(process)
        accepted = len(sandbox.accepted())
        sandbox.stop()
        received = None
        if dm is not None:
            received = sum(dm.events_received(a) for a in accounts if a.delivery == "data_manager")
            dm.stop()
        engine.dispose()
    told = "" if received is None else f" The Data Manager sandbox received {received} events."
    print(f"Stopped. The sandbox accepted {accepted} conversions.{told}", flush=True)
    return code


def _healthy(api: Api) -> bool:
    status, health = api.call("GET", "/api/v2/monitor/health")
    parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
    return status == 200 and all(health.get(part, {}).get("status") == "healthy" for part in parts)


def _parsed(api: Api, dag_id: str) -> bool:
    return api.call("GET", f"/api/v2/dags/{dag_id}")[0] == 200


def _ended(api: Api, dag_id: str, run_id: str) -> str | None:
    status, run = api.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
    return run["state"] if status == 200 and run["state"] in ("success", "failed") else None


def _banner(port: int, password: str, password_file: Path, runs: list[tuple[Account, str, str]], day: date) -> str:
    from callconv.demo import DELIVERIES

    url = f"http://localhost:{port}"
    listed = "\n".join(
        f"    {account.id}, through {DELIVERIES.get(account.delivery, account.delivery)}: {dag_id}, run {run_id}\n"
        f"      {url}/dags/{dag_id}/runs/{run_id}"
        for account, dag_id, run_id in runs
    )
    tasks = " or ".join(f"{DELIVERY_TASKS[a.delivery]} ({a.id})" for a, _, _ in runs if a.delivery in DELIVERY_TASKS)
    waits = ""
    if any(account.delivery == "data_manager" for account, _, _ in runs):
        waits = (
            "  A Data Manager account's rows end its run in 'processing' (Google answers within 30 minutes to\n"
            "  24 hours); once its run has ended, this command asks requestStatus and settles them as the next\n"
            "  run's first step would, and prints the outcome below.\n"
        )
    return f"""
The Airflow UI is up: {url}
  Log in as admin with password {password} (kept in {password_file}).
  The scheduler runs the demo day {day} of each account, one run each, one after the other:
{listed}
  Then click:
  1. Dags > an account's DAG (call_conversions_import__<account>): the DAG, its graph and its runs.
  2. Its run: each task's state and duration (a minute or two, not days).
  3. A task, e.g. {tasks} > Logs: its real task log (counts and reason codes, no phone numbers).
  4. "Call conversions" in the navigation bar: the plugin page, each account's {day} with its run's link.
{waits}Ctrl-C stops it all.
"""
