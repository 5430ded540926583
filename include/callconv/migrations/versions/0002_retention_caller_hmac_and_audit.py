"""retention: caller hmac and audit

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 00:18:45.079368
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retention_audit",
        sa.Column("run_id", sa.String(length=250), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("data_class", sa.String(length=32), nullable=False),
        sa.Column("cutoff", sa.Date(), nullable=False),
        sa.Column("affected", sa.Integer(), nullable=False),
        sa.Column("forced", sa.Integer(), server_default="0", nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "account_id", "data_class"),
    )
    with op.batch_alter_table("crm_sales", schema=None) as batch_op:
        batch_op.add_column(sa.Column("caller_hmac", sa.String(length=64), nullable=True))

    with op.batch_alter_table("matches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("caller_hmac", sa.String(length=64), nullable=True))

    with op.batch_alter_table("upload_ledger", schema=None) as batch_op:
        batch_op.add_column(sa.Column("caller_hmac", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("upload_ledger", schema=None) as batch_op:
        batch_op.drop_column("caller_hmac")

    with op.batch_alter_table("matches", schema=None) as batch_op:
        batch_op.drop_column("caller_hmac")

    with op.batch_alter_table("crm_sales", schema=None) as batch_op:
        batch_op.drop_column("caller_hmac")

    op.drop_table("retention_audit")
