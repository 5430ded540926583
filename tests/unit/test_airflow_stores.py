"""Which runs lose their debug data: per account, by the day a run covers, only our DAGs."""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from callconv.protection.airflow_stores import _meta, dag_run, expired_runs, purge_runs

OSLO = ZoneInfo("Europe/Oslo")


def test_only_the_accounts_own_runs_up_to_the_cutoff_are_picked_and_purged_once(tmp_path):
    engine = sa.create_engine("sqlite://")
    _meta.create_all(engine)
    runs = [
        # Oslo's 2026-08-01 starts at 22:00 UTC the day before: past a cutoff of 2026-08-01.
        ("call_conversions_import__acme", "old", datetime(2026, 7, 31, 22, tzinfo=UTC), None),
        ("call_conversions_import__acme", "young", datetime(2026, 8, 1, 22, tzinfo=UTC), None),
        ("call_conversions_import__other", "old", datetime(2026, 7, 1, tzinfo=UTC), None),
        ("someone_elses_dag", "old", datetime(2026, 1, 1, tzinfo=UTC), {"accounts": ["acme"]}),
        ("call_conversions_rerun", "r1", None, {"accounts": ["acme"], "end_date": "2026-08-01"}),
        ("call_conversions_rerun", "r2", None, {"accounts": ["acme"], "end_date": "2026-08-02"}),
        ("call_conversions_rerun", "r3", None, {"accounts": ["other"], "end_date": "2026-01-01"}),
    ]
    with engine.begin() as connection:
        for dag_id, run_id, start, conf in runs:
            connection.execute(
                dag_run.insert().values(dag_id=dag_id, run_id=run_id, data_interval_start=start, conf=conf)
            )
            connection.execute(sa.text("insert into xcom values (:d, :r)"), {"d": dag_id, "r": run_id})
    with engine.connect() as connection:
        picked = sorted(expired_runs(connection, "acme", OSLO, date(2026, 8, 1)))
    assert picked == [("call_conversions_import__acme", "old"), ("call_conversions_rerun", "r1")]

    first = purge_runs(engine, tmp_path, picked)
    assert first.affected == 3  # two XCom rows and r1's conf
    assert purge_runs(engine, tmp_path, picked).affected == 0
    with engine.connect() as connection:
        left = sorted(connection.execute(sa.text("select dag_id, run_id from xcom")).all())
    assert len(left) == 5 and ("call_conversions_rerun", "r1") not in left
