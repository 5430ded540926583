"""run_summary: one row per (run, account, day), since a rerun covers several days

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 00:41:00
"""

import warnings

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _set_primary_key(columns: list[str]) -> None:
    # SQLite's primary key has no name; batch mode rebuilds the table with the new one,
    # and SQLAlchemy warns that the copied table's key differs, which is the point.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*primary_key=True, not matching", category=sa.exc.SAWarning)
        with op.batch_alter_table("run_summary", recreate="always") as batch_op:
            if op.get_bind().dialect.name != "sqlite":
                batch_op.drop_constraint("run_summary_pkey", type_="primary")
            batch_op.create_primary_key("run_summary_pkey", columns)


def upgrade() -> None:
    _set_primary_key(["run_id", "account_id", "business_date"])


def downgrade() -> None:
    _set_primary_key(["run_id", "account_id"])
