"""Issue 13, hole 7: Airflow's own stores forget a run's debug data under the warehouse's rule.

A real rerun of an old day and one of a recent day, then the real retention DAG: the old run's
XComs, rendered template fields, conf and task-log folder are gone; the recent run's are not,
and neither is another DAG's log folder.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from test_rerun_dag import ACCOUNT, DAYS, rerun, three_days  # noqa: F401

from callconv.protection.airflow_stores import dag_run, rendered, xcom

pytestmark = pytest.mark.integration

OLD, RECENT = DAYS[0], DAYS[2]
AS_OF = RECENT + timedelta(days=90)  # OLD is 92 days old, RECENT 90: kept while age <= 90


def stores(engine, log_folder: Path, run_id: str) -> dict:
    with engine.connect() as connection:
        where = lambda table: sa.and_(table.c.dag_id == "call_conversions_rerun", table.c.run_id == run_id)  # noqa: E731
        return {
            "xcom": connection.scalar(sa.select(sa.func.count()).select_from(xcom).where(where(xcom))),
            "rendered": connection.scalar(sa.select(sa.func.count()).select_from(rendered).where(where(rendered))),
            "conf": connection.scalar(sa.select(dag_run.c.conf).where(where(dag_run))),
            "logs": (log_folder / "dag_id=call_conversions_rerun" / f"run_id={run_id}").exists(),
        }


def test_an_expired_runs_debug_data_leaves_every_airflow_store(three_days, warehouse, monkeypatch):  # noqa: F811
    from airflow.configuration import conf

    monkeypatch.setenv("AIRFLOW_CONN_CALL_CONVERSIONS_HMAC", json.dumps({"conn_type": "generic", "password": "k" * 24}))
    metadata = sa.create_engine(conf.get("database", "sql_alchemy_conn"))
    log_folder = Path(conf.get("logging", "base_log_folder"))
    old = rerun({"start_date": str(OLD), "end_date": str(OLD), "accounts": [ACCOUNT]})
    recent = rerun({"start_date": str(RECENT), "end_date": str(RECENT), "accounts": [ACCOUNT]})
    assert old.state == recent.state == "success"
    other = log_folder / "dag_id=someone_elses_dag" / "run_id=manual__1"
    other.mkdir(parents=True, exist_ok=True)
    (other / "attempt=1.log").write_text("not ours")

    # dag.test() logs to the console; a worker writes one file per try under the configured
    # template (Airflow's default, checked here), so those files are laid out as a worker would.
    assert conf.get("logging", "log_filename_template").startswith("dag_id={{ ti.dag_id }}/run_id={{ ti.run_id }}/")
    for run in (old, recent):
        for ti in run.get_task_instances():
            folder = log_folder / f"dag_id={ti.dag_id}" / f"run_id={ti.run_id}" / f"task_id={ti.task_id}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "attempt=1.log").write_text(f"{ACCOUNT} {ti.task_id}")

    before = stores(metadata, log_folder, old.run_id)
    # What each store holds for a real run (recorded in the README's data-protection section).
    assert before["xcom"] > 0 and before["rendered"] > 0 and before["conf"]["accounts"] == [ACCOUNT]
    assert before["logs"]
    recent_before = stores(metadata, log_folder, recent.run_id)

    from dags.call_conversions_retention import call_conversions_retention

    dag = call_conversions_retention()
    for task in dag.tasks:
        task.retries = 0
    retention = dag.test(logical_date=datetime.combine(AS_OF, datetime.min.time(), tzinfo=UTC))
    assert retention.state == "success"

    after = stores(metadata, log_folder, old.run_id)
    assert after == {"xcom": 0, "rendered": 0, "conf": {}, "logs": False}
    assert stores(metadata, log_folder, recent.run_id) == recent_before
    assert (other / "attempt=1.log").read_text() == "not ours"

    again = dag.test(logical_date=datetime.combine(AS_OF, datetime.min.time(), tzinfo=UTC) + timedelta(hours=1))
    assert again.state == "success"
    assert stores(metadata, log_folder, old.run_id) == after
    metadata.dispose()
