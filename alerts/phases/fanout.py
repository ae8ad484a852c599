"""Phase B — fan-out: one delivery per (user, event, channel) for every ready event
(docs/architecture.md).

Set-based, in one transaction, on PostgreSQL and SQLite alike:
1. take the ``ready`` events into a temporary table — the one id set both later
   statements use, so an event made ready meanwhile is neither half fanned out nor
   marked without its deliveries (on PostgreSQL the rows are locked, SKIP LOCKED);
2. one ``INSERT … SELECT … GROUP BY user, event, channel … ON CONFLICT DO NOTHING``
   joining those events to the enabled preferences of active users;
3. mark exactly those events ``fanned_out``;
4. when some of those events carry a ``collapse_key`` (§10.3): supersede the older queued
   instant deliveries of each (user, channel, key) they touched.

Delivery policy (docs/policy.md), folded into statement 2 so it stays one statement:
- *bypass* (``ALERTS_DIGEST_BYPASS_SEVERITY``): from that severity a matching digest pref
  makes an instant delivery (an sms digest pref too: an instant SMS);
- *quiet hours*: an instant delivery below ``ALERTS_QUIET_HOURS_BYPASS_SEVERITY`` for a
  user inside their quiet period is created with ``next_retry_at`` = the period's end.
  The end depends only on (zone, quiet_hours, now), so it is computed in Python
  (``alerts.policy.quiet_hours``, the one place that knows DST) for the few distinct pairs the
  users have and joined in from a temporary table — the same on both databases.

Re-running is safe: the UNIQUE (user_id, alert_event_id, channel) constraint plus
ON CONFLICT DO NOTHING means a delivery is never created twice, whoever runs.
"""
from __future__ import annotations

import logging
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from alerts.core import tables as m
from alerts.channels.registry import ChannelSet
from alerts.core.clock import Clock
from alerts.core.settings import Settings
from alerts.core.db import Database, is_postgres
from alerts.policy.quiet_hours import release_at
from alerts.policy.windows import resolve_timezone

log = logging.getLogger(__name__)

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
    sa.Column("collapse_key", sa.Text),
    prefixes=["TEMPORARY"],
)
# The quiet periods ``now`` is inside: (zone as the user wrote it, quiet_hours) -> end.
_quiet = sa.Table(
    "fanout_quiet", _scratch,
    sa.Column("tz", sa.Text, primary_key=True),  # users.timezone, '' for NULL
    sa.Column("quiet_hours", sa.Text, primary_key=True),
    sa.Column("release_at", m.UTCDateTime, nullable=False),
    prefixes=["TEMPORARY"],
)
# Queued instant deliveries an event of this run has superseded, with the reason.
_superseded = sa.Table(
    "fanout_superseded", _scratch,
    sa.Column("delivery_id", sa.Integer, primary_key=True),
    sa.Column("reason", sa.Text, nullable=False),
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
            quiet = _quiet_periods(conn, now, settings)
            counts["deliveries_created"] = conn.execute(_insert_deliveries(conn, now, settings, quiet)).rowcount
            counts["events_fanned_out"] = _mark_fanned_out(conn)
            if quiet:
                _quiet.drop(conn)
            superseded = _supersede(conn)
            if superseded:
                log.info("phase b: %d queued instant deliveries superseded by newer events", superseded)
        _events.drop(conn)
    return counts


def _only(event_id: int | None) -> list[sa.ColumnElement]:
    return [] if event_id is None else [m.alert_events.c.id == event_id]


def _has_ready(conn: Connection, event_id: int | None = None) -> bool:
    e = m.alert_events
    return conn.execute(sa.select(e.c.id).where(e.c.status == "ready", *_only(event_id)).limit(1)).first() is not None


def _take_ready(conn: Connection, event_id: int | None = None) -> int:
    e = m.alert_events
    columns = ["id", "alert_type", "region", "severity", "collapse_key"]
    ready = sa.select(*(e.c[c] for c in columns)).where(e.c.status == "ready", *_only(event_id))
    if is_postgres(conn):
        ready = ready.with_for_update(skip_locked=True)
    taken = conn.execute(sa.insert(_events).from_select(columns, ready)).rowcount
    if taken and is_postgres(conn):
        conn.exec_driver_sql(f"ANALYZE {_events.name}")  # a fresh temp table has no statistics
    return taken


def _quiet_periods(conn: Connection, now: datetime, settings: Settings) -> bool:
    """Fill ``_quiet`` with the quiet periods ``now`` is inside, for every distinct
    (zone, quiet_hours) of the users who have quiet hours; True if any."""
    u = m.users
    pairs = conn.execute(sa.select(sa.func.coalesce(u.c.timezone, ""), u.c.quiet_hours).distinct()
                         .where(u.c.quiet_hours.is_not(None))).all()
    held = []
    for tz_name, quiet_hours in pairs:
        try:
            release = release_at(now, quiet_hours, resolve_timezone(tz_name or None, settings))
        except ValueError:  # the CHECK constraint keeps these out; never stop the fan-out for one
            log.warning("phase b: ignoring malformed quiet_hours %r", quiet_hours)
            continue
        if release is not None:
            held.append({"tz": tz_name, "quiet_hours": quiet_hours, "release_at": release})
    if not held:
        return False
    _quiet.create(conn)
    conn.execute(sa.insert(_quiet), held)
    return True


def _matches(now: datetime, settings: Settings, quiet: bool) -> sa.Select:
    """One row per matching (user, event, channel), in the column order of COLUMNS."""
    e, p, u, q = _events, m.user_alert_prefs, m.users, _quiet
    # Several prefs can match one (user, event, channel), e.g. a '*' digest pref and a
    # specific instant one: instant wins. Spelled out rather than MAX(delivery_kind),
    # which would only work because 'instant' happens to sort after 'digest'.
    instant = sa.func.max(sa.case((p.c.delivery_kind == "instant", 1), else_=0)) == 1
    if settings.digest_bypass_severity is not None:  # §10.2: a critical event skips the digest
        instant = sa.or_(instant, e.c.severity >= settings.digest_bypass_severity)
    sms_digest = sa.and_(p.c.channel == "sms", sa.not_(instant))
    joined = e.join(p, sa.and_(
        sa.or_(p.c.alert_type == e.c.alert_type, p.c.alert_type == ANY),
        sa.or_(p.c.region == e.c.region, p.c.region == ANY),
        e.c.severity >= p.c.min_severity,
    )).join(u, u.c.id == p.c.user_id)
    group = [p.c.user_id, e.c.id, p.c.channel, e.c.severity]
    columns = [p.c.user_id, e.c.id, p.c.channel, sa.case((instant, m.INSTANT), else_=m.DIGEST),
               sa.case((sms_digest, m.SKIPPED), else_=m.QUEUED),
               sa.case((sms_digest, m.SMS_DIGEST_NOT_SUPPORTED), else_=sa.null()),
               sa.literal(now, m.UTCDateTime())]
    if quiet:  # §10.4: held until the end of the user's quiet period
        joined = joined.outerjoin(q, sa.and_(q.c.tz == sa.func.coalesce(u.c.timezone, ""),
                                             q.c.quiet_hours == u.c.quiet_hours))
        group.append(q.c.release_at)
        held = sa.and_(instant, e.c.severity < settings.quiet_hours_bypass_severity)
        columns.append(sa.case((held, q.c.release_at), else_=sa.null()))
    return (
        sa.select(*columns)
        .select_from(joined)
        # A WHERE clause also keeps SQLite from reading ON CONFLICT as a join constraint.
        .where(p.c.enabled, u.c.is_active)
        .group_by(*group)
    )


def _insert_deliveries(conn: Connection, now: datetime, settings: Settings, quiet: bool) -> sa.Insert:
    d = m.user_alert_deliveries
    insert = postgresql.insert(d) if is_postgres(conn) else sqlite.insert(d)
    columns = COLUMNS + ["next_retry_at"] if quiet else COLUMNS
    return insert.from_select(columns, _matches(now, settings, quiet)).on_conflict_do_nothing(
        index_elements=[d.c.user_id, d.c.alert_event_id, d.c.channel])


def _mark_fanned_out(conn: Connection) -> int:
    e = m.alert_events
    return conn.execute(
        sa.update(e).where(e.c.status == "ready", e.c.id.in_(sa.select(_events.c.id))).values(status="fanned_out")
    ).rowcount


# Advisory lock names of stories being superseded (hashed to a 64-bit key with the name).
COLLAPSE_LOCK_PREFIX = "alerts.collapse:"


def _supersede(conn: Connection) -> int:
    """§10.3 for instant deliveries: in every (user, channel, collapse_key) an event of
    this run was delivered to, each ``queued`` instant delivery of an event older than the
    group's newest (by created_at, then id) becomes ``skipped``/``superseded by #newest``.
    The newest is judged over all the group's instant deliveries, whatever their status,
    so an older event arriving late is superseded itself and never supersedes a newer one.

    The final UPDATE re-checks ``status = 'queued'`` on the row itself: on PostgreSQL a row
    a sender has claimed meanwhile is waited for and then left alone (it is ``sending``),
    and a row this UPDATE holds is passed over by senders (SKIP LOCKED) and then found
    ``skipped``. So a supersede racing a send of the older row leaves either both sent or
    the older skipped — never neither.

    Two fan-outs at once of one story (the event-driven path beside Phase B) would each
    miss the other's uncommitted deliveries: each first takes a transaction lock per
    collapse_key of its events (PostgreSQL advisory locks, in key order), so the second
    supersedes only after the first has committed, and sees its deliveries."""
    e, d, ae = _events, m.user_alert_deliveries, m.alert_events
    if conn.execute(sa.select(e.c.id).where(e.c.collapse_key.is_not(None)).limit(1)).first() is None:
        return 0
    if is_postgres(conn):
        keys = (sa.select(e.c.collapse_key).where(e.c.collapse_key.is_not(None)).distinct()
                .order_by(e.c.collapse_key).subquery("keys"))
        conn.execute(sa.select(sa.func.count(sa.func.pg_advisory_xact_lock(
            sa.func.hashtextextended(COLLAPSE_LOCK_PREFIX + keys.c.collapse_key, 0)))).select_from(keys))
    instant = d.c.delivery_kind == m.INSTANT
    # The (user, channel, key) groups this run's events were delivered to.
    touched = (sa.select(d.c.user_id, d.c.channel, e.c.collapse_key).distinct()
               .select_from(d.join(e, e.c.id == d.c.alert_event_id))
               .where(instant, e.c.collapse_key.is_not(None))).subquery("touched")
    # Every instant delivery of those groups, ranked newest event first.
    ranked = (sa.select(d.c.id, d.c.status, ae.c.id.label("event_id"), sa.func.row_number().over(
                  partition_by=[d.c.user_id, d.c.channel, ae.c.collapse_key],
                  order_by=[ae.c.created_at.desc(), ae.c.id.desc()]).label("rank"),
                  sa.func.first_value(ae.c.id).over(
                  partition_by=[d.c.user_id, d.c.channel, ae.c.collapse_key],
                  order_by=[ae.c.created_at.desc(), ae.c.id.desc()]).label("newest"))
              .select_from(d.join(ae, ae.c.id == d.c.alert_event_id).join(touched, sa.and_(
                  touched.c.user_id == d.c.user_id, touched.c.channel == d.c.channel,
                  touched.c.collapse_key == ae.c.collapse_key)))
              .where(instant)).subquery("ranked")
    reason = sa.literal(m.SUPERSEDED_BY, sa.Text) + sa.cast(ranked.c.newest, sa.Text)
    _superseded.create(conn)
    found = conn.execute(sa.insert(_superseded).from_select(
        ["delivery_id", "reason"],
        sa.select(ranked.c.id, reason).where(ranked.c.rank > 1, ranked.c.status == m.QUEUED))).rowcount
    superseded = 0
    if found:
        s = _superseded
        # UPDATE … FROM (both databases): a join, not a subquery per row.
        superseded = conn.execute(
            sa.update(d).where(d.c.id == s.c.delivery_id, d.c.status == m.QUEUED, instant)
            .values(status=m.SKIPPED, last_error=s.c.reason)
        ).rowcount
    _superseded.drop(conn)
    return superseded
