"""Migrations build exactly the tables the code defines, on PostgreSQL and SQLite, and rerun harmlessly."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from callconv.schema import metadata
from callconv.warehouse import migrate

pytestmark = pytest.mark.integration


def schema_drift(url: str) -> list:
    """Differences between the migrated database and the code, primary keys included."""
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        drift = compare_metadata(MigrationContext.configure(connection), metadata)
    inspector = sa.inspect(engine)
    for table in metadata.sorted_tables:
        expected = [column.name for column in table.primary_key.columns]
        actual = inspector.get_pk_constraint(table.name)["constrained_columns"]
        if sorted(actual) != sorted(expected):
            drift.append(("primary key", table.name, actual, expected))
    return drift


@pytest.fixture()
def empty_pg_schema(pg_admin_engine):
    schema = f"m_{uuid.uuid4().hex[:12]}"
    with pg_admin_engine.begin() as connection:
        connection.execute(sa.text(f'create schema "{schema}"'))
    url = pg_admin_engine.url.update_query_dict({"options": f"-csearch_path={schema}"})
    yield url.render_as_string(hide_password=False)
    with pg_admin_engine.begin() as connection:
        connection.execute(sa.text(f'drop schema "{schema}" cascade'))


def test_postgres_schema_matches_the_code_and_migrating_twice_is_harmless(empty_pg_schema):
    migrate(empty_pg_schema)
    migrate(empty_pg_schema)
    assert schema_drift(empty_pg_schema) == []
    engine = sa.create_engine(empty_pg_schema)
    assert set(sa.inspect(engine).get_table_names()) >= {t.name for t in metadata.sorted_tables}


def test_sqlite_schema_matches_the_code(tmp_path):
    url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    migrate(url)
    migrate(url)
    assert schema_drift(url) == []


def test_downgrade_to_base_and_up_again(empty_pg_schema):
    migrate(empty_pg_schema)
    from alembic import command

    from callconv.warehouse import alembic_config

    command.downgrade(alembic_config(empty_pg_schema), "base")
    assert "crm_sales" not in sa.inspect(sa.create_engine(empty_pg_schema)).get_table_names()
    migrate(empty_pg_schema)
    assert schema_drift(empty_pg_schema) == []


def test_postgres_gets_the_storage_matching_relies_on(empty_pg_schema):
    """Matching's speed rests on two things the generic drift check cannot see."""
    migrate(empty_pg_schema)
    engine = sa.create_engine(empty_pg_schema)
    with engine.connect() as connection:
        options = connection.scalar(sa.text("select reloptions from pg_class where oid = to_regclass('crm_sales')"))
        definition = connection.scalar(sa.text("select pg_get_indexdef(to_regclass('ix_call_logs_match'))"))
    engine.dispose()
    assert options == ["fillfactor=40"]  # room for the matched version of each sale on its page
    assert definition.endswith(
        "(account_id, caller_e164, call_start) INCLUDE (source_call_id, duration_seconds, via_google_forwarding)"
    )


def test_0006_gives_rows_delivered_by_file_their_publication(empty_pg_schema):
    """Rows the old code marked delivered by file were published at their delivered_at; others get none."""
    from datetime import UTC, date, datetime

    migrate(empty_pg_schema, "0005")
    published = datetime(2026, 11, 2, 23, 0, tzinfo=UTC)
    common = {
        "account_id": "a",
        "business_date": date(2026, 11, 2),
        "call_start": datetime(2026, 11, 2, 8, 0, tzinfo=UTC),
        "conversion_action_id": "1",
        "conversion_time": datetime(2026, 11, 2, 9, 0, tzinfo=UTC),
        "run_id": "r",
    }
    engine = sa.create_engine(empty_pg_schema)
    ledger = sa.table(
        "upload_ledger",
        *(sa.column(name) for name in ("conversion_key", "state", "delivered_by", "delivered_at", *common)),
    )
    with engine.begin() as connection:
        connection.execute(
            ledger.insert(),
            [
                {
                    "conversion_key": "by-file",
                    "state": "delivered",
                    "delivered_by": "file",
                    "delivered_at": published,
                    **common,
                },
                {
                    "conversion_key": "by-api",
                    "state": "uploaded",
                    "delivered_by": "api",
                    "delivered_at": published,
                    **common,
                },
                {"conversion_key": "waiting", "state": "pending", "delivered_by": None, "delivered_at": None, **common},
            ],
        )
    migrate(empty_pg_schema, "0006")
    with engine.connect() as connection:
        rows = dict(connection.execute(sa.text("select conversion_key, last_published_at from upload_ledger")).all())
    engine.dispose()
    assert rows == {"by-file": published, "by-api": None, "waiting": None}
