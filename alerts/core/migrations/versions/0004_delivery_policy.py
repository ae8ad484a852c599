"""delivery policy (docs/policy.md): users.digest_send_time, users.quiet_hours, alert_events.collapse_key

Both user columns carry CHECK constraints on their format, written so they mean the same
on PostgreSQL and SQLite (no regular expressions, no collation-dependent ranges: only
exact characters): a malformed value is refused by the database, never silently ignored.

Revision ID: 0004_delivery_policy
Revises: 0003_enqueue_marks
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

revision = "0004_delivery_policy"
down_revision = "0003_enqueue_marks"
branch_labels = None
depends_on = None

DIGITS = "'0', '1', '2', '3', '4', '5', '6', '7', '8', '9'"


def hhmm(expr: str) -> str:
    """SQL that is true when ``expr`` is a 24-hour HH:MM (00:00 … 23:59)."""
    c = lambda n: f"substr({expr}, {n}, 1)"  # noqa: E731
    return (f"(length({expr}) = 5 AND {c(3)} = ':'"
            f" AND (({c(1)} IN ('0', '1') AND {c(2)} IN ({DIGITS})) OR ({c(1)} = '2' AND {c(2)} IN ('0', '1', '2', '3')))"
            f" AND {c(4)} IN ('0', '1', '2', '3', '4', '5') AND {c(5)} IN ({DIGITS}))")


SEND_TIME_CHECK = f"digest_send_time IS NULL OR {hhmm('digest_send_time')}"
QUIET_HOURS_CHECK = (f"quiet_hours IS NULL OR (length(quiet_hours) = 11 AND substr(quiet_hours, 6, 1) = '-'"
                     f" AND {hhmm('substr(quiet_hours, 1, 5)')} AND {hhmm('substr(quiet_hours, 7, 5)')}"
                     f" AND substr(quiet_hours, 1, 5) <> substr(quiet_hours, 7, 5))")


def upgrade() -> None:
    # ADD COLUMN with a column CHECK, on both databases: no table rebuild (on SQLite a
    # rebuild of users would cascade-delete every row that references it), and instant on
    # PostgreSQL however large the table (nullable, no default).
    op.add_column("users", sa.Column("digest_send_time", sa.Text,
                                     sa.CheckConstraint(SEND_TIME_CHECK, name="ck_users_digest_send_time")))
    op.add_column("users", sa.Column("quiet_hours", sa.Text,
                                     sa.CheckConstraint(QUIET_HOURS_CHECK, name="ck_users_quiet_hours")))
    op.add_column("alert_events", sa.Column("collapse_key", sa.Text))


def downgrade() -> None:
    # PostgreSQL drops a column's CHECK with it; SQLite (3.35+) refuses to drop a column
    # its CHECK names, so there the columns stay (downgrades are for development only).
    if op.get_bind().dialect.name == "postgresql":
        for column in ("quiet_hours", "digest_send_time"):
            op.drop_column("users", column)
    op.drop_column("alert_events", "collapse_key")
