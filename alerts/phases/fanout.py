"""Phase B — fan-out: one delivery per (user, event, channel) for every ready event
(SPEC §4 B).

Set-based, in one transaction, on PostgreSQL and SQLite alike:
1. take the ``ready`` events into a temporary table — the one id set both later
   statements use, so an event made ready meanwhile is neither half fanned out nor
   marked without its deliveries (on PostgreSQL the rows are locked, SKIP LOCKED);
2. one ``INSERT … SELECT … GROUP BY user, event, channel … ON CONFLICT DO NOTHING``
   joining those events to the enabled preferences of active users;
3. mark exactly those events ``fanned_out``.

Re-running is safe: the UNIQUE (user_id, alert_event_id, channel) constraint plus
ON CONFLICT DO NOTHING means a delivery is never created twice, whoever runs.
"""
from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from alerts import models as m
from alerts.channels.registry import ChannelSet
from alerts.clock import Clock
from alerts.config import Settings
from alerts.db import Database, is_postgres

ANY = "*"
COLUMNS = ["user_id", "alert_event_id", "channel", "delivery_kind", "status", "last_error", "created_at"]

_scratch = sa.MetaData()
# The ready events this run fans out, with the columns the match needs.
_events = sa.Table(
    "fanout_events", _scratch,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("alert_type", sa.Text, nullable=False),
    sa.Column("region", sa.Text),
    sa.Column("severity", sa.Integer, nullable=False),
    prefixes=["TEMPORARY"],
)


def run_phase_b(db: Database, clock: Clock, settings: Settings, channels: ChannelSet, *,
                event_id: int | None = None) -> dict:
    """Fan out every ready event (the caller holds the phase lock), or only ``event_id``
    (the event-driven path: no lock needed, SKIP LOCKED keeps a concurrent phase B off it)."""
    counts = {"events_fanned_out": 0, "deliveries_created": 0}
    now = clock.now()
    with db.transaction() as conn:
        if not _has_ready(conn, event_id):  # the usual case on a frequent schedule: no DDL at all
            return counts
        _events.create(conn)
        if _take_ready(conn, event_id):
            counts["deliveries_created"] = conn.execute(_insert_deliveries(conn, now)).rowcount
            counts["events_fanned_out"] = _mark_fanned_out(conn)
        _events.drop(conn)
    return counts


def _only(event_id: int | None) -> list[sa.ColumnElement]:
    return [] if event_id is None else [m.alert_events.c.id == event_id]


def _has_ready(conn: Connection, event_id: int | None = None) -> bool:
    e = m.alert_events
    return conn.execute(sa.select(e.c.id).where(e.c.status == "ready", *_only(event_id)).limit(1)).first() is not None


def _take_ready(conn: Connection, event_id: int | None = None) -> int:
    e = m.alert_events
    ready = (sa.select(e.c.id, e.c.alert_type, e.c.region, e.c.severity)
             .where(e.c.status == "ready", *_only(event_id)))
    if is_postgres(conn):
        ready = ready.with_for_update(skip_locked=True)
    taken = conn.execute(sa.insert(_events).from_select(["id", "alert_type", "region", "severity"], ready)).rowcount
    if taken and is_postgres(conn):
        conn.exec_driver_sql(f"ANALYZE {_events.name}")  # a fresh temp table has no statistics
    return taken


def _matches(now: datetime) -> sa.Select:
    """One row per matching (user, event, channel), in the column order of COLUMNS."""
    e, p, u = _events, m.user_alert_prefs, m.users
    # Several prefs can match one (user, event, channel), e.g. a '*' digest pref and a
    # specific instant one: instant wins. Spelled out rather than MAX(delivery_kind),
    # which would only work because 'instant' happens to sort after 'digest'.
    any_instant = sa.func.max(sa.case((p.c.delivery_kind == "instant", 1), else_=0)) == 1
    sms_digest = sa.and_(p.c.channel == "sms", sa.not_(any_instant))
    return (
        sa.select(
            p.c.user_id,
            e.c.id,
            p.c.channel,
            sa.case((any_instant, "instant"), else_="digest"),
            sa.case((sms_digest, "skipped"), else_="queued"),
            sa.case((sms_digest, m.SMS_DIGEST_NOT_SUPPORTED), else_=sa.null()),
            sa.literal(now, m.UTCDateTime()),
        )
        .select_from(e.join(p, sa.and_(
            sa.or_(p.c.alert_type == e.c.alert_type, p.c.alert_type == ANY),
            sa.or_(p.c.region == e.c.region, p.c.region == ANY),
            e.c.severity >= p.c.min_severity,
        )).join(u, u.c.id == p.c.user_id))
        # A WHERE clause also keeps SQLite from reading ON CONFLICT as a join constraint.
        .where(p.c.enabled, u.c.is_active)
        .group_by(p.c.user_id, e.c.id, p.c.channel)
    )


def _insert_deliveries(conn: Connection, now: datetime) -> sa.Insert:
    d = m.user_alert_deliveries
    insert = postgresql.insert(d) if is_postgres(conn) else sqlite.insert(d)
    return insert.from_select(COLUMNS, _matches(now)).on_conflict_do_nothing(
        index_elements=[d.c.user_id, d.c.alert_event_id, d.c.channel])


def _mark_fanned_out(conn: Connection) -> int:
    e = m.alert_events
    return conn.execute(
        sa.update(e).where(e.c.status == "ready", e.c.id.in_(sa.select(_events.c.id))).values(status="fanned_out")
    ).rowcount
