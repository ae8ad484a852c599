"""Table definitions (SQLAlchemy Core) and the one home of the names stored in them:
statuses, channels, periods and the reasons the pipeline itself writes to ``last_error``.
The migrations in ``alerts/core/migrations/`` create the tables; these objects are what the phases
query with."""
from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData()

CHANNELS = ("email", "telegram", "sms")
DIGEST_CHANNELS = ("email", "telegram")
# The users column that holds each channel's address.
RECIPIENT_COLUMNS = {"email": "email", "telegram": "telegram_chat_id", "sms": "phone"}
DELIVERY_KINDS = INSTANT, DIGEST = ("instant", "digest")
EVENT_STATUSES = ("new", "ready", "rejected", "fanned_out")
SEND_STATUSES = QUEUED, SENDING, SENT, FAILED, SKIPPED = ("queued", "sending", "sent", "failed", "skipped")
DIGEST_PERIODS = DAILY, HOURLY = ("daily", "hourly")

# What the pipeline writes to last_error (providers' reasons come from the channels).
BATCHED_INTO_DIGEST = "batched_into_digest"
SMS_DIGEST_NOT_SUPPORTED = "sms_digest_not_supported"
USER_INACTIVE = "user is inactive"
DIGEST_WITHOUT_ITEMS = "digest has no items"
# docs/web-and-security.md: skipped because the user unsubscribed from the channel (alerts/subscribers/unsubscribe.py).
UNSUBSCRIBED = "unsubscribed"


# A row failed by our own error (rendering, an unexpected exception), not by a provider:
# followed by the exception's type; `alerts check` reports these.
INTERNAL_ERROR = "internal error:"

# A refusal of our own credentials — SMTP 530/535, Twilio 401/403, Telegram 401: the
# operator's to fix, never the recipients' fault, so transient (the rows wait) and never
# a block. Starts last_error, the provider's words follow; `alerts check` reports these.
CREDENTIALS_REFUSED = "credentials refused:"


def credentials_refused(reason: str) -> str:
    return f"{CREDENTIALS_REFUSED} {reason}"


DESTINATION_DISABLED = "destination_disabled"  # §11.3: the block's reason follows


def destination_disabled(reason: str) -> str:
    return f"{DESTINATION_DISABLED}: {reason}"


SUPERSEDED_BY = "superseded by #"  # + the id of the newer event of the same collapse_key (§10.3)
MAX_COLLAPSE_KEY_CHARS = 200


def superseded_by(event_id: int) -> str:
    return f"{SUPERSEDED_BY}{event_id}"


def no_address(channel: str) -> str:
    return f"recipient has no {RECIPIENT_COLUMNS[channel]}"


def send_interrupted(lease_seconds: int, used_up: bool) -> str:
    reason = f"send interrupted: no outcome within the {lease_seconds}s lease"
    return reason + " (attempts used up)" if used_up else reason


class UTCDateTime(sa.TypeDecorator):
    """Timestamps stored in UTC and always read back timezone-aware (also on SQLite)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given for a UTC timestamp column")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if isinstance(value, str):  # SQLite server defaults come back as text
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("email", sa.Text),
    sa.Column("telegram_chat_id", sa.Text),
    sa.Column("phone", sa.Text),
    sa.Column("plan", sa.Text, nullable=False, server_default="free"),
    sa.Column("timezone", sa.Text),
    sa.Column("digest_period", sa.Text),
    sa.Column("is_active", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("created_at", UTCDateTime, nullable=False, server_default=sa.func.now()),
    # docs/policy.md (migration 0004, which also holds their format CHECKs): the user's local
    # time of day that ends one daily window (HH:MM) and their quiet period (HH:MM-HH:MM).
    sa.Column("digest_send_time", sa.Text),
    sa.Column("quiet_hours", sa.Text),
    sa.CheckConstraint(
        "digest_period IS NULL OR " + _in("digest_period", DIGEST_PERIODS), name="ck_users_digest_period"
    ),
)

user_alert_prefs = sa.Table(
    "user_alert_prefs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("alert_type", sa.Text, nullable=False),
    sa.Column("region", sa.Text, nullable=False, server_default="*"),
    sa.Column("min_severity", sa.Integer, nullable=False, server_default="1"),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("delivery_kind", sa.Text, nullable=False, server_default="instant"),
    sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("created_at", UTCDateTime, nullable=False, server_default=sa.func.now()),
    # Set when an unsubscribe turned this preference off: resubscribing turns on these only.
    sa.Column("unsubscribed_at", UTCDateTime, nullable=True),
    sa.UniqueConstraint("user_id", "alert_type", "region", "channel", name="uq_prefs_user_type_region_channel"),
    sa.CheckConstraint("min_severity BETWEEN 1 AND 5", name="ck_prefs_min_severity"),
    sa.CheckConstraint(_in("channel", CHANNELS), name="ck_prefs_channel"),
    sa.CheckConstraint(_in("delivery_kind", DELIVERY_KINDS), name="ck_prefs_delivery_kind"),
)

alert_events = sa.Table(
    "alert_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("event_key", sa.Text, nullable=False, unique=True),
    sa.Column("alert_type", sa.Text, nullable=False),
    sa.Column("region", sa.Text),
    sa.Column("severity", sa.Integer, nullable=False),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("summary", sa.Text),
    sa.Column("url", sa.Text),
    sa.Column("payload", JSONType),
    sa.Column("status", sa.Text, nullable=False, server_default="new"),
    sa.Column("reject_reason", sa.Text),
    sa.Column("created_at", UTCDateTime, nullable=False, server_default=sa.func.now()),
    # docs/policy.md (migration 0004): the producer's key for one story told in several events.
    sa.Column("collapse_key", sa.Text),
    sa.CheckConstraint(_in("status", EVENT_STATUSES), name="ck_events_status"),
)


def _send_state_columns() -> list[sa.Column]:
    """The columns of a row Phase C sends (a delivery or a digest): claim, retry, outcome."""
    return [
        sa.Column("status", sa.Text, nullable=False, server_default="queued"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_retry_at", UTCDateTime),
        sa.Column("last_error", sa.Text),
        sa.Column("sent_at", UTCDateTime),
        # When the current claim was taken; a `sending` row older than the lease is abandoned.
        sa.Column("claimed_at", UTCDateTime),
        sa.Column("created_at", UTCDateTime, nullable=False, server_default=sa.func.now()),
        # When a Celery send task was last published for the row (migration 0003, alerts/sending/dispatch.py).
        sa.Column("enqueued_at", UTCDateTime),
    ]


user_alert_deliveries = sa.Table(
    "user_alert_deliveries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("alert_event_id", sa.Integer, sa.ForeignKey("alert_events.id", ondelete="CASCADE"), nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("delivery_kind", sa.Text, nullable=False),
    *_send_state_columns(),
    sa.UniqueConstraint("user_id", "alert_event_id", "channel", name="uq_deliveries_user_event_channel"),
    sa.CheckConstraint(_in("channel", CHANNELS), name="ck_deliveries_channel"),
    sa.CheckConstraint(_in("delivery_kind", DELIVERY_KINDS), name="ck_deliveries_delivery_kind"),
    sa.CheckConstraint(_in("status", SEND_STATUSES), name="ck_deliveries_status"),
    sa.CheckConstraint("attempts >= 0", name="ck_deliveries_attempts"),
)


def _partial_index(name: str, table: sa.Table, status: str, *columns: str) -> sa.Index:
    """An index over the rows in one status only, on both databases."""
    return sa.Index(name, *(table.c[c] for c in columns),
                    postgresql_where=table.c.status == status, sqlite_where=table.c.status == status)


# Partial indexes keep the "what is due" and "what is stuck" scans small however large
# history grows.
_partial_index("ix_deliveries_due", user_alert_deliveries, "queued", "delivery_kind", "next_retry_at")
_partial_index("ix_deliveries_sending", user_alert_deliveries, "sending", "claimed_at")
sa.Index("ix_deliveries_event", user_alert_deliveries.c.alert_event_id)
sa.Index(
    "ix_events_status_new",
    alert_events.c.status,
    postgresql_where=alert_events.c.status.in_(("new", "ready")),
    sqlite_where=alert_events.c.status.in_(("new", "ready")),
)
sa.Index("ix_prefs_match", user_alert_prefs.c.alert_type, user_alert_prefs.c.region)
# Migration 0006: Phase B's look-ups for collapse (§10.3) and quiet hours (§10.4).
_has_key, _has_quiet = alert_events.c.collapse_key.is_not(None), users.c.quiet_hours.is_not(None)
sa.Index("ix_events_collapse_key", alert_events.c.collapse_key, postgresql_where=_has_key, sqlite_where=_has_key)
sa.Index("ix_users_quiet_hours", users.c.timezone, users.c.quiet_hours,
         postgresql_where=_has_quiet, sqlite_where=_has_quiet)

# --- digests (migration 0002) -----------------------------------------------------------

user_alert_digests = sa.Table(
    "user_alert_digests",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("period", sa.Text, nullable=False),
    sa.Column("window_start", UTCDateTime, nullable=False),
    sa.Column("window_end", UTCDateTime, nullable=False),
    # 0 for a window's first digest; a late delivery whose window's digest already left
    # `queued` goes into a follow-up digest with the next sequence.
    sa.Column("sequence", sa.Integer, nullable=False, server_default="0"),
    sa.Column("digest_key", sa.Text, nullable=False),
    *_send_state_columns(),
    sa.UniqueConstraint("digest_key", name="uq_digests_digest_key"),
    sa.UniqueConstraint("user_id", "channel", "period", "window_start", "sequence", name="uq_digests_window_sequence"),
    sa.CheckConstraint(_in("channel", DIGEST_CHANNELS), name="ck_digests_channel"),
    sa.CheckConstraint(_in("period", DIGEST_PERIODS), name="ck_digests_period"),
    sa.CheckConstraint(_in("status", SEND_STATUSES), name="ck_digests_status"),
    sa.CheckConstraint("attempts >= 0", name="ck_digests_attempts"),
    sa.CheckConstraint("sequence >= 0", name="ck_digests_sequence"),
    sa.CheckConstraint("window_end > window_start", name="ck_digests_window"),
)
_partial_index("ix_digests_due", user_alert_digests, "queued", "next_retry_at")
_partial_index("ix_digests_sending", user_alert_digests, "sending", "claimed_at")

user_alert_digest_items = sa.Table(
    "user_alert_digest_items",
    metadata,
    sa.Column("digest_id", sa.Integer, sa.ForeignKey("user_alert_digests.id", ondelete="CASCADE"), nullable=False),
    sa.Column("delivery_id", sa.Integer, sa.ForeignKey("user_alert_deliveries.id", ondelete="CASCADE"),
              nullable=False),
    sa.PrimaryKeyConstraint("digest_id", "delivery_id", name="pk_digest_items"),
    sa.UniqueConstraint("delivery_id", name="uq_digest_items_delivery"),
)

# --- destination health (migration 0005) ---------------------------------------------------

user_channel_blocks = sa.Table(
    "user_channel_blocks",
    metadata,
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("address", sa.Text, nullable=False),  # the address that failed
    sa.Column("reason", sa.Text, nullable=False),  # the provider's words
    sa.Column("created_at", UTCDateTime, nullable=False, server_default=sa.func.now()),
    sa.PrimaryKeyConstraint("user_id", "channel", name="pk_user_channel_blocks"),
    sa.CheckConstraint(_in("channel", CHANNELS), name="ck_blocks_channel"),
)


# --- installation, Telegram updates (migration 0007) ----------------------------------------

# One row, made at the first `alerts migrate`: the identifier every Message-ID carries.
installation = sa.Table(
    "installation",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("installation_id", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False, server_default=sa.func.now()),
    sa.CheckConstraint("id = 1", name="ck_installation_one_row"),
)

# The Bot API updates the webhook has handled: each is handled once.
telegram_updates = sa.Table(
    "telegram_updates",
    metadata,
    sa.Column("update_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("handled_at", UTCDateTime, nullable=False, server_default=sa.func.now()),
)
