"""Data Manager API delivery: one row per ingest request, and each ledger row's place in it

The Data Manager API answers an ingest with a request id only; whether each event was
accepted is known later, from ``requestStatus:retrieve``, by record index. So the
request is recorded before it leaves (our claim id, the frozen body's events in order)
and after (Google's request id), and each ledger row keeps its index in that request,
so that settling maps per-record diagnostics back to exactly the rows they name.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 10:00:00
"""

import sqlalchemy as sa
from alembic import op

UTC_TIME = sa.DateTime(timezone=True)

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "data_manager_requests",
        sa.Column("claim_id", sa.String(64), primary_key=True),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("events", sa.Integer, nullable=False),
        # The request body as first sent; a resend after a crash sends exactly these bytes.
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("google_request_id", sa.String(128)),
        sa.Column("sent_at", UTC_TIME),
        sa.Column("answered_at", UTC_TIME),
        sa.Column("settled_at", UTC_TIME),
        sa.Column("sends", sa.Integer, nullable=False, server_default="0"),
        sa.Column("status_detail", sa.String(512)),
        sa.Index("ix_data_manager_requests_state", "account_id", "state"),
    )
    with op.batch_alter_table("upload_ledger") as batch_op:
        batch_op.add_column(sa.Column("record_index", sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("upload_ledger") as batch_op:
        batch_op.drop_column("record_index")
    op.drop_table("data_manager_requests")
