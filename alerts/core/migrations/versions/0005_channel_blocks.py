"""destination health (docs/policy.md): user_channel_blocks

One row per (user, channel) whose destination a provider said is gone: the address that
failed and the provider's reason. Phase C skips that destination while the user's address
is still the blocked one.

Revision ID: 0005_channel_blocks
Revises: 0004_delivery_policy
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

revision = "0005_channel_blocks"
down_revision = "0004_delivery_policy"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "user_channel_blocks",
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("channel", sa.Text, nullable=False),
        sa.Column("address", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("user_id", "channel", name="pk_user_channel_blocks"),
        sa.CheckConstraint("channel IN ('email', 'telegram', 'sms')", name="ck_blocks_channel"),
    )


def downgrade() -> None:
    op.drop_table("user_channel_blocks")
