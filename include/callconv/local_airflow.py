"""Airflow on one machine with the FAB auth manager: what ``make airflow`` runs.

Why not ``airflow standalone``
    In Airflow 3.3, standalone sets ``AIRFLOW__CORE__AUTH_MANAGER`` to the simple auth
    manager itself, whatever the config says. Under it every user is an admin, so an
    account's ``access_role`` and its DAG's ``access_control`` mean nothing: a place where
    access rules cannot be tried. This starts the same four components standalone starts
    (api-server, scheduler, dag-processor, triggerer) under the FAB auth manager, which is
    what docker compose and production run.

What it prepares, each step idempotent
    1. ``airflow db migrate`` (FAB's tables included);
    2. an ``Admin`` user ``admin`` whose password is generated once and kept in
       ``$AIRFLOW_HOME/admin-password`` (mode 600); it is printed at start;
    3. each account's ``access_role`` from the config, with the global permissions a DAG's
       own pages need and no global DAG permission (the README's "Per-account access");
    4. the DAGs serialized and their ``access_control`` synced into the roles.

The components run in this process's session; Ctrl-C or SIGTERM stops them all.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

FAB_AUTH_MANAGER = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
ADMIN_USER = "admin"
# What an account role needs beyond its DAG's access_control to open the DAG's pages.
ACCOUNT_ROLE_RESOURCES = (
    "DAG Runs", "Task Instances", "Task Logs", "XComs", "HITL Detail", "DAG Versions", "DAG Warnings", "Plugins",
    "Website",
)  # fmt: skip


def airflow_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment every component and CLI call gets: FAB, and the airflow on PATH first."""
    env = dict(os.environ if base is None else base)
    env["AIRFLOW__CORE__AUTH_MANAGER"] = FAB_AUTH_MANAGER
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, *[p for p in env.get("PATH", "").split(os.pathsep) if p]])
    return env


def _airflow(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    airflow = shutil.which("airflow", path=env["PATH"])
    if airflow is None:
        raise SystemExit(f"no 'airflow' on PATH next to {sys.executable}; run `make install` first")
    result = subprocess.run([airflow, *args], env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
        raise SystemExit(f"airflow {' '.join(args[:2])} failed:\n" + "\n".join(tail))
    return result


def admin_password(home: Path) -> tuple[str, bool]:
    """The admin password kept in the Airflow home, made on first use; (password, made now)."""
    path = home / "admin-password"
    if path.is_file():
        return path.read_text().strip(), False
    home.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(12)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    return password, True


def account_roles() -> list[str]:
    """The configured accounts' ``access_role`` values, without repeats; none without a config."""
    try:
        from callconv.config import load_settings
    except ImportError:  # pragma: no cover - the package is always importable here
        return []
    try:
        settings = load_settings()
    except Exception as error:  # noqa: BLE001 - the DAGs report a broken config as an import error
        log.warning("no account roles made: the config could not be read (%s)", type(error).__name__)
        return []
    return sorted({account.access_role for account in settings.accounts if account.access_role})


def prepare(env: dict[str, str], home: Path) -> str:
    """Migrate, make the admin user and the account roles, sync DAG permissions; the admin password."""
    _airflow(env, "db", "migrate")
    password, made = admin_password(home)
    if made:
        _airflow(
            # "--password=…" in one word: a generated password may start with "-", which
            # argparse would take for an option in a word of its own.
            env, "users", "create", "--role", "Admin", "--username", ADMIN_USER, f"--password={password}",
            "--firstname", "Admin", "--lastname", "User", "--email", "admin@example.invalid",
        )  # fmt: skip
    existing = set(_airflow(env, "roles", "list", "--output", "plain").stdout.split())
    for role in account_roles():
        if role not in existing:
            _airflow(env, "roles", "create", role)
        _airflow(env, "roles", "add-perms", role, "--resource", *ACCOUNT_ROLE_RESOURCES, "--action", "can_read")
    _airflow(env, "dags", "reserialize")
    _airflow(env, "sync-perm", "--include-dags")
    return password


def run(port: int) -> int:
    """Prepare, start the four components, print how to log in, and wait until stopped."""
    env = airflow_environment()
    env["AIRFLOW__API__PORT"] = str(port)
    env.setdefault("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", f"http://localhost:{port}/execution/")
    env.setdefault("AIRFLOW__CORE__EXECUTOR", "LocalExecutor")
    home = Path(env.get("AIRFLOW_HOME") or Path.home() / "airflow")
    password = prepare(env, home)
    airflow = shutil.which("airflow", path=env["PATH"])
    processes = {name: subprocess.Popen([airflow, name], env=env) for name in COMPONENTS}
    print(
        f"\nAirflow (FAB auth manager) at http://localhost:{port}\n"
        f"  login: {ADMIN_USER} / {password}   (kept in {home / 'admin-password'})\n"
        "  Ctrl-C stops every component.\n",
        flush=True,
    )
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    while not stopping:
        for name, process in processes.items():
            if process.poll() is not None:
                print(f"airflow {name} exited with {process.returncode}; stopping the others", flush=True)
                status, stopping = 1, True
                break
        time.sleep(1)
    for process in processes.values():
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + 30
    for process in processes.values():
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m callconv.local_airflow", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("AIRFLOW__API__PORT", "8080")))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(args.port)


if __name__ == "__main__":
    sys.exit(main())
