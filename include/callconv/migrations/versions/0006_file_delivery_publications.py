"""Delivery by file: the ledger records the latest publication that carried a row

The file Google Ads' scheduled upload fetches is cumulative: it carries every
row of the account not yet confirmed, within Google's lookback, so a row is
published again and again until it counts as delivered
(:mod:`callconv.delivery.file_delivery`). ``last_published_at`` is the data-interval end
of the latest publication that carried the row; ``sent_at`` stays the first.
With it a rerun of a publication counts nothing twice (``sends`` grows only for
a publication with a later window end), and a row that was frozen for a
publication that then failed is told apart from one that really was published.

Rows that the earlier code marked delivered by file were published at their
``delivered_at``: that is their latest publication.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 09:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("upload_ledger") as batch_op:
        batch_op.add_column(sa.Column("last_published_at", sa.DateTime(timezone=True), nullable=True))
    ledger = sa.table(
        "upload_ledger",
        sa.column("delivered_by", sa.String),
        sa.column("delivered_at", sa.DateTime(timezone=True)),
        sa.column("last_published_at", sa.DateTime(timezone=True)),
    )
    op.execute(
        ledger.update()
        .where(ledger.c.delivered_by == "file", ledger.c.delivered_at.is_not(None))
        .values(last_published_at=ledger.c.delivered_at)
    )


def downgrade() -> None:
    with op.batch_alter_table("upload_ledger") as batch_op:
        batch_op.drop_column("last_published_at")
