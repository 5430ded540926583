"""run_summary: the DAG whose run wrote the row, so the page links to the right DAG

A run id is unique only within its DAG, and a day's rows come from the account's
import DAG and from the rerun DAG. Rows written before this revision have no
``dag_id``; the page then finds the run's DAG among the account's import DAG and
the rerun DAG in Airflow's own database.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("run_summary") as batch_op:
        batch_op.add_column(sa.Column("dag_id", sa.String(250), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("run_summary") as batch_op:
        batch_op.drop_column("dag_id")
