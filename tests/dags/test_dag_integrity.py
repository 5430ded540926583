"""Every DAG file imports cleanly, registers DAGs with tags, retries and explicit catchup, and loads nothing heavy.

Nothing is mocked: a DAG file that reads a connection or a Variable at parse
time has no connection to read here, and fails this test.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

DAGS_DIR = Path(__file__).resolve().parents[2] / "dags"
DAG_FILES = sorted(DAGS_DIR.glob("*.py"))
# What a DAG file must not load at parse time: the stages' libraries belong inside tasks.
# phonenumbers is allowed: the config checks each account's region against its region list
# (about 14 ms to import).
HEAVY_PACKAGES = {"pandas", "great_expectations", "grpc", "tink", "googleapiclient", "altair"}
# Checks of the data or of a request: a retry cannot change their answer.
VALIDATION_TASKS = ("take_in_crm_extracts", "plan")


@pytest.fixture(scope="module")
def dag_bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_DIR))


def test_there_are_dag_files():
    assert DAG_FILES, f"no DAG files in {DAGS_DIR}"


def test_no_import_errors(dag_bag):
    assert dag_bag.import_errors == {}


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda p: p.name)
def test_each_file_registers_a_dag(dag_bag, dag_file):
    registered = [dag for dag in dag_bag.dags.values() if Path(dag.fileloc) == dag_file]
    assert registered, f"{dag_file.name} registers no DAG"


def test_dags_have_tags_retries_and_explicit_catchup(dag_bag):
    for dag_id, dag in dag_bag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.doc_md, f"{dag_id} has no doc_md"
        source = ast.parse(Path(dag.fileloc).read_text())
        assert any(isinstance(node, ast.keyword) and node.arg == "catchup" for node in ast.walk(source)), (
            f"{dag_id} leaves catchup to the default"
        )
        for task in dag.tasks:
            name = task.task_id.rsplit(".", 1)[-1]
            if name in VALIDATION_TASKS:
                assert task.retries == 0, f"{dag_id}.{task.task_id}: validation must not retry"
            elif "upload" in name:
                assert task.retries >= 3, f"{dag_id}.{task.task_id}: upload-side tasks need retries"
            else:
                assert task.retries >= 2, f"{dag_id}.{task.task_id} has {task.retries} retries"


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda p: p.name)
def test_parsing_loads_no_heavy_module(dag_file):
    """Parse in a fresh interpreter, after Airflow itself is imported, as the DAG processor does.

    What makes a parse slow is what it loads, so that is what is checked, not the seconds a
    loaded machine happens to take: no module of a heavy package is loaded by the parse,
    whether imported at the top of the DAG file or through anything it imports.
    """
    script = (
        "import json, runpy, sys, airflow.sdk\n"
        "before = set(sys.modules)\n"
        f"runpy.run_path({str(dag_file)!r})\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    heavy = sorted(name for name in loaded if name.split(".")[0] in HEAVY_PACKAGES or name.startswith("google.ads"))
    assert heavy == [], f"parsing {dag_file.name} loads {heavy[:10]}"


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda p: p.name)
def test_no_heavy_imports_at_top_level(dag_file):
    heavy = {"pandas", "great_expectations", "phonenumbers", "google", "sqlalchemy", "grpc"}
    tree = ast.parse(dag_file.read_text())
    for node in tree.body:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in heavy, f"{dag_file.name} imports {name} at parse time"


def test_the_rerun_delivers_one_mapped_day_at_a_time(dag_bag):
    """A rerun maps one task group per (account, day); each delivery sends every due row of its
    account, so two of them at once would race. They take turns; claims cover the rest."""
    dag = dag_bag.dags["call_conversions_rerun"]
    delivery = [
        task for task in dag.tasks if task.task_id.split(".")[-1] in ("upload_conversions", "publish_conversion_file")
    ]
    assert delivery
    assert {task.max_active_tis_per_dagrun for task in delivery} == {1}
