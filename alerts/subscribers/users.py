"""Users and their subscriptions for operators (``alerts users``, alerts/cli/users.py):
checking what an operator typed, and the reads and writes behind each command.

Every check raises ``Invalid(option, problem)`` naming the command-line option, before
anything is written; each write is one statement in the caller's transaction.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from alerts.core import tables as m
from alerts.sending import blocks

MAX_TEXT_CHARS = 64  # alert types, regions and plans, as Phase A bounds an event's
ALERT_TYPE = re.compile(r"[a-z0-9_.-]+")  # Phase A's rule for an event's alert_type
EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
PHONE = re.compile(r"\+[1-9][0-9]{6,14}")  # E.164, as Twilio takes it
CHAT_ID = re.compile(r"-?[1-9][0-9]{0,19}")


class Invalid(ValueError):
    def __init__(self, option: str, problem: str):
        super().__init__(problem)
        self.option = option
        self.problem = problem


class NoSuchUser(LookupError):
    def __init__(self, user_id: int):
        super().__init__(f"user {user_id} does not exist")
        self.user_id = user_id


# --- checks ------------------------------------------------------------------------------

def check_email(value: str | None) -> str | None:
    if value is None:
        return None
    if not EMAIL.fullmatch(value) or not value.isprintable() or len(value) > 254:
        raise Invalid("--email", f"not an email address: {value!r}")
    return value


def check_chat_id(value: str | None) -> str | None:
    if value is None:
        return None
    if not CHAT_ID.fullmatch(value):
        raise Invalid("--telegram-chat-id", f"a Telegram chat id is a whole number, e.g. 123456789 or "
                                            f"-1001234567890 (got {value!r})")
    return value


def check_phone(value: str | None) -> str | None:
    if value is None:
        return None
    if not PHONE.fullmatch(value):
        raise Invalid("--phone", f"a phone number in international form, e.g. +31612345678 (got {value!r})")
    return value


def check_timezone(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise Invalid("--timezone", f"unknown IANA time zone {value!r} (e.g. Europe/Amsterdam)") from None
    return value


def check_plan(value: str | None) -> str | None:
    if value is None:
        return None
    if not value.strip() or len(value) > MAX_TEXT_CHARS or not value.isprintable():
        raise Invalid("--plan", f"a plan name of 1 to {MAX_TEXT_CHARS} printable characters (got {value!r})")
    return value


def check_alert_type(value: str) -> str:
    if value != "*" and (len(value) > MAX_TEXT_CHARS or not ALERT_TYPE.fullmatch(value)):
        raise Invalid("--type", f"an alert type of lowercase letters, digits, '_', '.' or '-' (at most "
                                f"{MAX_TEXT_CHARS}), or '*' for any (got {value!r})")
    return value


def check_region(value: str) -> str:
    if not value.strip() or value != value.strip() or len(value) > MAX_TEXT_CHARS or not value.isprintable():
        raise Invalid("--region", f"a region of 1 to {MAX_TEXT_CHARS} printable characters, or '*' for any "
                                  f"(got {value!r})")
    return value


# --- writes ---------------------------------------------------------------------------------

def add_user(conn: Connection, *, email: str | None = None, telegram_chat_id: str | None = None,
             phone: str | None = None, timezone: str | None = None, plan: str | None = None) -> int:
    """A new user; their id. An email address another user already has is refused."""
    u = m.users
    email, telegram_chat_id, phone = check_email(email), check_chat_id(telegram_chat_id), check_phone(phone)
    timezone, plan = check_timezone(timezone), check_plan(plan)
    if email is not None:
        other = conn.execute(sa.select(u.c.id).where(sa.func.lower(u.c.email) == email.lower())
                             .order_by(u.c.id).limit(1)).scalar()
        if other is not None:
            raise Invalid("--email", f"user {other} already has this address")
    values = {"email": email, "telegram_chat_id": telegram_chat_id, "phone": phone, "timezone": timezone}
    if plan is not None:
        values["plan"] = plan
    return conn.execute(sa.insert(u).values(**values).returning(u.c.id)).scalar_one()


def subscribe(conn: Connection, user_id: int, *, alert_type: str, region: str, channel: str, kind: str,
              min_severity: int, now: datetime) -> int:
    """A new subscription (``user_alert_prefs`` row), on; its id."""
    p = m.user_alert_prefs
    alert_type, region = check_alert_type(alert_type), check_region(region)
    if channel not in m.CHANNELS:
        raise Invalid("--channel", f"one of {', '.join(m.CHANNELS)} (got {channel!r})")
    if kind not in m.DELIVERY_KINDS:
        raise Invalid("--kind", f"one of {', '.join(m.DELIVERY_KINDS)} (got {kind!r})")
    if channel == "sms" and kind == m.DIGEST:
        raise Invalid("--kind", "SMS has no digest: use --kind instant, or email or telegram for a digest")
    if not 1 <= min_severity <= 5:
        raise Invalid("--min-severity", f"from 1 (low) to 5 (critical) (got {min_severity})")
    require_user(conn, user_id)
    existing = conn.execute(sa.select(p.c.id).where(p.c.user_id == user_id, p.c.alert_type == alert_type,
                                                    p.c.region == region, p.c.channel == channel)).scalar()
    if existing is not None:
        raise Invalid("--type", f"user {user_id} already has a subscription to {alert_type} in {region} by "
                                f"{channel} (id {existing})")
    return conn.execute(sa.insert(p).values(user_id=user_id, alert_type=alert_type, region=region, channel=channel,
                                            delivery_kind=kind, min_severity=min_severity, created_at=now)
                        .returning(p.c.id)).scalar_one()


# --- reads ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class UserReport:
    user: dict
    subscriptions: list[dict]
    blocks: list[dict]
    unsubscribed: list[str]  # channels with subscriptions, none of them on

    def as_dict(self) -> dict:
        return {"user": self.user, "subscriptions": self.subscriptions, "blocks": self.blocks,
                "unsubscribed": self.unsubscribed}


USER_COLUMNS = ("id", "email", "telegram_chat_id", "phone", "plan", "timezone", "digest_period",
                "digest_send_time", "quiet_hours", "is_active", "created_at")


def list_users(conn: Connection) -> list[dict]:
    """Every user with the number of their subscriptions (and how many are on), by id."""
    u, p = m.users, m.user_alert_prefs
    counts = (sa.select(p.c.user_id, sa.func.count().label("subscriptions"),
                        sa.func.sum(sa.case((p.c.enabled, 1), else_=0)).label("on"))
              .group_by(p.c.user_id).subquery())
    rows = conn.execute(sa.select(*(u.c[c] for c in USER_COLUMNS),
                                  sa.func.coalesce(counts.c.subscriptions, 0).label("subscriptions"),
                                  sa.func.coalesce(counts.c.on, 0).label("subscriptions_on"))
                        .select_from(u.outerjoin(counts, counts.c.user_id == u.c.id)).order_by(u.c.id)).mappings()
    return [dict(row) for row in rows]


def show_user(conn: Connection, user_id: int) -> UserReport:
    u, p, b = m.users, m.user_alert_prefs, m.user_channel_blocks
    user = conn.execute(sa.select(*(u.c[c] for c in USER_COLUMNS)).where(u.c.id == user_id)).mappings().first()
    if user is None:
        raise NoSuchUser(user_id)
    subs = [dict(r) for r in conn.execute(
        sa.select(p.c.id, p.c.alert_type, p.c.region, p.c.channel, p.c.delivery_kind, p.c.min_severity, p.c.enabled,
                  p.c.unsubscribed_at).where(p.c.user_id == user_id)
        .order_by(p.c.channel, p.c.alert_type, p.c.region, p.c.id)).mappings()]
    holds = b.c.address == blocks.current_address(b.c.channel)
    found = [{**r, "in_force": bool(r["in_force"])} for r in conn.execute(
        sa.select(b.c.channel, b.c.address, b.c.reason, b.c.created_at.label("since"),
                  sa.case((holds, sa.true()), else_=sa.false()).label("in_force"))
        .select_from(b.join(u, u.c.id == b.c.user_id)).where(b.c.user_id == user_id).order_by(b.c.channel)).mappings()]
    unsubscribed = [c for c in m.CHANNELS if any(s["channel"] == c for s in subs)
                    and not any(s["enabled"] for s in subs if s["channel"] == c)]
    return UserReport(dict(user), subs, found, unsubscribed)


def require_user(conn: Connection, user_id: int) -> dict:
    """The user's id and current Telegram chat; NoSuchUser when there is none."""
    u = m.users
    row = conn.execute(sa.select(u.c.id, u.c.telegram_chat_id).where(u.c.id == user_id)).mappings().first()
    if row is None:
        raise NoSuchUser(user_id)
    return dict(row)

