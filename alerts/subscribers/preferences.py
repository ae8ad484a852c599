"""A subscriber's preferences page (the route is alerts/web/preferences.py): what it shows,
how a submitted form becomes changes, and the one transaction that saves them.

    load(conn, user_id, settings, now) -> Page | None   everything the page shows
    read_form(page, form) -> (Changes, errors)           errors: field name -> message;
                                                         any error and nothing is saved
    save(conn, page, changes, now)                       all changes, in the caller's
                                                         transaction

The form's field names are fixed (FIELDS below, ``sub-<id>-…`` per subscription): the
template, the tests and anyone scripting the page use the same ones.

A channel is "on" while any of its subscriptions is enabled — the rule the sender uses
to skip a user who unsubscribed (alerts/sending/outbox.py). Turning a channel off is the
unsubscribe (alerts/subscribers/unsubscribe.py: its queued rows are skipped and its
enabled subscriptions marked); turning it on is the resubscribe (those come back on).
When a channel's switch changed, its subscriptions' own on/off boxes are not read.
Changes apply to events fanned out after the save: nothing already queued or built
moves (a digest keeps its window).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Mapping
from zoneinfo import available_timezones

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from alerts.core import tables as m
from alerts.core.settings import Settings
from alerts.core.timeofday import parse_time_of_day
from alerts.messages.render import SEVERITY_LABELS
from alerts.sending import blocks
from alerts.subscribers import telegram_bot
from alerts.subscribers import unsubscribe as unsub

# New subscriptions are for an alert type and a region seen in events of this long.
CHOICES_WINDOW = timedelta(days=90)
CHOICES_TTL = timedelta(minutes=10)  # how long the web app keeps them: a new type shows within that
MAX_CHOICES = 500  # per list, most frequent first then by name: a page stays small
ANY = "*"
CHANNEL_LABELS = {"email": "Email", "telegram": "Telegram", "sms": "SMS"}
CHANNEL_WORDS = {"email": "email", "telegram": "Telegram", "sms": "SMS"}  # inside a sentence
KIND_LABELS = {m.INSTANT: "At once", m.DIGEST: "In my digest"}
PERIOD_LABELS = {m.DAILY: "Daily", m.HOURLY: "Hourly"}
ON = "on"  # what a ticked checkbox sends

# Field names of the form.
CHANNEL_FIELD = "channel-{}"  # .format(channel): a checkbox, present only for a channel with subscriptions
NEW_TYPE, NEW_REGION, NEW_CHANNEL, NEW_KIND, NEW_SEVERITY = (
    "new-type", "new-region", "new-channel", "new-kind", "new-severity")
PERIOD, SEND_TIME, TIMEZONE, QUIET_START, QUIET_END = (
    "digest-period", "send-time", "timezone", "quiet-start", "quiet-end")


def sub_field(sub_id: int, name: str) -> str:
    """``sub-<id>-severity``, ``-kind``, ``-enabled``, ``-remove``."""
    return f"sub-{sub_id}-{name}"


@dataclass(frozen=True)
class Subscription:
    id: int
    alert_type: str
    region: str
    channel: str
    min_severity: int
    delivery_kind: str
    enabled: bool
    off_with_channel: bool  # turned off by an unsubscribe: back on with the channel


@dataclass(frozen=True)
class ChannelState:
    name: str
    label: str
    address: str | None  # masked
    on: bool  # some subscription on it is enabled
    subscriptions: int
    blocked: str | None  # the provider's reason while a block holds
    can_add: bool  # offered for a new subscription


@dataclass(frozen=True)
class Page:
    user_id: int
    plan: str
    channels: tuple[ChannelState, ...]
    subscriptions: tuple[Subscription, ...]
    periods: tuple[str, ...]  # the digest periods the user may choose (one: no choice)
    digest_period: str  # the period their digests have now
    send_time: str | None
    timezone: str | None
    quiet_hours: str | None
    alert_types: tuple[str, ...]  # for a new subscription, ANY first
    regions: tuple[str, ...]
    telegram_chat: str | None  # unmasked: only to make the connect link
    defaults: Mapping[str, object]  # the installation's defaults the page names

    def channel(self, name: str) -> ChannelState:
        return next(c for c in self.channels if c.name == name)

    @property
    def period_options(self) -> list[tuple[str, str]]:
        return [(period, PERIOD_LABELS[period]) for period in self.periods]

    @property
    def quiet_start(self) -> str:
        return (self.quiet_hours or "")[:5]

    @property
    def quiet_end(self) -> str:
        return (self.quiet_hours or "")[6:]


@dataclass
class Changes:
    removed: set[int] = field(default_factory=set)
    updated: dict[int, dict] = field(default_factory=dict)  # id -> column values
    added: list[dict] = field(default_factory=list)
    channels_off: list[str] = field(default_factory=list)
    channels_on: list[str] = field(default_factory=list)
    user: dict = field(default_factory=dict)  # users columns


# --- reading ---------------------------------------------------------------------------------

def load(conn: Connection, user_id: int, settings: Settings, now: datetime,
         choices: tuple[tuple[str, ...], tuple[str, ...]] | None = None) -> Page | None:
    """The page of ``user_id``, or None when there is no such user. ``choices``: what
    ``event_choices`` gave, when the caller keeps it for a while (it reads 90 days of events)."""
    u, p = m.users, m.user_alert_prefs
    user = conn.execute(sa.select(u).where(u.c.id == user_id)).mappings().first()
    if user is None:
        return None
    subs = tuple(Subscription(r.id, r.alert_type, r.region, r.channel, r.min_severity, r.delivery_kind, r.enabled,
                              r.unsubscribed_at is not None and not r.enabled)
                 for r in conn.execute(sa.select(p).where(p.c.user_id == user_id)
                                       .order_by(p.c.channel, p.c.alert_type, p.c.region, p.c.id)))
    blocked = {row.channel: row.reason for row in conn.execute(
        sa.select(blocks.b.c.channel, blocks.b.c.reason).select_from(blocks.b.join(u, u.c.id == blocks.b.c.user_id))
        .where(blocks.b.c.user_id == user_id, blocks.in_force(blocks.b)))}
    channels = []
    for name in m.CHANNELS:
        address = (user[m.RECIPIENT_COLUMNS[name]] or "").strip() or None
        mine = [s for s in subs if s.channel == name]
        can_add = address is not None or (name == "telegram" and bool(settings.telegram_bot_username))
        channels.append(ChannelState(name, CHANNEL_LABELS[name], unsub.mask_address(name, address),
                                     any(s.enabled for s in mine), len(mine), blocked.get(name), can_add))
    periods = (m.DAILY, m.HOURLY) if user["plan"] in settings.hourly_digest_plans else ()
    if settings.digest_period == m.HOURLY or not periods:
        periods = (settings.digest_period,)  # nothing to choose: the installation decides
    current = m.HOURLY if user["digest_period"] == m.HOURLY and m.HOURLY in periods and len(periods) > 1 \
        else settings.digest_period
    types, regions = choices if choices is not None else event_choices(conn, now)
    return Page(
        user_id=user_id, plan=user["plan"], channels=tuple(channels), subscriptions=subs,
        periods=periods, digest_period=current, send_time=user["digest_send_time"], timezone=user["timezone"],
        quiet_hours=user["quiet_hours"], alert_types=(ANY, *types), regions=(ANY, *regions),
        telegram_chat=(user["telegram_chat_id"] or "").strip() or None,
        defaults={"timezone": settings.timezone, "send_time": settings.digest_send_time,
                  "quiet_bypass": settings.quiet_hours_bypass_severity,
                  "digest_bypass": settings.digest_bypass_severity})


def event_choices(conn: Connection, now: datetime) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The alert types and regions of the events (any status but rejected) created in the
    last 90 days: what a new subscription may be for, besides ANY. One pass over those
    events: 0.2 s on PostgreSQL with 1M events over two years (the web app keeps the
    answer for CHOICES_TTL)."""
    e = m.alert_events
    recent = [e.c.created_at >= now - CHOICES_WINDOW, e.c.status != "rejected"]
    out = []
    for column in (e.c.alert_type, e.c.region):
        rows = conn.execute(sa.select(column).where(*recent, column.is_not(None), column != "", column != ANY)
                            .group_by(column).order_by(sa.func.count().desc(), column).limit(MAX_CHOICES))
        out.append(tuple(sorted(rows.scalars())))
    return out[0], out[1]


@lru_cache(maxsize=1)
def time_zones() -> tuple[str, ...]:
    """IANA zone names, sorted (legacy aliases such as "US/Eastern" included)."""
    return tuple(sorted(name for name in available_timezones() if name not in ("localtime", "Factory")))


# --- the form ----------------------------------------------------------------------------

def read_form(page: Page, form: Mapping[str, str]) -> tuple[Changes, dict[str, str]]:
    """The changes a submitted form asks for, and the errors that stop it (by field)."""
    changes, errors = Changes(), {}
    switched = _channel_switches(page, form, changes)
    kept = []
    for sub in page.subscriptions:
        if form.get(sub_field(sub.id, "remove")) == ON:
            changes.removed.add(sub.id)
            continue
        kept.append((sub.alert_type, sub.region, sub.channel))
        values = {}
        severity = _severity(form.get(sub_field(sub.id, "severity")), sub.min_severity,
                             sub_field(sub.id, "severity"), errors)
        if severity != sub.min_severity:
            values["min_severity"] = severity
        kind = _kind(form.get(sub_field(sub.id, "kind")), sub.delivery_kind, sub.channel,
                     sub_field(sub.id, "kind"), errors)
        if kind != sub.delivery_kind:
            values["delivery_kind"] = kind
        if sub.channel not in switched:
            enabled = form.get(sub_field(sub.id, "enabled")) == ON
            if enabled != sub.enabled:
                values.update(enabled=enabled, unsubscribed_at=None)
        if values:
            changes.updated[sub.id] = values
    _new_subscription(page, form, kept, changes, errors)
    _digest_settings(page, form, changes, errors)
    return changes, errors


def _channel_switches(page: Page, form: Mapping[str, str], changes: Changes) -> set[str]:
    switched = set()
    for channel in page.channels:
        if not channel.subscriptions:
            continue
        wanted = form.get(CHANNEL_FIELD.format(channel.name)) == ON
        if wanted != channel.on:
            (changes.channels_on if wanted else changes.channels_off).append(channel.name)
            switched.add(channel.name)
    return switched


def _severity(raw: str | None, current: int | None, name: str, errors: dict) -> int | None:
    if raw is None and current is not None:
        return current  # not in the form: unchanged
    try:
        value = int(raw or "")
    except ValueError:
        value = 0
    if value not in SEVERITY_LABELS:
        errors[name] = "Choose a minimum severity from 1 (low) to 5 (critical)."
        return current
    return value


def _kind(raw: str | None, current: str | None, channel: str | None, name: str, errors: dict) -> str | None:
    if raw is None and current is not None:
        return current
    if raw not in KIND_LABELS:
        errors[name] = "Choose “at once” or “in my digest”."
        return current
    if raw == m.DIGEST and channel == "sms" and raw != current:
        errors[name] = "Text messages come one alert at a time: choose “at once”, or email or Telegram for a digest."
        return current
    return raw


def _new_subscription(page: Page, form: Mapping[str, str], kept: list, changes: Changes, errors: dict) -> None:
    alert_type = (form.get(NEW_TYPE) or "").strip()
    if not alert_type:
        return  # nothing to add
    region = (form.get(NEW_REGION) or ANY).strip()
    channel = (form.get(NEW_CHANNEL) or "").strip()
    failed = len(errors)
    if alert_type not in page.alert_types:
        errors[NEW_TYPE] = "Choose an alert type from the list."
    if region not in page.regions:
        errors[NEW_REGION] = "Choose a region from the list."
    if channel not in [c.name for c in page.channels if c.can_add]:
        errors[NEW_CHANNEL] = "Choose one of your channels from the list."
    severity = _severity(form.get(NEW_SEVERITY) or "", None, NEW_SEVERITY, errors)
    kind = _kind(form.get(NEW_KIND) or "", None, channel, NEW_KIND, errors)
    if len(errors) > failed:
        return
    if (alert_type, region, channel) in kept:
        errors[NEW_TYPE] = (f"You already have a subscription to {type_label(alert_type)} in {region_label(region)} "
                            f"by {CHANNEL_WORDS[channel]}: change that one instead.")
        return
    changes.added.append({"alert_type": alert_type, "region": region, "channel": channel,
                          "min_severity": severity, "delivery_kind": kind, "enabled": True})


def _digest_settings(page: Page, form: Mapping[str, str], changes: Changes, errors: dict) -> None:
    user = changes.user
    if len(page.periods) > 1 and PERIOD in form:
        if form[PERIOD] not in page.periods:
            errors[PERIOD] = "Choose a digest period from the list."
        elif form[PERIOD] != page.digest_period:
            user["digest_period"] = form[PERIOD]
    if SEND_TIME in form:
        send_time = _time_of_day(form[SEND_TIME], SEND_TIME, errors)
        if send_time is not False and send_time != page.send_time:
            user["digest_send_time"] = send_time
    if TIMEZONE in form:
        zone = form[TIMEZONE].strip() or None
        if zone is not None and zone not in time_zones():
            errors[TIMEZONE] = "Choose a time zone from the list (an IANA name such as Europe/Amsterdam)."
        elif zone != page.timezone:
            user["timezone"] = zone
    if QUIET_START in form or QUIET_END in form:
        start = _time_of_day(form.get(QUIET_START, ""), QUIET_START, errors)
        end = _time_of_day(form.get(QUIET_END, ""), QUIET_END, errors)
        if start is False or end is False:
            return
        if (start is None) != (end is None):
            errors[QUIET_END if end is None else QUIET_START] = "Give both the start and the end, or neither."
            return
        if start is not None and start == end:
            errors[QUIET_END] = "Quiet hours must end at another time than they start."
            return
        quiet = None if start is None else f"{start}-{end}"
        if quiet != page.quiet_hours:
            user["quiet_hours"] = quiet


_LOOSE_TIME = re.compile(r"([0-9]{1,2}):([0-9]{2})(?::00)?")


def _time_of_day(raw: str, name: str, errors: dict) -> str | None | bool:
    """``HH:MM``, None when empty, False (and an error) when malformed. ``7:30`` and a
    browser's ``07:30:00`` are read as ``07:30``."""
    raw = (raw or "").strip()
    if not raw:
        return None
    match = _LOOSE_TIME.fullmatch(raw)
    text = f"{int(match.group(1)):02d}:{match.group(2)}" if match else raw
    try:
        parse_time_of_day(text)
    except ValueError:
        errors[name] = "Enter a time of day as HH:MM, from 00:00 to 23:59."
        return False
    return text


# --- saving ----------------------------------------------------------------------------

def save(conn: Connection, page: Page, changes: Changes, now: datetime) -> None:
    """Apply ``changes`` (read from a form without errors) — in the caller's transaction,
    so a failure (a duplicate added meanwhile: IntegrityError) leaves nothing half-done."""
    p, u = m.user_alert_prefs, m.users
    mine = p.c.user_id == page.user_id
    if changes.removed:
        conn.execute(sa.delete(p).where(mine, p.c.id.in_(changes.removed)))
    for sub_id, values in changes.updated.items():
        conn.execute(sa.update(p).where(mine, p.c.id == sub_id).values(**values))
    for values in changes.added:
        conn.execute(sa.insert(p).values(user_id=page.user_id, created_at=now, **values))
    for channel in changes.channels_off:
        unsub.unsubscribe(conn, page.user_id, channel, now)
    for channel in changes.channels_on:
        unsub.resubscribe(conn, page.user_id, channel)
    if changes.user:
        conn.execute(sa.update(u).where(u.c.id == page.user_id).values(**changes.user))


def connect_link(page: Page, settings: Settings, now: datetime) -> str | None:
    """The t.me link that connects a Telegram chat, valid 24 hours from ``now``."""
    return telegram_bot.connect_link(settings, page.user_id, page.telegram_chat, now)


# --- labels the page shows ------------------------------------------------------------------

def type_label(alert_type: str) -> str:
    return "any type of alert" if alert_type == ANY else alert_type


def region_label(region: str) -> str:
    return "any region" if region == ANY else region


def severity_choices() -> list[tuple[int, str]]:
    return [(n, f"{n} — {label}") for n, label in sorted(SEVERITY_LABELS.items())]
