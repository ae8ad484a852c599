"""enqueue marks: enqueued_at on user_alert_deliveries and user_alert_digests

The Celery dispatch marks a due row when it publishes the row's send task, so a backlog
is enqueued once rather than on every beat tick (alerts/sending/dispatch.py).

Revision ID: 0003_enqueue_marks
Revises: 0002_digests
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = "0003_enqueue_marks"
down_revision = "0002_digests"
branch_labels = None
depends_on = None

TABLES = ("user_alert_deliveries", "user_alert_digests")


def upgrade() -> None:
    for table in TABLES:
        # Nullable, no default: instant on PostgreSQL however large the table.
        op.add_column(table, sa.Column("enqueued_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:  # SQLite rebuilds the table
            batch.drop_column("enqueued_at")
