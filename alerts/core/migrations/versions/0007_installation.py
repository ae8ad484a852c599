"""an installation of its own; what an unsubscribe turned off; handled Telegram updates

- ``installation``: one row, made here — at the first ``alerts migrate`` — with a random
  identifier that every Message-ID carries, so two databases (staging and production)
  never produce the same Message-ID for different messages;
- ``user_alert_prefs.unsubscribed_at``: set on the preferences an unsubscribe turned off,
  so resubscribing turns back on exactly those, not the ones the subscriber had switched
  off before;
- ``telegram_updates``: the ``update_id`` of every Bot API update the webhook handled,
  so a repeated update does nothing and gets no second reply.

Revision ID: 0007_installation
Revises: 0006_collapse_index
Create Date: 2026-12-08
"""
import uuid

import sqlalchemy as sa
from alembic import op

revision = "0007_installation"
down_revision = "0006_collapse_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    installation = op.create_table(
        "installation",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("installation_id", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("id = 1", name="ck_installation_one_row"),
    )
    op.bulk_insert(installation, [{"id": 1, "installation_id": uuid.uuid4().hex[:12]}])
    with op.batch_alter_table("user_alert_prefs") as batch:
        batch.add_column(sa.Column("unsubscribed_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "telegram_updates",
        sa.Column("update_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("handled_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )


def downgrade() -> None:
    op.drop_table("telegram_updates")
    with op.batch_alter_table("user_alert_prefs") as batch:
        batch.drop_column("unsubscribed_at")
    op.drop_table("installation")
