"""Any worker can run any task: tasks hand over data through the warehouse and storage, not local disk.

The only XCom a task consumes is the rerun DAG's plan of (account, day) pairs, and
its split by delivery (api_days, file_days, dm_days); everything else flows through the warehouse.
Paths never travel between tasks.
"""

from __future__ import annotations

from pathlib import Path

import pytest

DAGS_DIR = Path(__file__).resolve().parents[2] / "dags"
ALLOWED_XCOM_PRODUCERS = {
    ("call_conversions_rerun", "plan"),
    ("call_conversions_rerun", "api_days"),
    ("call_conversions_rerun", "file_days"),
    ("call_conversions_rerun", "dm_days"),
}


@pytest.fixture(scope="module")
def dag_bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_DIR))


def xcom_producers(task) -> set[str]:
    """Task ids whose return value this task takes as an argument."""
    from airflow.sdk.definitions.xcom_arg import XComArg

    producers = set()
    values = [getattr(task, "op_args", ()), getattr(task, "op_kwargs", {})]
    expand_input = getattr(task, "expand_input", None)
    if expand_input is not None:
        values.append(getattr(expand_input, "value", None))
    for value in values:
        for ref in XComArg.iter_xcom_references(value):
            producers.add(ref[0].task_id)
    return producers


def test_only_the_rerun_plan_is_passed_between_tasks(dag_bag):
    consumed = {
        (dag_id, producer)
        for dag_id, dag in dag_bag.dags.items()
        for task in dag.tasks
        for producer in xcom_producers(task)
    }
    assert ("call_conversions_rerun", "plan") in consumed
    assert consumed <= ALLOWED_XCOM_PRODUCERS


def test_the_plan_carries_only_account_ids_and_dates():
    from callconv.rerun import plan_days

    plan = plan_days("2026-01-01", "2026-12-31", ["a", "b"], ["a", "b"])
    for item in plan:
        assert set(item) == {"account_id", "day"}
        assert "/" not in item["account_id"] and len(item["day"]) == 10
    # A whole year for two accounts stays a small XCom.
    assert len(str(plan)) < 64_000
