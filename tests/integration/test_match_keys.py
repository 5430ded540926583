"""The warehouse hashes conversion keys itself: they must equal match.conversion_key,
or a rerun would not recognise what the ledger already holds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from callconv import sqlhash
from callconv.match import conversion_key, conversion_key_sql

OSLO_SUMMER = timezone(timedelta(hours=2))
STARTS = [
    datetime(2026, 3, 2, 9, 0, 0, tzinfo=UTC),
    datetime(2026, 3, 2, 9, 0, 0, 999_999, tzinfo=UTC),  # fractions never round up
    datetime(2026, 3, 29, 0, 59, 59, tzinfo=UTC),  # the second before Oslo springs forward
    datetime(2026, 10, 25, 2, 30, tzinfo=OSLO_SUMMER),  # the first 02:30 of the repeated hour
    datetime(2026, 12, 31, 23, 59, 59, 500_000, tzinfo=UTC),
]
ROWS = [
    {"caller": caller, "start": start, "action": action}
    for start in STARTS
    for caller, action in (("+4791234567", "555000111"), ("+14155550123", "7"))
]

calls = sa.Table(
    "key_probe",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("caller", sa.String(20)),
    sa.Column("start", sa.DateTime(timezone=True)),
    sa.Column("action", sa.String(32)),
)


def keys_from(engine: sa.Engine, stored_starts) -> list[tuple[str, str]]:
    with engine.begin() as connection:
        calls.drop(connection, checkfirst=True)
        calls.create(connection)
        connection.execute(
            calls.insert(), [dict(row, id=index, start=stored_starts(row["start"])) for index, row in enumerate(ROWS)]
        )
        sqlhash.enable_on(connection)
        key = conversion_key_sql("acme", calls.c.caller, calls.c.start, calls.c.action)
        found = connection.execute(sa.select(calls.c.id, key).order_by(calls.c.id)).all()
        calls.drop(connection)
    return [
        (conversion_key("acme", ROWS[index]["caller"], ROWS[index]["start"], ROWS[index]["action"]), sql_key)
        for index, sql_key in found
    ]


def test_postgres_hashes_the_same_keys_as_python(pg_schema_url):
    engine = sa.create_engine(pg_schema_url)
    pairs = keys_from(engine, lambda start: start)
    engine.dispose()
    assert len(pairs) == len(ROWS)
    assert all(python == sql for python, sql in pairs), pairs


def test_sqlite_hashes_the_same_keys_as_python(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    # The pipeline writes UTC to SQLite, which keeps no offset.
    pairs = keys_from(engine, lambda start: start.astimezone(UTC))
    engine.dispose()
    assert len(pairs) == len(ROWS)
    assert all(python == sql for python, sql in pairs), pairs


def test_sqlite_without_the_function_fails_loudly(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'bare.db'}")
    with engine.connect() as connection, pytest.raises(sa.exc.OperationalError, match=sqlhash.SQLITE_FUNCTION):
        connection.execute(
            sa.select(conversion_key_sql("acme", sa.literal("+47"), sa.literal(STARTS[0]), sa.literal("1")))
        )
    engine.dispose()
