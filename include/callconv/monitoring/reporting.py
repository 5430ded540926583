"""The per-run summary: one row per (DAG run, account, day), counts by stage."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime

import sqlalchemy as sa

from callconv.schema import run_summary

log = logging.getLogger(__name__)


def record_stage(
    engine: sa.Engine,
    run_id: str,
    account_id: str,
    business_date: date,
    window: tuple[datetime, datetime],
    stage: str,
    counts: dict,
    *,
    dag_id: str | None = None,
) -> None:
    """Merge one stage's counts into the run's row; a rerun of the stage overwrites its own part.

    ``dag_id`` is the run's DAG: a run id is unique only within its DAG.
    """
    key = sa.and_(
        run_summary.c.run_id == run_id,
        run_summary.c.account_id == account_id,
        run_summary.c.business_date == business_date,
    )
    with engine.begin() as connection:
        current = connection.scalar(sa.select(run_summary.c.counts).where(key).with_for_update())
        merged = {**(current or {}), stage: counts}
        # updated_at is monitoring metadata (when the stage reported), not business logic.
        values = {"counts": merged, "updated_at": datetime.now(UTC)}
        if dag_id is not None:
            values["dag_id"] = dag_id
        if current is None:
            connection.execute(
                run_summary.insert().values(
                    run_id=run_id,
                    account_id=account_id,
                    business_date=business_date,
                    window_start=window[0],
                    window_end=window[1],
                    **values,
                )
            )
        else:
            connection.execute(run_summary.update().where(key).values(**values))
