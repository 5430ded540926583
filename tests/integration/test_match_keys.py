"""The warehouse computes conversion keys itself (an HMAC built from SHA-256): they must
equal match.conversion_key, or a rerun would not recognise what the ledger already holds."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from callconv import sqlhash
from callconv.matching.match import conversion_key, conversion_key_sql
from callconv.protection.pseudonyms import PseudonymKey

KEY = PseudonymKey("it-1", bytes(range(7, 39)))

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
        key = conversion_key_sql(KEY, "acme", calls.c.caller, calls.c.start, calls.c.action)
        found = connection.execute(sa.select(calls.c.id, key).order_by(calls.c.id)).all()
        calls.drop(connection)
    return [
        (conversion_key(KEY, "acme", ROWS[index]["caller"], ROWS[index]["start"], ROWS[index]["action"]), sql_key)
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
    with engine.connect() as connection, pytest.raises(sa.exc.OperationalError, match=sqlhash.SQLITE_HMAC_FUNCTION):
        connection.execute(
            sa.select(conversion_key_sql(KEY, "acme", sa.literal("+47"), sa.literal(STARTS[0]), sa.literal("1")))
        )
    engine.dispose()


TEXTS = ["", "acme|+4791234567|2026-03-02T09:00:00Z|555000111", "ø|Ærlig|🙂", "x" * 300]
SECRETS = [bytes(32), bytes(range(32)), b"k" * 64, b"long key " * 20]  # one block exactly, and longer than one


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_the_warehouse_hmac_is_rfc_2104_hmac_sha256(dialect, pg_schema_url, tmp_path):
    """SHA-256 twice over the padded key blocks gives what hmac.new gives, for any text and key length."""
    url = pg_schema_url if dialect == "postgresql" else f"sqlite:///{tmp_path / 'hmac.db'}"
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        sqlhash.enable_on(connection)
        for secret in SECRETS:
            key = PseudonymKey("k", secret)
            for text in TEXTS:
                found = connection.scalar(sa.select(key.sql(sa.literal(text, sa.String))))
                assert found == hmac.new(secret, text.encode(), hashlib.sha256).hexdigest(), (len(secret), text)
    engine.dispose()
