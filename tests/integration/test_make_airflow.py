"""``make airflow``, run as a new user runs it: the UI comes up under FAB, a login works, the DAGs are listed.

The test runs the Makefile's own ``airflow`` target (so a change to the Makefile is what is
tested) with a shell a new user has: no virtualenv activated, no ``airflow`` anywhere on
``PATH``. The components are started as ``airflow ...`` by name, so a target that does not put
the venv's ``bin`` on ``PATH`` never serves the UI. The auth manager is FAB's (standalone would
force the simple one): the admin's password comes from the Airflow home, and a wrong one is refused.

Everything runs in a temporary Airflow home with SQLite, on a free port given by
``AIRFLOW__API__PORT``, with a warehouse of its own. The venv is the one running the tests,
and it is never reinstalled (``make -o``). The process group is killed at the end, whatever
happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from airflow_cli import PROJECT, free_port, stop

pytestmark = pytest.mark.integration

# Migrating a fresh SQLite metadata DB and starting four components takes a minute or two
# on a loaded 2-core machine; this is a bound on waiting, not a timing assertion.
START_SECONDS = 240
PROJECT_DAGS = {
    "call_conversions_import__nordic_plumbing",
    "call_conversions_import__svea_heat_pumps",
    "call_conversions_rerun",
    "call_conversions_retention",
}
COMPONENTS = ("metadatabase", "scheduler", "triggerer", "dag_processor")
NO_AIRFLOW_ON_PATH = "No such file or directory: 'airflow'"
TEAM_ROLE = "plumbing_team"


def new_user_environment(port: int) -> dict[str, str]:
    """This process's environment less any Airflow setting, and a PATH on which no ``airflow`` is found."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AIRFLOW", "_AIRFLOW", "MAKE", "MFLAGS")) and key != "CALL_CONVERSIONS_CONFIG"
    }
    folders = [folder for folder in env.get("PATH", "").split(os.pathsep) if folder]
    env["PATH"] = os.pathsep.join(folder for folder in folders if not shutil.which("airflow", path=folder))
    assert shutil.which("airflow", path=env["PATH"]) is None
    env["AIRFLOW__API__PORT"] = str(port)
    env["PYTHONUNBUFFERED"] = "1"  # the log shows each line when it is printed
    return env


def api(port: int, method: str, path: str, token: str | None = None, body: dict | None = None):
    """(status, parsed JSON or text) of one request to the api-server."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if body is not None:
            headers["Content-Type"] = "application/json"
        connection.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        response = connection.getresponse()
        text = response.read().decode(errors="replace")
    finally:
        connection.close()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, text


class Startup:
    """Waits on the running ``make airflow`` (or ``name``) within one deadline, failing early if it cannot come up."""

    def __init__(self, process: subprocess.Popen, log_path: Path, seconds: int, name: str = "make airflow"):
        self.process, self.log_path, self.name = process, log_path, name
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def until(self, what: str, probe):
        """``probe()``'s first truthy answer, polled every 2 s; connection errors count as not yet."""
        last = None
        while time.monotonic() < self.deadline:
            if self.process.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.process.returncode} before {what}:\n{self.log_tail()}")
            if NO_AIRFLOW_ON_PATH in self.log_path.read_text(errors="replace"):
                pytest.fail(f"{self.name} could not start Airflow's components by name ('airflow'):\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                last = probe()
                if last:
                    return last
            time.sleep(2)
        pytest.fail(f"no {what} within {self.seconds} s of {self.name} (last answer: {last!r}):\n{self.log_tail()}")


def make_command(target: str, home: Path, warehouse_url: str, *variables: str) -> list[str]:
    """``make <target>`` in this project with the venv running the tests (never reinstalled), an
    Airflow home and a warehouse of the test's own; ``variables`` are more ``NAME=value``."""
    venv = Path(sys.prefix)
    assert (venv / "bin" / "airflow").is_file(), f"the tests must run from a venv with Airflow, not {venv}"
    return [
        "make",
        "--no-print-directory",
        "-C",
        str(PROJECT),
        "-o",
        str(venv / ".installed"),
        target,
        f"VENV={venv}",
        f"AIRFLOW_HOME={home}",
        f"CALL_CONVERSIONS_WAREHOUSE_URL={warehouse_url}",
        *variables,
    ]


def test_make_airflow_serves_a_healthy_ui_with_login_and_the_project_dags(tmp_path):
    port = free_port()
    home = tmp_path / "airflow-home"
    command = make_command("airflow", home, f"sqlite:///{tmp_path / 'warehouse.db'}")
    # The project's config, with a team role on its account: make airflow creates the role.
    config = yaml.safe_load((PROJECT / "config" / "call_conversions.yaml").read_text(encoding="utf-8"))
    config["accounts"][0]["access_role"] = TEAM_ROLE
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    env = new_user_environment(port)
    env["CALL_CONVERSIONS_CONFIG"] = str(tmp_path / "config.yaml")
    log_path = tmp_path / "make-airflow.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        startup = Startup(process, log_path, START_SECONDS)

        def healthy():
            status, health = api(port, "GET", "/api/v2/monitor/health")
            if status == 200 and all(health.get(part, {}).get("status") == "healthy" for part in COMPONENTS):
                return health
            return None

        health = startup.until("healthy /api/v2/monitor/health", healthy)
        assert {part: health[part]["status"] for part in COMPONENTS} == dict.fromkeys(COMPONENTS, "healthy")

        # The FAB admin's password, generated once into the Airflow home and printed at start.
        password_file = home / "admin-password"
        password = startup.until("admin password file", lambda: password_file.read_text().strip())
        assert oct(password_file.stat().st_mode & 0o777) == "0o600"
        assert password in log_path.read_text(errors="replace")
        assert "Forcing auth manager" not in log_path.read_text(errors="replace")
        status, _ = api(port, "POST", "/auth/token", body={"username": "admin", "password": password + "x"})
        assert status == 401
        status, answer = api(port, "POST", "/auth/token", body={"username": "admin", "password": password})
        assert status == 201, answer
        token = answer["access_token"]

        assert api(port, "GET", "/api/v2/dags")[0] == 401

        def project_dags():
            status, answer = api(port, "GET", "/api/v2/dags?limit=100", token=token)
            assert status == 200, answer
            found = {dag["dag_id"] for dag in answer["dags"]}
            return found if PROJECT_DAGS <= found else None

        dag_ids = startup.until("listing of the project's DAGs", project_dags)
        assert PROJECT_DAGS <= dag_ids
        status, errors = api(port, "GET", "/api/v2/importErrors", token=token)
        assert (status, errors["total_entries"]) == (200, 0), errors

        # The account's role: its DAG through access_control, the pages' global reads, no global DAG access.
        status, role = api(port, "GET", f"/auth/fab/v1/roles/{TEAM_ROLE}", token=token)
        assert status == 200, role
        granted = {(item["action"]["name"], item["resource"]["name"]) for item in role["actions"]}
        assert ("can_read", "DAG:call_conversions_import__nordic_plumbing") in granted, granted
        assert ("can_read", "DAG:call_conversions_import__svea_heat_pumps") not in granted  # the other account's
        assert {("can_read", "Task Logs"), ("can_read", "XComs")} <= granted
        assert ("can_read", "DAGs") not in granted and ("can_edit", "DAGs") not in granted
    finally:
        stop([process])
    assert NO_AIRFLOW_ON_PATH not in log_path.read_text(errors="replace")
