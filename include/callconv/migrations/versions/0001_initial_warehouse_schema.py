"""initial warehouse schema

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-29 00:10:05.995338
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "call_logs",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("source_call_id", sa.String(length=128), nullable=False),
        sa.Column("caller_number", sa.String(length=64), nullable=False),
        sa.Column("caller_e164", sa.String(length=20), nullable=True),
        sa.Column("caller_parse_status", sa.String(length=32), nullable=True),
        sa.Column("call_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_seconds", sa.Integer(), nullable=False),
        sa.Column("dialled_number", sa.String(length=64), nullable=True),
        sa.Column("via_google_forwarding", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "source_call_id"),
    )
    with op.batch_alter_table("call_logs", schema=None) as batch_op:
        batch_op.create_index("ix_call_logs_caller_start", ["caller_e164", "call_start"], unique=False)
        batch_op.create_index("ix_call_logs_unnormalised", ["account_id", "caller_parse_status"], unique=False)

    op.create_table(
        "crm_imports",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("checksum", sa.String(length=64), nullable=False),
        sa.Column("source_uri", sa.String(length=1024), nullable=False),
        sa.Column("business_date", sa.Date(), nullable=False),
        sa.Column("row_count", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=250), nullable=False),
        sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "checksum"),
    )
    op.create_table(
        "crm_sales",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("sale_key", sa.String(length=64), nullable=False),
        sa.Column("crm_id", sa.String(length=128), nullable=True),
        sa.Column("import_checksum", sa.String(length=64), nullable=False),
        sa.Column("source_row", sa.Integer(), nullable=False),
        sa.Column("business_date", sa.Date(), nullable=False),
        sa.Column("caller_e164", sa.String(length=20), nullable=True),
        sa.Column("conversion_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("crm_call_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=128), nullable=False),
        sa.Column("conversion_action_id", sa.String(length=32), nullable=False),
        sa.Column("conversion_value", sa.Numeric(precision=18, scale=4), nullable=True),
        sa.Column("currency_code", sa.String(length=3), nullable=True),
        sa.Column("matched_call_id", sa.String(length=128), nullable=True),
        sa.Column("matched_call_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("conversion_key", sa.String(length=64), nullable=True),
        sa.Column("unmatched_reason", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("account_id", "sale_key"),
    )
    with op.batch_alter_table("crm_sales", schema=None) as batch_op:
        batch_op.create_index(
            "ix_crm_sales_call", ["account_id", "matched_call_id", "conversion_action_id"], unique=False
        )
        batch_op.create_index("ix_crm_sales_conversion", ["account_id", "conversion_key"], unique=False)
        batch_op.create_index("ix_crm_sales_day", ["account_id", "business_date"], unique=False)

    op.create_table(
        "matches",
        sa.Column("conversion_key", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("business_date", sa.Date(), nullable=False),
        sa.Column("source_call_id", sa.String(length=128), nullable=False),
        sa.Column("caller_e164", sa.String(length=20), nullable=True),
        sa.Column("call_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("conversion_action_id", sa.String(length=32), nullable=False),
        sa.Column("conversion_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("conversion_value", sa.Numeric(precision=18, scale=4), nullable=True),
        sa.Column("currency_code", sa.String(length=3), nullable=True),
        sa.Column("sale_count", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=250), nullable=False),
        sa.PrimaryKeyConstraint("conversion_key"),
        sa.UniqueConstraint("account_id", "source_call_id", "conversion_action_id", name="uq_matches_call_action"),
    )
    with op.batch_alter_table("matches", schema=None) as batch_op:
        batch_op.create_index("ix_matches_day", ["account_id", "business_date"], unique=False)

    op.create_table(
        "quarantine",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("import_checksum", sa.String(length=64), nullable=False),
        sa.Column("source_row", sa.Integer(), nullable=False),
        sa.Column("business_date", sa.Date(), nullable=False),
        sa.Column("reason", sa.String(length=48), nullable=False),
        sa.Column("detail", sa.String(length=256), nullable=True),
        sa.Column("crm_id", sa.String(length=128), nullable=True),
        sa.Column("raw_record", sa.JSON(), nullable=True),
        sa.Column("run_id", sa.String(length=250), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "import_checksum", "source_row"),
    )
    with op.batch_alter_table("quarantine", schema=None) as batch_op:
        batch_op.create_index("ix_quarantine_day", ["account_id", "business_date"], unique=False)

    op.create_table(
        "run_summary",
        sa.Column("run_id", sa.String(length=250), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("business_date", sa.Date(), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "account_id"),
    )
    op.create_table(
        "upload_ledger",
        sa.Column("conversion_key", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("business_date", sa.Date(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("caller_e164", sa.String(length=20), nullable=True),
        sa.Column("call_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("conversion_action_id", sa.String(length=32), nullable=False),
        sa.Column("conversion_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("conversion_value", sa.Numeric(precision=18, scale=4), nullable=True),
        sa.Column("currency_code", sa.String(length=3), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("park_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.String(length=512), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_by", sa.String(length=8), nullable=True),
        sa.Column("run_id", sa.String(length=250), nullable=False),
        sa.PrimaryKeyConstraint("conversion_key"),
    )
    with op.batch_alter_table("upload_ledger", schema=None) as batch_op:
        batch_op.create_index("ix_upload_ledger_state", ["account_id", "state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("upload_ledger", schema=None) as batch_op:
        batch_op.drop_index("ix_upload_ledger_state")

    op.drop_table("upload_ledger")
    op.drop_table("run_summary")
    with op.batch_alter_table("quarantine", schema=None) as batch_op:
        batch_op.drop_index("ix_quarantine_day")

    op.drop_table("quarantine")
    with op.batch_alter_table("matches", schema=None) as batch_op:
        batch_op.drop_index("ix_matches_day")

    op.drop_table("matches")
    with op.batch_alter_table("crm_sales", schema=None) as batch_op:
        batch_op.drop_index("ix_crm_sales_day")
        batch_op.drop_index("ix_crm_sales_conversion")
        batch_op.drop_index("ix_crm_sales_call")

    op.drop_table("crm_sales")
    op.drop_table("crm_imports")
    with op.batch_alter_table("call_logs", schema=None) as batch_op:
        batch_op.drop_index("ix_call_logs_unnormalised")
        batch_op.drop_index("ix_call_logs_caller_start")

    op.drop_table("call_logs")
