"""Keyed pseudonyms: every key derived from a phone number becomes an HMAC, with its key id

Until now ``conversion_key`` and a ``sale_key`` without CRM id were a plain SHA-256
of the number and fields stored beside them: anyone with the table could try the
whole Norwegian 8-digit space in minutes. From here on they are HMAC-SHA256 under
the pseudonym keyring (:mod:`callconv.protection.pseudonyms`), and the key id is stored beside
each key: ``crm_sales.sale_key_id`` and ``conversion_key_id``,
``matches.conversion_key_id``, ``upload_ledger.conversion_key_id``.
``pseudonym_key_state`` records, per account, the key its rows are under.

Existing rows are re-keyed here, in this migration's transaction, by
:func:`callconv.protection.pseudonyms.rekey_account` (the same code as the rotation command
``python -m callconv.protection.pseudonyms rekey``): a key whose row still holds its number is
computed afresh; a key whose rows were redacted is keyed over the old key, the same
way in every table. That needs the keyring: the Airflow connection named by
``$CALL_CONVERSIONS_PSEUDONYM_CONN_ID`` (default ``call_conversions_pseudonym``,
e.g. ``AIRFLOW_CONN_CALL_CONVERSIONS_PSEUDONYM``). A warehouse without rows needs
none; one with rows and no keyring stops here with a message saying so, and nothing
is changed. Pause the import and rerun DAGs while it runs.

``call_logs.caller_number`` becomes nullable: retention now empties the caller
columns of old calls (or deletes the rows).

Downgrading drops the columns and the table; keys stay keyed (the plain hashes
cannot be made again without the numbers).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08 10:00:00
"""

import os
from types import SimpleNamespace

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

KEYED = (
    ("crm_sales", "sale_key_id"),
    ("crm_sales", "conversion_key_id"),
    ("matches", "conversion_key_id"),
    ("upload_ledger", "conversion_key_id"),
)


def _tables() -> SimpleNamespace:
    """The columns re-keying reads and writes, as this revision has them."""
    key, key_id, account = sa.String(64), sa.String(32), sa.String(64)
    moment = sa.DateTime(timezone=True)
    return SimpleNamespace(
        crm_sales=sa.table(
            "crm_sales",
            sa.column("account_id", account),
            sa.column("sale_key", key),
            sa.column("sale_key_id", key_id),
            sa.column("crm_id", sa.String),
            sa.column("caller_e164", sa.String),
            sa.column("conversion_time", moment),
            sa.column("outcome", sa.String),
            sa.column("conversion_value", sa.Numeric(18, 4)),
            sa.column("conversion_action_id", sa.String),
            sa.column("matched_call_start", moment),
            sa.column("conversion_key", key),
            sa.column("conversion_key_id", key_id),
        ),
        matches=sa.table(
            "matches",
            *(sa.column(name) for name in ("account_id", "conversion_key", "conversion_key_id", "caller_e164")),
            sa.column("call_start", moment),
            sa.column("conversion_action_id", sa.String),
        ),
        upload_ledger=sa.table(
            "upload_ledger",
            *(sa.column(name) for name in ("account_id", "conversion_key", "conversion_key_id", "caller_e164")),
            sa.column("call_start", moment),
            sa.column("conversion_action_id", sa.String),
            sa.column("state", sa.String),
        ),
        delivery_conflicts=sa.table(
            "delivery_conflicts", sa.column("account_id"), sa.column("sale_key"), sa.column("conversion_key")
        ),
        pseudonym_key_state=sa.table("pseudonym_key_state", sa.column("account_id"), sa.column("key_id")),
    )


def upgrade() -> None:
    for table, column in KEYED:
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column(column, sa.String(length=32), nullable=True))
    with op.batch_alter_table("call_logs") as batch_op:
        batch_op.alter_column("caller_number", existing_type=sa.String(length=64), nullable=True)
    op.create_table(
        "pseudonym_key_state",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("account_id"),
    )
    _rekey_existing_rows()


def _rekey_existing_rows() -> None:
    from callconv.protection import pseudonyms
    from callconv.warehouse import serialise

    connection = op.get_bind()
    tables = _tables()
    accounts = pseudonyms.accounts_with_keys(connection, tables)
    if not accounts:
        return
    conn_id = os.environ.get(pseudonyms.CONN_ID_ENV_VAR) or pseudonyms.DEFAULT_CONN_ID
    try:
        keys = pseudonyms.keys_from_airflow(conn_id)
    except pseudonyms.PseudonymKeyError as error:
        raise RuntimeError(
            f"migration 0007 re-keys the conversion and sale keys of {len(accounts)} accounts and needs the pseudonym "
            f"keyring: {error}. Nothing was changed."
        ) from None
    for account_id in accounts:
        for stage in ("intake", "match", "file_delivery"):
            serialise(connection, stage, account_id)
        pseudonyms.rekey_account(connection, account_id, keys, tables=tables)


def downgrade() -> None:
    op.drop_table("pseudonym_key_state")
    op.execute(sa.text("update call_logs set caller_number = '' where caller_number is null"))
    with op.batch_alter_table("call_logs") as batch_op:
        batch_op.alter_column("caller_number", existing_type=sa.String(length=64), nullable=False)
    for table, column in reversed(KEYED):
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column(column)
