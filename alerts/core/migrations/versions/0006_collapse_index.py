"""collapse and quiet-hours indexes (docs/policy.md)

- ``ix_events_collapse_key``: Phase B finds the earlier events of a story (same
  ``collapse_key``) to supersede their queued instant deliveries, without a scan of
  alert_events;
- ``ix_users_quiet_hours``: Phase B reads the distinct (timezone, quiet_hours) pairs of
  the users who have quiet hours, without a scan of users.

Both are partial (only rows that have the value), so they stay small when few events
carry a key and few users keep quiet hours.

Revision ID: 0006_collapse_index
Revises: 0005_channel_blocks
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

revision = "0006_collapse_index"
down_revision = "0005_channel_blocks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    has_key = sa.text("collapse_key IS NOT NULL")
    op.create_index("ix_events_collapse_key", "alert_events", ["collapse_key"],
                    postgresql_where=has_key, sqlite_where=has_key)
    has_quiet = sa.text("quiet_hours IS NOT NULL")
    op.create_index("ix_users_quiet_hours", "users", ["timezone", "quiet_hours"],
                    postgresql_where=has_quiet, sqlite_where=has_quiet)


def downgrade() -> None:
    op.drop_index("ix_users_quiet_hours", table_name="users")
    op.drop_index("ix_events_collapse_key", table_name="alert_events")
