"""Per-account access, proven on a real api-server with the FAB auth manager.

An account's import DAG carries ``access_control`` for the account's ``access_role``; the
shared rerun and retention DAGs carry ``access_control={}``; the call-conversions page shows
only the accounts whose runs the user may read. Grants in the DAG files prove nothing until the
auth manager refuses a request, so this test sets an Airflow up as the README tells an operator
to: roles made with the README's global permissions, the DAGs parsed (which applies
``access_control``), one user per role, and ``airflow api-server`` on a free port with the
project's plugin. Each account has a run with a task instance, an XCom and a log file, written
straight into the metadata DB and the log folder (no pipeline runs: cheap, and all the API
reads).

Each user logs in through FAB's own token endpoint and must then be refused the other account
(403, 404 or an empty list) on the DAG, its runs, its task instances, the task log, the XComs,
a trigger, the page and the page's ``?account=``, while reading its own account on each of them,
so a test that refuses everything would fail too. Both users are refused the rerun and
retention DAGs.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest
import sqlalchemy as sa
import yaml
from airflow_cli import PROJECT, airflow, airflow_env, background, free_port, metadata_url, wait_for_port
from test_ui_page import request

from callconv.local_airflow import ACCOUNT_ROLE_RESOURCES, FAB_AUTH_MANAGER

pytestmark = pytest.mark.integration

WAREHOUSE_CONN_ID = "call_conversions_warehouse"
# The global permissions the README's "Per-account access" gives an account's role, and
# make airflow gives each configured access_role: one list, so the tested one is the shipped one.
ROLE_RESOURCES = ACCOUNT_ROLE_RESOURCES
# account: (role, user, password)
ACCOUNTS = {
    "north_shop": ("north_team", "north_user", "north-password"),
    "south_shop": ("south_team", "south_user", "south-password"),
}
SHARED_DAGS = ("call_conversions_rerun", "call_conversions_retention")
RUN_ID = "manual__access_test"
LOGICAL_DATE = "2026-11-20T23:00:00+00:00"
TASK_ID = "take_in_crm_extracts"


def dag_id(account: str) -> str:
    return f"call_conversions_import__{account}"


def log_marker(account: str) -> str:
    return f"log line of {account}"


def xcom_marker(account: str) -> str:
    return f"xcom of {account}"


def write_config(path: Path) -> Path:
    """The project's config with our two accounts, each with its own role."""
    raw = yaml.safe_load((PROJECT / "config" / "call_conversions.yaml").read_text(encoding="utf-8"))
    template = raw["accounts"][0]
    raw["warehouse_conn_id"] = WAREHOUSE_CONN_ID
    raw["accounts"] = [{**template, "id": account, "access_role": role} for account, (role, _, _) in ACCOUNTS.items()]
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def seed_task_data(env: dict, account: str) -> None:
    """The run's first task finished, with an XCom and a log file, as a real try would leave them."""
    engine = sa.create_engine(metadata_url(env), poolclass=sa.pool.NullPool)
    keys = {"dag_id": dag_id(account), "run_id": RUN_ID, "task_id": TASK_ID}
    try:
        with engine.begin() as connection:
            updated = connection.execute(
                sa.text(
                    "update task_instance set state = 'success', try_number = 1, hostname = 'localhost'"
                    " where dag_id = :dag_id and run_id = :run_id and task_id = :task_id and map_index = -1"
                ),
                keys,
            )
            assert updated.rowcount == 1, f"the triggered run of {account} has no {TASK_ID} task instance"
            connection.execute(
                sa.text("update dag_run set state = 'success' where dag_id = :dag_id and run_id = :run_id"), keys
            )
            connection.execute(
                sa.text(
                    "insert into xcom (dag_run_id, task_id, map_index, key, dag_id, run_id, value, timestamp)"
                    " select id, :task_id, -1, 'return_value', dag_id, run_id, :value, '2026-11-21 00:30:00'"
                    " from dag_run where dag_id = :dag_id and run_id = :run_id"
                ),
                {**keys, "value": json.dumps({"marker": xcom_marker(account)})},
            )
    finally:
        engine.dispose()
    log_file = Path(env["AIRFLOW_HOME"]) / "logs" / f"dag_id={dag_id(account)}" / f"run_id={RUN_ID}"
    log_file = log_file / f"task_id={TASK_ID}" / "attempt=1.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    line = {"timestamp": "2026-11-21T00:30:00Z", "level": "info", "event": log_marker(account)}
    log_file.write_text(json.dumps(line) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def access_server(pg_schema_url, tmp_path_factory):
    """The api-server, and each account's user's Bearer headers: ``(port, {account: headers})``."""
    home = tmp_path_factory.mktemp("access")
    port = free_port()
    env = airflow_env(
        home,
        port,
        "LocalExecutor",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow' / 'airflow.db'}",
        AIRFLOW__CORE__PLUGINS_FOLDER=str(PROJECT / "plugins"),
        AIRFLOW__CORE__AUTH_MANAGER=FAB_AUTH_MANAGER,
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
        AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{port}",
        AIRFLOW__API__SECRET_KEY="secret-key-for-the-access-test-only",
        CALL_CONVERSIONS_CONFIG=str(write_config(home / "call_conversions.yaml")),
    )
    # The warehouse as an environment connection: it wins over one in the metadata DB, and so
    # over whatever the caller's environment (make test exports the demo's) names.
    env[f"AIRFLOW_CONN_{WAREHOUSE_CONN_ID.upper()}"] = json.dumps(
        {"conn_type": "generic", "extra": {"sqlalchemy_url": pg_schema_url}}
    )
    roles = [role for role, _, _ in ACCOUNTS.values()]
    airflow(env, "db", "migrate")
    # The README's steps: the roles first (access_control may name no unknown role), then the DAGs.
    airflow(env, "roles", "create", *roles)
    airflow(env, "roles", "add-perms", *roles, "-r", *ROLE_RESOURCES, "-a", "can_read")
    airflow(env, "dags", "reserialize")
    for role, user, password in ACCOUNTS.values():
        airflow(
            env,
            "users",
            "create",
            "-u",
            user,
            "-p",
            password,
            "-r",
            role,
            "-f",
            user,
            "-l",
            "test",
            "-e",
            f"{user}@example.com",
        )
    logs = home / "logs"
    with background(env, logs, {"api-server": ["api-server", "--host", "127.0.0.1", "--port", str(port)]}) as procs:
        wait_for_port(port, procs, logs)
        headers = {}
        for account, (_, user, password) in ACCOUNTS.items():
            status, _, text = request("POST", port, "/auth/token", body={"username": user, "password": password})
            assert status == 201, f"FAB's POST /auth/token for {user} answered {status}: {text[:300]}"
            headers[account] = {"Authorization": f"Bearer {json.loads(text)['access_token']}"}
            # The account's own team triggers its run: the grant of "DAG Runs" can_create at work.
            status, _, text = request(
                "POST",
                port,
                f"/api/v2/dags/{dag_id(account)}/dagRuns",
                headers=headers[account],
                body={"dag_run_id": RUN_ID, "logical_date": LOGICAL_DATE, "conf": {}},
            )
            assert status == 200, f"{user} triggering {dag_id(account)} answered {status}: {text[:300]}"
            seed_task_data(env, account)
        yield port, headers


def backfill_dry_run(port: int, headers: dict, dag: str):
    """What a backfill redoing the run's day would run; nothing is created."""
    body = {
        "dag_id": dag,
        "from_date": "2026-11-20T00:00:00+00:00",
        "to_date": "2026-11-21T00:00:00+00:00",
        "reprocess_behavior": "completed",
    }
    return request("POST", port, "/api/v2/backfills/dry_run", headers=headers, body=body)


def other(account: str) -> str:
    return next(name for name in ACCOUNTS if name != account)


def task_path(account: str) -> str:
    return f"/api/v2/dags/{dag_id(account)}/dagRuns/{RUN_ID}/taskInstances/{TASK_ID}"


def get(port: int, headers: dict, path: str, **extra_headers: str):
    return request("GET", port, path, headers={**headers, **extra_headers})


@pytest.mark.parametrize("account", list(ACCOUNTS))
def test_a_user_reads_its_own_account(access_server, account):
    port, headers = access_server
    mine = headers[account]

    # The DAG, and what the Airflow UI reads for its pages.
    for path in (
        f"/api/v2/dags/{dag_id(account)}",
        f"/api/v2/dags/{dag_id(account)}/details",
        f"/api/v2/dags/{dag_id(account)}/tasks",
        f"/api/v2/dags/{dag_id(account)}/dagVersions",
        f"/ui/grid/structure/{dag_id(account)}",
        f"/ui/grid/runs/{dag_id(account)}",
        f"/ui/dags/{dag_id(account)}/latest_run",
    ):
        status, _, text = get(port, mine, path)
        assert status == 200, f"{account}'s user got {path}: {status} {text[:300]}"
    status, _, text = get(port, mine, f"/api/v2/dags/{dag_id(account)}/dagRuns")
    assert status == 200 and [run["dag_run_id"] for run in json.loads(text)["dag_runs"]] == [RUN_ID], text[:300]
    status, _, text = get(port, mine, f"/api/v2/dags/{dag_id(account)}/dagRuns/{RUN_ID}/taskInstances")
    assert status == 200 and TASK_ID in {ti["task_id"] for ti in json.loads(text)["task_instances"]}, text[:300]
    status, _, text = get(port, mine, f"{task_path(account)}/logs/1", Accept="application/json")
    assert status == 200 and log_marker(account) in text, text[:500]
    status, _, text = get(port, mine, f"{task_path(account)}/xcomEntries/return_value")
    assert status == 200 and json.loads(text)["value"] == {"marker": xcom_marker(account)}, text[:300]

    # The README's way for a team to redo a day already run: a backfill of its own DAG.
    status, _, text = backfill_dry_run(port, mine, dag_id(account))
    assert status == 200, f"{account}'s backfill dry run: {status} {text[:300]}"
    assert [run["logical_date"] for run in json.loads(text)["backfills"]] == [LOGICAL_DATE.replace("+00:00", "Z")]

    # The UI puts the page on its navigation bar from the plugins' external views.
    status, _, text = get(port, mine, "/api/v2/plugins")
    assert status == 200, f"{account}'s user got /api/v2/plugins: {status} {text[:300]}"
    views = {view["url_route"] for plugin in json.loads(text)["plugins"] for view in plugin["external_views"]}
    assert "call-conversions" in views
    for query in ("", f"?account={account}"):
        status, _, text = get(port, mine, f"/call-conversions/{query}", Accept="text/html")
        assert status == 200, f"the page{query} answered {status}: {text[:500]}"
        assert dag_id(account) in text


@pytest.mark.parametrize("account", list(ACCOUNTS))
def test_a_user_is_refused_the_other_account(access_server, account):
    port, headers = access_server
    mine, theirs = headers[account], other(account)

    their_dag, their_run = dag_id(theirs), f"/api/v2/dags/{dag_id(theirs)}/dagRuns/{RUN_ID}"
    refused = [
        f"/api/v2/dags/{their_dag}",
        f"/api/v2/dags/{their_dag}/details",
        f"/api/v2/dags/{their_dag}/tasks",
        f"/api/v2/dags/{their_dag}/dagVersions",
        f"/api/v2/dagSources/{their_dag}",
        f"/api/v2/dags/{their_dag}/dagRuns",
        their_run,
        f"{their_run}/taskInstances",
        task_path(theirs),
        f"{task_path(theirs)}/tries",
        f"{task_path(theirs)}/logs/1",
        f"{task_path(theirs)}/xcomEntries",
        f"{task_path(theirs)}/xcomEntries/return_value",
        # What the Airflow UI itself reads for a DAG's pages.
        f"/ui/grid/structure/{their_dag}",
        f"/ui/grid/runs/{their_dag}",
        f"/ui/grid/ti_summaries/{their_dag}?run_ids={RUN_ID}",
        f"/ui/structure/structure_data?dag_id={their_dag}",
        f"/ui/calendar/{their_dag}",
        f"/ui/dags/{their_dag}/latest_run",
        f"/ui/gantt/{their_dag}/{RUN_ID}",
        f"/ui/dags/{their_dag}/dagRuns/{RUN_ID}/stats",
    ]
    answers = {path: get(port, mine, path) for path in refused}
    leaks = {path: (status, text[:200]) for path, (status, _, text) in answers.items() if status != 403}
    assert not leaks, f"{account}'s user was not refused (403) on {theirs}: {leaks}"
    status, _, text = request(
        "POST",
        port,
        f"/api/v2/dags/{dag_id(theirs)}/dagRuns",
        headers=mine,
        body={"dag_run_id": "manual__intruder", "logical_date": "2026-11-21T23:00:00+00:00", "conf": {}},
    )
    assert status == 403, f"{account}'s user triggered {dag_id(theirs)}: {status} {text[:300]}"
    status, _, text = backfill_dry_run(port, mine, dag_id(theirs))
    assert status == 403, f"{account}'s user may backfill {dag_id(theirs)}: {status} {text[:300]}"
    for method, path, body in (
        ("PATCH", f"/api/v2/dags/{their_dag}", {"is_paused": False}),
        ("POST", f"/api/v2/dags/{their_dag}/clearTaskInstances", {"dry_run": True, "dag_run_id": RUN_ID}),
        ("PATCH", f"{task_path(theirs)}", {"new_state": "failed"}),
    ):
        status, _, text = request(method, port, path, headers=mine, body=body)
        assert status == 403, f"{account}'s user may {method} {path}: {status} {text[:300]}"

    # The lists across DAGs hold the user's own account only.
    for path, key in (
        ("/api/v2/dags", "dags"),
        ("/ui/dags", "dags"),
        ("/api/v2/dags/~/dagRuns", "dag_runs"),
        ("/api/v2/dags/~/dagRuns/~/taskInstances", "task_instances"),
        ("/api/v2/dags/~/dagRuns/~/taskInstances/~/xcomEntries", "xcom_entries"),
        ("/api/v2/dags/~/dagVersions", "dag_versions"),
    ):
        status, _, text = get(port, mine, path)
        assert status == 200, f"{account}'s user got {path}: {status} {text[:300]}"
        listed = {entry["dag_id"] for entry in json.loads(text)[key]}
        assert listed == {dag_id(account)}, f"{path} lists {listed} to {account}'s user"

    status, _, text = get(port, mine, "/call-conversions/", Accept="text/html")
    assert status == 200 and theirs not in text, f"the page shows {theirs} to {account}'s user"
    status, _, text = get(port, mine, f"/call-conversions/?account={quote(theirs)}", Accept="text/html")
    assert status == 404 and theirs not in text, f"the page's ?account={theirs}: {status} {text[:300]}"


@pytest.mark.parametrize("account", list(ACCOUNTS))
def test_the_shared_dags_are_refused_to_account_users(access_server, account):
    port, headers = access_server
    for shared in SHARED_DAGS:
        for path in (f"/api/v2/dags/{shared}", f"/api/v2/dags/{shared}/dagRuns"):
            status, _, text = get(port, headers[account], path)
            assert status == 403, f"{account}'s user got {path}: {status} {text[:300]}"
        status, _, text = request(
            "POST", port, f"/api/v2/dags/{shared}/dagRuns", headers=headers[account], body={"logical_date": None}
        )
        assert status == 403, f"{account}'s user triggered {shared}: {status} {text[:300]}"
