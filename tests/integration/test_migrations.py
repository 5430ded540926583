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


def _legacy_rows():
    """What 0006 held for one account: plain SHA-256 keys of the numbers and fields beside them."""
    import hashlib
    from datetime import UTC, date, datetime
    from decimal import Decimal

    from callconv.protection.pseudonyms import conversion_text, sale_text, separate_text

    def sha(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    day, action = date(2026, 11, 2), "555000111"
    start, sold = datetime(2026, 11, 2, 8, 0, tzinfo=UTC), datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
    caller, gone = "+4791234567", "+4798765432"
    main = sha(conversion_text("a", caller, start, action))
    crm_key = sha("a|crm|CRM-2")
    separate = sha(separate_text(conversion_text("a", caller, start, action), crm_key))
    forgotten = sha(conversion_text("a", gone, start, action))
    content = sha(sale_text("a", caller, sold, "sale", Decimal("100.0000")))
    redacted_sale = sha(sale_text("a", gone, sold, "sale", None))
    sale = {
        "account_id": "a",
        "import_checksum": "c" * 64,
        "business_date": day,
        "conversion_time": sold,
        "outcome": "sale",
        "conversion_action_id": action,
        "matched_call_start": start,
        "matched_call_id": "c1",
    }
    sales = [
        {**sale, "sale_key": content, "source_row": 1, "caller_e164": caller, "conversion_value": Decimal("100")},
        # A late sale with a conversion of its own (policy new_conversion); the CRM gave it an id.
        {
            **sale,
            "sale_key": crm_key,
            "crm_id": "CRM-2",
            "source_row": 2,
            "caller_e164": caller,
            "conversion_key": separate,
        },
        # Redacted by retention: the number is gone, its keys are all that is left.
        {
            **sale,
            "sale_key": redacted_sale,
            "source_row": 3,
            "caller_e164": None,
            "caller_hmac": "h" * 64,
            "conversion_key": forgotten,
        },
    ]
    sales[0]["conversion_key"] = main
    conversion = {
        "account_id": "a",
        "business_date": day,
        "source_call_id": "c1",
        "call_start": start,
        "conversion_action_id": action,
        "conversion_time": sold,
        "run_id": "r",
    }
    matches = [
        {**conversion, "conversion_key": main, "caller_e164": caller, "sale_count": 1},
        {**conversion, "conversion_key": separate, "caller_e164": caller, "sale_count": 1},
        {**conversion, "conversion_key": forgotten, "caller_e164": None, "caller_hmac": "h" * 64, "sale_count": 1},
    ]
    ledger = [
        {key: value for key, value in row.items() if key not in ("source_call_id", "sale_count")}
        | {"state": "uploaded", "attempts": 1}
        for row in matches
    ]
    conflict = {
        "account_id": "a",
        "sale_key": crm_key,
        "reason": "late_sale_on_delivered_call",
        "business_date": day,
        "conversion_key": main,
        "run_id": "r",
    }
    old = {
        "main": main,
        "separate": separate,
        "forgotten": forgotten,
        "content": content,
        "redacted_sale": redacted_sale,
    }
    return sales, matches, ledger, conflict, old


def _seed_legacy(url: str):
    from callconv.schema import crm_sales, delivery_conflicts, matches, upload_ledger

    sales, match_rows, ledger, conflict, old = _legacy_rows()
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        for row in sales:  # rows differ in their columns
            connection.execute(crm_sales.insert().values(row))
        for row in match_rows:
            connection.execute(matches.insert().values(row))
        for row in ledger:
            connection.execute(upload_ledger.insert().values(row))
        connection.execute(delivery_conflicts.insert().values(conflict))
    engine.dispose()
    return old


def test_0007_rekeys_every_key_of_a_number_consistently_in_every_table(empty_pg_schema, pseudonym_keys):
    """Keys with their number are made afresh under the keyring's primary (a late sale's own
    conversion told apart by its old key), redacted ones keyed over the old key; the tables agree."""
    import hashlib
    from datetime import UTC, datetime
    from decimal import Decimal

    from callconv.protection.pseudonyms import conversion_text, sale_text, separate_text
    from callconv.schema import crm_sales, delivery_conflicts, matches, pseudonym_key_state, upload_ledger

    migrate(empty_pg_schema, "0006")
    old = _seed_legacy(empty_pg_schema)
    migrate(empty_pg_schema)

    key = pseudonym_keys.primary
    main_text = conversion_text("a", "+4791234567", datetime(2026, 11, 2, 8, 0, tzinfo=UTC), "555000111")
    crm_key = key.hexdigest("a|crm|CRM-2")
    new = {
        "main": key.hexdigest(main_text),
        # A late sale's own conversion: told apart by its old key, made again with its new sale key.
        "separate": key.hexdigest(separate_text(main_text, crm_key)),
        "forgotten": key.hexdigest(f"legacy|{old['forgotten']}"),
        "content": key.hexdigest(
            sale_text("a", "+4791234567", datetime(2026, 11, 2, 9, 0, tzinfo=UTC), "sale", Decimal("100.0000"))
        ),
        "redacted_sale": key.hexdigest(f"legacy|{old['redacted_sale']}"),
    }
    engine = sa.create_engine(empty_pg_schema)
    with engine.connect() as connection:
        sales = {
            row.source_row: (row.sale_key, row.sale_key_id, row.conversion_key, row.conversion_key_id)
            for row in connection.execute(sa.select(crm_sales))
        }
        keyed = {
            table.name: sorted(connection.execute(sa.select(table.c.conversion_key, table.c.conversion_key_id)).all())
            for table in (matches, upload_ledger)
        }
        conflict = connection.execute(
            sa.select(delivery_conflicts.c.sale_key, delivery_conflicts.c.conversion_key)
        ).one()
        state = connection.execute(sa.select(pseudonym_key_state)).all()
    engine.dispose()
    kid = key.key_id
    assert sales == {
        1: (new["content"], kid, new["main"], kid),
        2: (crm_key, kid, new["separate"], kid),
        3: (new["redacted_sale"], kid, new["forgotten"], kid),
    }
    expected = sorted((new[name], kid) for name in ("main", "separate", "forgotten"))
    assert keyed == {"matches": expected, "upload_ledger": expected}
    assert tuple(conflict) == (crm_key, new["main"])
    assert state == [("a", kid)]
    assert not (set(old.values()) | {hashlib.sha256(b"a|crm|CRM-2").hexdigest()}) & {
        value for row in sales.values() for value in row
    }


def test_0007_without_the_keyring_refuses_and_changes_nothing(empty_pg_schema, monkeypatch):
    migrate(empty_pg_schema, "0006")
    old = _seed_legacy(empty_pg_schema)
    monkeypatch.delenv("AIRFLOW_CONN_CALL_CONVERSIONS_PSEUDONYM")
    with pytest.raises(
        RuntimeError, match="needs the pseudonym keyring.*call_conversions_pseudonym.*Nothing was changed"
    ):
        migrate(empty_pg_schema)
    engine = sa.create_engine(empty_pg_schema)
    with engine.connect() as connection:
        version = connection.scalar(sa.text("select version_num from alembic_version"))
        keys = set(connection.scalars(sa.text("select conversion_key from upload_ledger")))
    engine.dispose()
    assert version == "0006" and keys == {old["main"], old["separate"], old["forgotten"]}


def test_0007_on_an_empty_warehouse_needs_no_keyring(empty_pg_schema, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_CALL_CONVERSIONS_PSEUDONYM")
    migrate(empty_pg_schema)
    assert schema_drift(empty_pg_schema) == []


def test_0008_keeps_old_run_summaries_without_a_dag_and_records_the_dag_of_new_ones(empty_pg_schema):
    from datetime import UTC, date, datetime

    from callconv.monitoring.reporting import record_stage
    from callconv.schema import run_summary

    migrate(empty_pg_schema, "0007")
    engine = sa.create_engine(empty_pg_schema)
    window = (datetime(2026, 11, 1, 23, 0, tzinfo=UTC), datetime(2026, 11, 2, 23, 0, tzinfo=UTC))
    old = sa.table("run_summary", *(sa.column(name) for name in ("run_id", "account_id", "business_date")))
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "insert into run_summary (run_id, account_id, business_date, window_start, window_end, counts, "
                "updated_at) values ('old', 'a', '2026-11-02', :start, :end, '{}', :end)"
            ),
            {"start": window[0], "end": window[1]},
        )
    migrate(empty_pg_schema)
    record_stage(engine, "new", "a", date(2026, 11, 2), window, "intake", {"read": 1}, dag_id="call_conversions_rerun")
    # A later stage of the same run keeps the DAG.
    record_stage(engine, "new", "a", date(2026, 11, 2), window, "match", {"sales": 1})
    with engine.connect() as connection:
        rows = dict(connection.execute(sa.select(run_summary.c.run_id, run_summary.c.dag_id)).all())
        assert connection.scalar(sa.select(sa.func.count()).select_from(old)) == 2
    engine.dispose()
    assert rows == {"old": None, "new": "call_conversions_rerun"}


def test_0009_adds_data_manager_requests_and_keeps_ledger_rows(empty_pg_schema):
    migrate(empty_pg_schema, "0008")
    engine = sa.create_engine(empty_pg_schema)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "insert into upload_ledger (conversion_key, account_id, business_date, state, call_start, "
                "conversion_action_id, conversion_time, run_id) values ('k', 'a', '2026-11-02', 'delivered', "
                "'2026-11-02 10:00:00+00', '1', '2026-11-02 11:00:00+00', 'r')"
            )
        )
    migrate(empty_pg_schema)
    with engine.connect() as connection:
        rows = connection.execute(sa.text("select conversion_key, record_index from upload_ledger")).all()
        requests = connection.scalar(sa.text("select count(*) from data_manager_requests"))
    engine.dispose()
    assert [tuple(row) for row in rows] == [("k", None)] and requests == 0
    assert schema_drift(empty_pg_schema) == []
