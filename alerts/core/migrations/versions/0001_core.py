"""core tables: users, user_alert_prefs, alert_events, user_alert_deliveries

Revision ID: 0001_core
Revises:
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001_core"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def _now():
    return sa.func.now()


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", sa.Text),
        sa.Column("telegram_chat_id", sa.Text),
        sa.Column("phone", sa.Text),
        sa.Column("plan", sa.Text, nullable=False, server_default="free"),
        sa.Column("timezone", sa.Text),
        sa.Column("digest_period", sa.Text),
        sa.Column("is_active", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("created_at", TS, nullable=False, server_default=_now()),
        sa.CheckConstraint("digest_period IS NULL OR digest_period IN ('daily', 'hourly')", name="ck_users_digest_period"),
    )
    op.create_table(
        "user_alert_prefs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("alert_type", sa.Text, nullable=False),
        sa.Column("region", sa.Text, nullable=False, server_default="*"),
        sa.Column("min_severity", sa.Integer, nullable=False, server_default="1"),
        sa.Column("channel", sa.Text, nullable=False),
        sa.Column("delivery_kind", sa.Text, nullable=False, server_default="instant"),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("created_at", TS, nullable=False, server_default=_now()),
        sa.UniqueConstraint("user_id", "alert_type", "region", "channel", name="uq_prefs_user_type_region_channel"),
        sa.CheckConstraint("min_severity BETWEEN 1 AND 5", name="ck_prefs_min_severity"),
        sa.CheckConstraint("channel IN ('email', 'telegram', 'sms')", name="ck_prefs_channel"),
        sa.CheckConstraint("delivery_kind IN ('instant', 'digest')", name="ck_prefs_delivery_kind"),
    )
    op.create_index("ix_prefs_match", "user_alert_prefs", ["alert_type", "region"])
    op.create_table(
        "alert_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("event_key", sa.Text, nullable=False, unique=True),
        sa.Column("alert_type", sa.Text, nullable=False),
        sa.Column("region", sa.Text),
        sa.Column("severity", sa.Integer, nullable=False),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("summary", sa.Text),
        sa.Column("url", sa.Text),
        sa.Column("payload", sa.JSON().with_variant(JSONB(), "postgresql")),
        sa.Column("status", sa.Text, nullable=False, server_default="new"),
        sa.Column("reject_reason", sa.Text),
        sa.Column("created_at", TS, nullable=False, server_default=_now()),
        sa.CheckConstraint("status IN ('new', 'ready', 'rejected', 'fanned_out')", name="ck_events_status"),
    )
    op.create_index(
        "ix_events_status_new", "alert_events", ["status"],
        postgresql_where=sa.text("status IN ('new', 'ready')"),
        sqlite_where=sa.text("status IN ('new', 'ready')"),
    )
    op.create_table(
        "user_alert_deliveries",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("alert_event_id", sa.Integer, sa.ForeignKey("alert_events.id", ondelete="CASCADE"), nullable=False),
        sa.Column("channel", sa.Text, nullable=False),
        sa.Column("delivery_kind", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default="queued"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_retry_at", TS),
        sa.Column("last_error", sa.Text),
        sa.Column("sent_at", TS),
        sa.Column("claimed_at", TS),
        sa.Column("created_at", TS, nullable=False, server_default=_now()),
        sa.UniqueConstraint("user_id", "alert_event_id", "channel", name="uq_deliveries_user_event_channel"),
        sa.CheckConstraint("channel IN ('email', 'telegram', 'sms')", name="ck_deliveries_channel"),
        sa.CheckConstraint("delivery_kind IN ('instant', 'digest')", name="ck_deliveries_delivery_kind"),
        sa.CheckConstraint(
            "status IN ('queued', 'sending', 'sent', 'failed', 'skipped')", name="ck_deliveries_status"
        ),
        sa.CheckConstraint("attempts >= 0", name="ck_deliveries_attempts"),
    )
    op.create_index(
        "ix_deliveries_due", "user_alert_deliveries", ["delivery_kind", "next_retry_at"],
        postgresql_where=sa.text("status = 'queued'"), sqlite_where=sa.text("status = 'queued'"),
    )
    op.create_index(
        "ix_deliveries_sending", "user_alert_deliveries", ["claimed_at"],
        postgresql_where=sa.text("status = 'sending'"), sqlite_where=sa.text("status = 'sending'"),
    )
    op.create_index("ix_deliveries_event", "user_alert_deliveries", ["alert_event_id"])


def downgrade() -> None:
    op.drop_table("user_alert_deliveries")
    op.drop_table("alert_events")
    op.drop_table("user_alert_prefs")
    op.drop_table("users")
