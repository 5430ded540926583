"""What the DAGs show in the UI: descriptions, time zones, the preflight first, one delivery task per
account, labelled mapped days and the rerun's trigger form.

The DAG files are parsed by a real DagBag from a config with two accounts in two zones,
one delivering through the API and one by file. Nothing is mocked.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from types import SimpleNamespace

import jinja2
import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DAGS_DIR = PROJECT_ROOT / "dags"
API, FILE, DM = "oslo_api", "newyork_file", "bergen_dm"
ZONES = {API: "Europe/Oslo", FILE: "America/New_York", DM: "Europe/Oslo"}
API_ROLE = "oslo_team"
DELIVERY_TASKS = {
    "api": "upload_conversions",
    "file": "publish_conversion_file",
    "data_manager": "deliver_through_data_manager",
}


@pytest.fixture(scope="module")
def two_accounts(tmp_path_factory) -> Path:
    raw = yaml.safe_load((PROJECT_ROOT / "config" / "call_conversions.yaml").read_text(encoding="utf-8"))
    template = raw["accounts"][0]
    raw["accounts"] = [
        {**template, "id": API, "timezone": ZONES[API], "delivery": "api", "access_role": API_ROLE},
        {
            **template,
            "id": FILE,
            "timezone": ZONES[FILE],
            "default_region": "US",
            "default_currency": "USD",
            "delivery": "file",
        },
        {**template, "id": DM, "timezone": ZONES[DM], "delivery": "data_manager"},
    ]
    path = tmp_path_factory.mktemp("config") / "call_conversions.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dag_bag(two_accounts):
    from airflow.dag_processing.dagbag import DagBag

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CALL_CONVERSIONS_CONFIG", str(two_accounts))
        bag = DagBag(dag_folder=str(DAGS_DIR))
    assert bag.import_errors == {}
    return bag


def import_dag(dag_bag, account_id):
    return dag_bag.dags[f"call_conversions_import__{account_id}"]


def names(dag) -> set[str]:
    return {task.task_id.rsplit(".", 1)[-1] for task in dag.tasks}


def test_an_accounts_role_is_granted_its_import_dag_and_its_runs_only(dag_bag):
    """What FAB syncs: the role reads and edits the DAG and reads and creates its runs."""
    assert import_dag(dag_bag, API).access_control == {
        API_ROLE: {"DAGs": {"can_read", "can_edit"}, "DAG Runs": {"can_read", "can_create"}}
    }
    assert not import_dag(dag_bag, FILE).access_control


@pytest.mark.parametrize("dag_id", ["call_conversions_rerun", "call_conversions_retention"])
def test_no_account_role_is_granted_a_dag_that_covers_every_account(dag_bag, dag_id):
    """An empty mapping (not None) makes FAB remove DAG-level grants: only global DAG roles see it."""
    assert dag_bag.dags[dag_id].access_control == {}


def test_every_dag_has_a_description_and_a_start_date(dag_bag):
    assert set(dag_bag.dags) == {
        f"call_conversions_import__{API}",
        f"call_conversions_import__{FILE}",
        f"call_conversions_import__{DM}",
        "call_conversions_rerun",
        "call_conversions_retention",
    }
    for dag_id, dag in dag_bag.dags.items():
        assert dag.description and len(dag.description) <= 200, f"{dag_id}: no short description"
        assert dag.start_date is not None, f"{dag_id} has no start_date"


@pytest.mark.parametrize("account_id", [API, FILE])
def test_an_import_dag_is_in_its_accounts_zone(dag_bag, account_id):
    dag = import_dag(dag_bag, account_id)
    assert dag.timezone.name == ZONES[account_id]
    assert str(dag.timetable.timezone) == ZONES[account_id]
    # Local midnight of the first day.
    local = dag.start_date.astimezone(dag.timezone)
    assert (local.hour, local.minute) == (0, 0)
    assert account_id in dag.description and ZONES[account_id] in dag.description


def test_the_rerun_and_retention_dags_say_their_zone(dag_bag):
    # Two zones in the config: the rerun has none of its own, so UTC; retention runs on UTC days.
    assert dag_bag.dags["call_conversions_rerun"].timezone.name == "UTC"
    assert dag_bag.dags["call_conversions_retention"].timezone.name == "UTC"


def test_a_rerun_of_accounts_sharing_a_zone_is_in_that_zone():
    from dags.call_conversions_rerun import _rerun_dag

    dag = _rerun_dag(["a", "b"], {"a": "api", "b": "api"}, "Europe/Oslo")
    assert dag.timezone.name == "Europe/Oslo"


@pytest.mark.parametrize("dag_file", sorted(DAGS_DIR.glob("*.py")), ids=lambda p: p.name)
def test_dag_files_take_airflow_from_the_task_sdk_only(dag_file):
    for node in ast.walk(ast.parse(dag_file.read_text())):
        modules = []
        if isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        for module in modules:
            if module.split(".")[0] == "airflow":
                assert module == "airflow.sdk" or module.startswith("airflow.sdk."), f"{dag_file.name}: {module}"


@pytest.mark.parametrize(("account_id", "delivery"), [(API, "api"), (FILE, "file"), (DM, "data_manager")])
def test_an_import_dag_builds_only_its_accounts_delivery(dag_bag, account_id, delivery):
    dag = import_dag(dag_bag, account_id)
    assert DELIVERY_TASKS[delivery] in names(dag)
    assert not {task for kind, task in DELIVERY_TASKS.items() if kind != delivery} & names(dag)
    deliver = dag.get_task(DELIVERY_TASKS[delivery])
    assert {t.task_id for t in deliver.upstream_list} == {"write_conversion_file"}
    assert {t.task_id for t in deliver.downstream_list} == {"check_anomalies"}


@pytest.mark.parametrize("account_id", [API, FILE, DM])
def test_the_preflight_is_the_first_task_of_every_import_dag(dag_bag, account_id):
    """Nothing of the day's work starts before the set-up is checked, and a failed check stops it all."""
    dag = import_dag(dag_bag, account_id)
    assert {task.task_id for task in dag.roots} == {"preflight"}
    first = dag.get_task("preflight")
    assert first.downstream_task_ids == {"take_in_crm_extracts", "wait_for_call_logs"}
    assert first.get_flat_relative_ids(upstream=False) == set(dag.task_ids) - {"preflight"}
    # An outage is left to Airflow's retries; a set-up problem fails at once (AirflowFailException).
    assert first.retries >= 2


def test_dry_run_is_offered_only_where_it_applies(dag_bag):
    assert set(import_dag(dag_bag, API).params) == {"reimport", "dry_run"}
    assert set(import_dag(dag_bag, FILE).params) == {"reimport"}
    assert set(import_dag(dag_bag, DM).params) == {"reimport", "dry_run"}


def test_every_param_has_a_title(dag_bag):
    for dag_id, dag in dag_bag.dags.items():
        for name, param in dag.params.items():
            assert param.schema.get("title"), f"{dag_id}: param {name} has no title"
            assert param.description, f"{dag_id}: param {name} has no description"


def test_the_rerun_maps_one_group_per_delivery_each_with_its_own_delivery_task(dag_bag):
    dag = dag_bag.dags["call_conversions_rerun"]
    by_group: dict[str, set[str]] = {}
    for task in dag.tasks:
        group, _, name = task.task_id.rpartition(".")
        by_group.setdefault(group, set()).add(name)
    steps = {
        "preflight",
        "take_in_crm_extracts",
        "normalise_call_logs",
        "match_sales",
        "write_conversion_file",
        "check_anomalies",
    }
    assert by_group == {
        "": {"plan", "api_days", "file_days", "dm_days"},
        "api_day": steps | {"upload_conversions"},
        "file_day": steps | {"publish_conversion_file"},
        "dm_day": steps | {"deliver_through_data_manager"},
    }
    upstream = {task_id: dag.get_task(task_id).upstream_task_ids for task_id in dag.task_ids}
    assert upstream["api_day.upload_conversions"] == {"api_days", "api_day.write_conversion_file"}
    assert upstream["file_day.check_anomalies"] == {"file_days", "file_day.publish_conversion_file"}
    assert upstream["dm_day.deliver_through_data_manager"] == {"dm_days", "dm_day.write_conversion_file"}
    assert upstream["dm_day.check_anomalies"] == {"dm_days", "dm_day.deliver_through_data_manager"}
    # The preflight comes first in each day, as in the daily import.
    for group in ("api_day", "file_day", "dm_day"):
        planned = f"{group}s"  # api_days, file_days, dm_days
        assert upstream[f"{group}.preflight"] == {planned}
        for first in ("take_in_crm_extracts", "normalise_call_logs"):
            assert upstream[f"{group}.{first}"] == {planned, f"{group}.preflight"}
    # Each delivery takes turns with the other days of the run.
    for task_id in (
        "api_day.upload_conversions",
        "file_day.publish_conversion_file",
        "dm_day.deliver_through_data_manager",
    ):
        assert dag.get_task(task_id).max_active_tis_per_dagrun == 1


def test_a_rerun_builds_no_group_that_no_account_needs():
    from dags.call_conversions_rerun import _rerun_dag

    dag = _rerun_dag(["a"], {"a": "file"}, "UTC")
    groups = {task.task_id.rpartition(".")[0] for task in dag.tasks}
    assert groups == {"", "file_day"}
    assert "api_days" not in names(dag) and "upload_conversions" not in names(dag)
    assert "dm_days" not in names(dag) and "deliver_through_data_manager" not in names(dag)


def test_each_mapped_day_is_labelled_with_its_account_and_day(dag_bag):
    dag = dag_bag.dags["call_conversions_rerun"]
    mapped = [task for task in dag.tasks if "." in task.task_id]
    assert mapped
    for task in mapped:
        template = task.map_index_template
        assert template, f"{task.task_id} has no map_index_template"
        # Rendered as the task runner does: with the task, whose op_kwargs hold the mapped arguments.
        fake = SimpleNamespace(op_kwargs={"account_id": FILE, "day": "2026-11-01"})
        assert jinja2.Template(template).render(task=fake) == f"{FILE} 2026-11-01"


def test_the_split_keeps_the_plans_order_per_delivery():
    from callconv.rerun import plan_days, split_by_delivery

    plan = plan_days("2026-10-24", "2026-10-25", [FILE, DM, API], [API, FILE, DM])
    split = split_by_delivery(plan, {API: "api", FILE: "file", DM: "data_manager"})
    assert split == {
        "api": [{"account_id": API, "day": "2026-10-24"}, {"account_id": API, "day": "2026-10-25"}],
        "file": [{"account_id": FILE, "day": "2026-10-24"}, {"account_id": FILE, "day": "2026-10-25"}],
        "data_manager": [{"account_id": DM, "day": "2026-10-24"}, {"account_id": DM, "day": "2026-10-25"}],
    }
    assert split_by_delivery([], {API: "api"}) == {"api": [], "file": [], "data_manager": []}


# ------------------------------------------------------------------ the rerun's trigger form


def form(dag, **values):
    """What Airflow does with a trigger's conf: merge it into the Params and validate their schema."""
    merged = copy.deepcopy(dag.params)
    merged.update(values)
    return merged.validate()


def test_accounts_is_a_multi_select_of_the_configured_accounts(dag_bag):
    schema = dag_bag.dags["call_conversions_rerun"].params.get_param("accounts").schema
    # The UI draws an array with "examples" as a multi-select of those values.
    assert schema["type"] == "array"
    assert schema["examples"] == [API, FILE, DM]
    assert schema["items"] == {"type": "string", "enum": [API, FILE, DM]}


GOOD = {"start_date": "2026-03-01", "end_date": "2026-03-01", "accounts": [API]}
# What the README says each one refuses: (its words, the trigger's values, the field named in the refusal).
FORM_REFUSES = [
    ("a missing day", {"accounts": [API]}, "start_date"),
    ("not a real date", {**GOOD, "start_date": "2026-02-30"}, "start_date"),
    ("not a real date", {**GOOD, "end_date": "yesterday"}, "end_date"),
    ("no account", {**GOOD, "accounts": []}, "accounts"),
    ("an account not in the config", {**GOOD, "accounts": ["elsewhere"]}, "accounts"),
    ("one account twice", {**GOOD, "accounts": [API, API]}, "accounts"),
]
PLAN_REFUSES = [
    ("an end before the start", {**GOOD, "start_date": "2026-03-05"}, "before start_date"),
    ("longer than 366 days", {**GOOD, "start_date": "2025-01-01"}, "at most 366 days"),
]


def readme_part(start: str, end: str) -> str:
    text = " ".join((PROJECT_ROOT / "README.md").read_text(encoding="utf-8").split())
    part = text[text.index(start) :]
    return part[: part.index(end)]


def test_the_form_refuses_what_the_readme_says(dag_bag):
    from airflow.sdk.exceptions import ParamValidationError

    said = readme_part("**The form refuses**", "**`plan` refuses**")
    dag = dag_bag.dags["call_conversions_rerun"]
    assert form(dag, **GOOD)["accounts"] == [API]
    for words, values, field in FORM_REFUSES:
        assert words in said, f"the README does not say the form refuses {words}"
        with pytest.raises(ParamValidationError, match=field):
            form(dag, **values)


def test_plan_refuses_what_the_readme_says_and_the_form_lets_through(dag_bag):
    from callconv.rerun import RerunRequestError, plan_days

    said = readme_part("**`plan` refuses**", "- Each (account, day)")
    dag = dag_bag.dags["call_conversions_rerun"]
    for words, values, refusal in PLAN_REFUSES:
        assert words in said, f"the README does not say plan refuses {words}"
        checked = form(dag, **values)  # the form lets it through
        with pytest.raises(RerunRequestError, match=refusal):
            plan_days(checked["start_date"], checked["end_date"], checked["accounts"], [API, FILE])
