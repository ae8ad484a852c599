"""digest tables: user_alert_digests, user_alert_digest_items

Revision ID: 0002_digests
Revises: 0001_core
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = "0002_digests"
down_revision = "0001_core"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "user_alert_digests",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("channel", sa.Text, nullable=False),
        sa.Column("period", sa.Text, nullable=False),
        sa.Column("window_start", TS, nullable=False),
        sa.Column("window_end", TS, nullable=False),
        # 0 for a window's first digest, 1, 2, ... for follow-ups (see alerts/phases/digests.py).
        sa.Column("sequence", sa.Integer, nullable=False, server_default="0"),
        sa.Column("digest_key", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default="queued"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_retry_at", TS),
        sa.Column("last_error", sa.Text),
        sa.Column("sent_at", TS),
        sa.Column("claimed_at", TS),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.UniqueConstraint("digest_key", name="uq_digests_digest_key"),
        sa.UniqueConstraint("user_id", "channel", "period", "window_start", "sequence",
                            name="uq_digests_window_sequence"),
        sa.CheckConstraint("channel IN ('email', 'telegram')", name="ck_digests_channel"),
        sa.CheckConstraint("period IN ('daily', 'hourly')", name="ck_digests_period"),
        sa.CheckConstraint("status IN ('queued', 'sending', 'sent', 'failed', 'skipped')", name="ck_digests_status"),
        sa.CheckConstraint("attempts >= 0", name="ck_digests_attempts"),
        sa.CheckConstraint("sequence >= 0", name="ck_digests_sequence"),
        sa.CheckConstraint("window_end > window_start", name="ck_digests_window"),
    )
    op.create_index(
        "ix_digests_due", "user_alert_digests", ["next_retry_at"],
        postgresql_where=sa.text("status = 'queued'"), sqlite_where=sa.text("status = 'queued'"),
    )
    op.create_index(
        "ix_digests_sending", "user_alert_digests", ["claimed_at"],
        postgresql_where=sa.text("status = 'sending'"), sqlite_where=sa.text("status = 'sending'"),
    )
    op.create_table(
        "user_alert_digest_items",
        sa.Column("digest_id", sa.Integer, sa.ForeignKey("user_alert_digests.id", ondelete="CASCADE"), nullable=False),
        sa.Column("delivery_id", sa.Integer, sa.ForeignKey("user_alert_deliveries.id", ondelete="CASCADE"),
                  nullable=False),
        sa.PrimaryKeyConstraint("digest_id", "delivery_id", name="pk_digest_items"),
        sa.UniqueConstraint("delivery_id", name="uq_digest_items_delivery"),
    )


def downgrade() -> None:
    op.drop_table("user_alert_digest_items")
    op.drop_index("ix_digests_sending", table_name="user_alert_digests")
    op.drop_index("ix_digests_due", table_name="user_alert_digests")
    op.drop_table("user_alert_digests")
