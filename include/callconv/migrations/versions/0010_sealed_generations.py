"""Sealed files: the newest generation of each, so a rolled-back copy is refused

Every stored file is sealed with Tink's Streaming AEAD, its associated data naming the
account, the data class, the logical path and a generation number (callconv.protection.sealed).
This table holds each path's newest generation, outside the file area, so an older
copy of a file put back in its place does not decrypt. One row per sealed path.

Revision ID: 0010
Revises: 0009 (rechained after 0010 at merge)
Create Date: 2026-12-05 08:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sealed_generations",
        sa.Column("account_id", sa.String(64), primary_key=True),
        sa.Column("data_class", sa.String(16), primary_key=True),
        sa.Column("logical_path", sa.String(512), primary_key=True),
        sa.Column("generation", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("sealed_generations")
