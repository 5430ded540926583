"""Delivery guarantee: claims before sends, frozen payloads, recorded conflicts

A conversion whose request may have reached Google can never be taken back,
so its payload must never change and must never be sent twice but as an
identical resend. The ledger gains:

* ``sent_at``: when the payload first left the process (an API request, or a
  published file). From then on the row is frozen: matching never rewrites it.
* ``sent_payload``: the serialized ``CallConversion`` exactly as first sent;
  every resend uses these bytes.
* ``claimed_by``, ``request_id``, ``lease_until``: the run and request that
  claimed the row before sending it. A row in state ``sending`` whose lease ran
  out belonged to a run that died mid-request, and is taken over.
* ``sends``: how many requests carried the row.

Rows that were already uploaded, delivered, failed or answered before this
revision may have reached Google: they are frozen from now on.

``matches`` is keyed by ``conversion_key`` alone (the same key the ledger
uses); the unique (call id, action) constraint goes, so a call-log id reused
for another caller or start is a new conversion, never a unique-key crash.

``delivery_conflicts`` records every change that arrived after a send and was
not applied, with its reason code.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 16:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("upload_ledger") as batch_op:
        batch_op.add_column(sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("sent_payload", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=250), nullable=True))
        batch_op.add_column(sa.Column("request_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("sends", sa.Integer(), server_default="0", nullable=False))
    ledger = sa.table(
        "upload_ledger",
        sa.column("state", sa.String),
        sa.column("attempts", sa.Integer),
        sa.column("sent_at", sa.DateTime(timezone=True)),
        sa.column("delivered_at", sa.DateTime(timezone=True)),
    )
    op.execute(
        ledger.update()
        .where(sa.or_(ledger.c.state.in_(("uploaded", "delivered", "failed")), ledger.c.attempts > 0))
        .values(sent_at=sa.func.coalesce(ledger.c.delivered_at, sa.func.current_timestamp()))
    )
    with op.batch_alter_table("matches") as batch_op:
        batch_op.drop_constraint("uq_matches_call_action", type_="unique")
        batch_op.create_index("ix_matches_call_action", ["account_id", "source_call_id", "conversion_action_id"])
    op.create_table(
        "delivery_conflicts",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("sale_key", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=48), nullable=False),
        sa.Column("business_date", sa.Date(), nullable=False),
        sa.Column("conversion_key", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.String(length=256), nullable=True),
        sa.Column("run_id", sa.String(length=250), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "sale_key", "reason"),
    )
    op.create_index("ix_delivery_conflicts_day", "delivery_conflicts", ["account_id", "business_date"])


def downgrade() -> None:
    op.drop_index("ix_delivery_conflicts_day", table_name="delivery_conflicts")
    op.drop_table("delivery_conflicts")
    with op.batch_alter_table("matches") as batch_op:
        batch_op.drop_index("ix_matches_call_action")
        batch_op.create_unique_constraint(
            "uq_matches_call_action", ["account_id", "source_call_id", "conversion_action_id"]
        )
    with op.batch_alter_table("upload_ledger") as batch_op:
        for name in ("sends", "lease_until", "request_id", "claimed_by", "sent_payload", "sent_at"):
            batch_op.drop_column(name)
