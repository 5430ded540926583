"""What a task does with an error a retry cannot fix, and a match retried on a used connection."""

from __future__ import annotations

from datetime import date

import pytest
import sqlalchemy as sa

from callconv.config import MatchRules
from callconv.steps import fail_at_once


def test_a_permanent_error_fails_the_task_at_once_with_its_first_line():
    from airflow.sdk.exceptions import AirflowFailException

    error = sa.exc.IntegrityError("INSERT INTO matches ...", {"caller": "+4791234567"}, Exception("duplicate key"))
    with pytest.raises(AirflowFailException) as raised, fail_at_once(sa.exc.IntegrityError):
        raise error
    message = str(raised.value)
    assert message.startswith("IntegrityError: ") and "not retried" in message
    assert raised.value.__cause__ is error


def test_other_errors_pass_through_for_airflow_to_retry():
    with pytest.raises(ConnectionError), fail_at_once(sa.exc.IntegrityError):
        raise ConnectionError("the warehouse went away")


def test_a_match_on_a_connection_with_leftover_temporary_tables_still_runs(tmp_path, pseudonym_keys):
    """SQLite keeps a temporary table on its pooled connection after a failed attempt."""
    from callconv.matching.match import OUTCOME, TOUCHED, match_day
    from callconv.warehouse import create_engine, migrate

    url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    migrate(url)
    engine = create_engine(url)
    with engine.connect() as connection:
        TOUCHED.create(connection)
        connection.execute(sa.text("CREATE TEMPORARY TABLE tmp_sale_outcome (sale_key TEXT)"))
        connection.commit()

    outcome = match_day(engine, "acme", date(2026, 11, 27), MatchRules(), "retry-run", keys=pseudonym_keys)

    assert (outcome.sales, outcome.matched) == (0, 0)
    assert OUTCOME.name == "tmp_sale_outcome"
