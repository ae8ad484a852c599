"""Phase D — group pending digest deliveries into digests (docs/architecture.md).

Set-based, in one transaction, on PostgreSQL and SQLite alike, through three small
temporary tables:
1. *pending*: the pending digest deliveries with the user's zone name, period, send time
   (§10.1; daily only) and the event time in epoch seconds — the one pass over the big
   tables;
2. *windows*: the windows of every (zone, period, send time, UTC hour) that has pending
   deliveries, computed in Python by ``alerts.policy.windows`` (the one place that knows about
   DST); a delivery finds its window by (zone, period, send time, hour) equality plus the
   exact bounds;
3. *groups*: the distinct (user, channel, period, window) of the pending deliveries, each
   resolved to the digest its deliveries go into: the window's open digest — locked on
   PostgreSQL so no sender claims it meanwhile (senders claim with SKIP LOCKED and pass
   over it) — or a new one (sequence 0, or the next sequence: a follow-up when the
   window's digest already left ``queued``), not due before its window closes;
then every pending delivery gets an item in its group's digest and becomes
``skipped``/``batched_into_digest``.

A digest is *open* while no sender has ever claimed it: ``queued`` with no attempt and no
error. One that was claimed — even if it went back to ``queued`` for a retry — never
gains items.
"""
from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from alerts.core import tables as m
from alerts.channels.registry import ChannelSet
from alerts.core.clock import Clock
from alerts.core.settings import Settings
from alerts.core.db import Database, is_postgres, retrying
from alerts.phases.intake import created_at_inside
from alerts.policy.windows import format_window_start, resolve_send_time, resolve_timezone, windows_between

EVENT_TIME_OUT_OF_RANGE = "created_at: outside the range a digest window can hold"
BUCKET_SECONDS = 3600  # windows of any zone start and end inside the UTC hours they overlap
HOURLY_SEND_TIME = "00:00"  # hourly windows have no send time; one value keeps them one set

_scratch = sa.MetaData()
_pending = sa.Table(
    "digest_build_pending", _scratch,
    sa.Column("delivery_id", sa.Integer, nullable=False),
    sa.Column("user_id", sa.Integer, nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("period", sa.Text, nullable=False),
    sa.Column("tz", sa.Text, nullable=False),
    sa.Column("send_time", sa.Text, nullable=False),  # HH:MM, the user's or ALERTS_DIGEST_SEND_TIME
    sa.Column("ts", sa.Float, nullable=False),  # the event's created_at, epoch seconds
    sa.Column("bucket", sa.BigInteger, nullable=False),  # ts // BUCKET_SECONDS
    prefixes=["TEMPORARY"],
)
_windows = sa.Table(
    "digest_build_windows", _scratch,
    sa.Column("tz", sa.Text, nullable=False),
    sa.Column("period", sa.Text, nullable=False),
    sa.Column("send_time", sa.Text, nullable=False),
    sa.Column("bucket", sa.BigInteger, nullable=False),
    sa.Column("start_epoch", sa.BigInteger, nullable=False),
    sa.Column("end_epoch", sa.BigInteger, nullable=False),
    sa.Column("window_start", m.UTCDateTime, nullable=False),
    sa.Column("window_end", m.UTCDateTime, nullable=False),
    sa.Column("start_key", sa.Text, nullable=False),
    prefixes=["TEMPORARY"],
)
_groups = sa.Table(
    "digest_build_groups", _scratch,
    sa.Column("user_id", sa.Integer, nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("period", sa.Text, nullable=False),
    sa.Column("window_start", m.UTCDateTime, nullable=False),
    sa.Column("window_end", m.UTCDateTime, nullable=False),
    sa.Column("start_key", sa.Text, nullable=False),
    sa.Column("digest_id", sa.Integer),  # the open digest the group's deliveries go into
    sa.Column("next_sequence", sa.Integer, nullable=False, server_default="0"),
    prefixes=["TEMPORARY"],
)
# The open digests of the groups, as this run locked them: only these may gain items.
_open_digests = sa.Table(
    "digest_build_open", _scratch,
    sa.Column("id", sa.Integer, nullable=False),
    sa.Column("user_id", sa.Integer, nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("period", sa.Text, nullable=False),
    sa.Column("window_start", m.UTCDateTime, nullable=False),
    sa.Column("window_end", m.UTCDateTime, nullable=False),
    prefixes=["TEMPORARY"],
)
_SCRATCH_TABLES = (_pending, _windows, _groups, _open_digests)


def run_phase_d(db: Database, clock: Clock, settings: Settings, channels: ChannelSet) -> dict:
    """Build digests from pending digest deliveries. The caller holds the phase lock. A
    transaction that meets a deadlock (or a dropped connection) is run again whole."""
    def build() -> dict:
        with db.transaction() as conn:
            _skip_unsupported(conn)
            return _build(conn, clock.now(), settings)

    return retrying(build, "phase d")


def _skip_unsupported(conn: Connection) -> None:
    """A queued digest delivery on a channel without digests (sms) would otherwise wait
    forever: Phase B creates them skipped, but a row written by other means must not be
    lost silently either."""
    d = m.user_alert_deliveries
    conn.execute(sa.update(d).where(d.c.delivery_kind == m.DIGEST, d.c.status == m.QUEUED,
                                    d.c.channel.not_in(m.DIGEST_CHANNELS))
                 .values(status=m.SKIPPED, last_error=m.SMS_DIGEST_NOT_SUPPORTED))


def _skip_out_of_range(conn: Connection) -> None:
    """One event whose time no window can hold (fanned out before intake refused such
    times, or written by other means) must not stop every digest: its pending deliveries
    are skipped, naming the field."""
    d, e = m.user_alert_deliveries, m.alert_events
    outside = sa.exists().where(e.c.id == d.c.alert_event_id, sa.not_(created_at_inside(conn)))
    conn.execute(sa.update(d).where(*_pending_digest_deliveries(d), outside)
                 .values(status=m.SKIPPED, last_error=EVENT_TIME_OUT_OF_RANGE))


def _build(conn: Connection, now: datetime, settings: Settings) -> dict:
    counts = {"digests_created": 0, "digest_items_attached": 0, "deliveries_marked_batched": 0}
    if not _any_pending(conn):
        return counts  # the usual cron tick: one index probe, no scratch tables
    _skip_out_of_range(conn)
    for table in _SCRATCH_TABLES:
        table.create(conn)
    if _collect_pending(conn, settings):
        _analyze(conn, _pending)
        conn.execute(sa.insert(_windows), _window_rows(conn, settings))
        _analyze(conn, _windows)
        _collect_groups(conn)
        _resolve_existing(conn)
        counts["digests_created"] = _insert_digests(conn, now)
        _analyze(conn, _groups)
        counts["digest_items_attached"], counts["deliveries_marked_batched"] = _attach(conn)
    for table in reversed(_SCRATCH_TABLES):
        table.drop(conn)
    return counts


# --- pending deliveries, their windows, their groups ---------------------------------------

def _pending_digest_deliveries(d: sa.Table) -> list:
    return [d.c.delivery_kind == m.DIGEST, d.c.status == m.QUEUED, d.c.channel.in_(m.DIGEST_CHANNELS)]


def _any_pending(conn: Connection) -> bool:
    d = m.user_alert_deliveries
    return conn.execute(sa.select(d.c.id).where(*_pending_digest_deliveries(d)).limit(1)).first() is not None


def _collect_pending(conn: Connection, settings: Settings) -> int:
    """Pending digest deliveries with what places them in a window. Event times go in as
    epoch seconds: exact, and on SQLite independent of how the timestamp text looks."""
    d, u, e, i = m.user_alert_deliveries, m.users, m.alert_events, m.user_alert_digest_items
    hourly = sa.and_(u.c.digest_period == m.HOURLY, u.c.plan.in_(sorted(settings.hourly_digest_plans)))
    period = sa.case((hourly, m.HOURLY), else_=sa.literal(settings.digest_period))
    if settings.digest_period == m.HOURLY:
        send_time = sa.literal(HOURLY_SEND_TIME)
    else:
        send_time = sa.case((hourly, HOURLY_SEND_TIME),
                            else_=sa.func.coalesce(u.c.digest_send_time, settings.digest_send_time))
    if is_postgres(conn):
        ts = sa.func.date_part("epoch", e.c.created_at)
        bucket = sa.cast(sa.func.floor(ts / BUCKET_SECONDS), sa.BigInteger)
    else:
        ts = _sqlite_epoch_seconds(e.c.created_at)
        bucket = ts // BUCKET_SECONDS  # integer division; event times are after 1970
    source = (
        sa.select(d.c.id, d.c.user_id, d.c.channel, period, sa.func.coalesce(u.c.timezone, settings.timezone),
                  send_time, ts, bucket)
        .select_from(d.join(u, u.c.id == d.c.user_id).join(e, e.c.id == d.c.alert_event_id))
        .where(*_pending_digest_deliveries(d), ~sa.exists().where(i.c.delivery_id == d.c.id),
               ts.is_not(None))  # SQLite: a time text it cannot read waits, and holds nobody up
    )
    return conn.execute(sa.insert(_pending).from_select([c.name for c in _pending.c], source)).rowcount


def _sqlite_epoch_seconds(column) -> sa.ColumnElement:
    """Whole epoch seconds of a SQLite timestamp text. SQLite's date functions round to
    milliseconds (23:59:59.9999 would become midnight), so a UTC text — fraction and
    'Z' at most after the seconds — is cut to its seconds first."""
    exact = sa.func.ltrim(sa.func.substr(column, 20), ".0123456789Z") == ""
    text = sa.case((exact, sa.func.substr(column, 1, 19)), else_=column)
    return sa.cast(sa.func.strftime("%s", text), sa.BigInteger)


def _window_rows(conn: Connection, settings: Settings) -> list[dict]:
    """Every window overlapping each (zone, period, send time, hour) with pending
    deliveries; an unknown zone name uses ALERTS_TIMEZONE."""
    p = _pending
    rows = []
    for tz_name, period, send_time, bucket in conn.execute(
            sa.select(p.c.tz, p.c.period, p.c.send_time, p.c.bucket).distinct()):
        lo = datetime.fromtimestamp(bucket * BUCKET_SECONDS, timezone.utc)
        for start, end in windows_between(lo, lo + timedelta(seconds=BUCKET_SECONDS), period,
                                          resolve_timezone(tz_name, settings), resolve_send_time(send_time, settings)):
            rows.append({"tz": tz_name, "period": period, "send_time": send_time, "bucket": bucket,
                         "start_epoch": math.floor(start.timestamp()), "end_epoch": math.floor(end.timestamp()),
                         "window_start": start, "window_end": end, "start_key": format_window_start(start)})
    return rows


def _placed() -> sa.Join:
    """Pending deliveries joined to the window their event's created_at falls in."""
    p, w = _pending, _windows
    return p.join(w, sa.and_(w.c.tz == p.c.tz, w.c.period == p.c.period, w.c.send_time == p.c.send_time,
                             w.c.bucket == p.c.bucket,
                             p.c.ts >= w.c.start_epoch, p.c.ts < w.c.end_epoch))


def _collect_groups(conn: Connection) -> None:
    p, w = _pending, _windows
    names = ["user_id", "channel", "period", "window_start", "window_end", "start_key"]
    source = sa.select(p.c.user_id, p.c.channel, p.c.period, w.c.window_start, w.c.window_end,
                       w.c.start_key).select_from(_placed()).distinct()
    conn.execute(sa.insert(_groups).from_select(names, source))
    _analyze(conn, _groups)


# --- digests and items ---------------------------------------------------------

def _open(g) -> sa.ColumnElement:
    """A digest that no sender has ever claimed, so it may still gain items."""
    return sa.and_(g.c.status == m.QUEUED, g.c.attempts == 0, g.c.last_error.is_(None))


def _same_window(a, b) -> sa.ColumnElement:
    return sa.and_(a.c.user_id == b.c.user_id, a.c.channel == b.c.channel,
                   a.c.period == b.c.period, a.c.window_start == b.c.window_start)


def _resolve_existing(conn: Connection) -> None:
    """For each group: its open digest, and the sequence a new digest for its window would get.

    The open digests are locked (PostgreSQL) and *recorded* by one statement, and only
    those recorded may gain items: a digest that was ``sending`` when they were locked
    and whose claim is given back before the next statement (half lease,
    ``--max-seconds``) looks open again, yet is not locked — a sender could claim and
    send it before our items commit. It gets no item; its window gets a follow-up."""
    g, grp, o = m.user_alert_digests, _groups, _open_digests
    lock_open_digests(conn)
    existing = (
        sa.select(grp.c.user_id, grp.c.channel, grp.c.period, grp.c.window_start,
                  sa.func.max(g.c.sequence).label("max_sequence"))
        .select_from(grp.join(g, _same_window(g, grp)))
        .group_by(grp.c.user_id, grp.c.channel, grp.c.period, grp.c.window_start)
        .subquery("existing")
    )
    # Same start, other end: another send time's window (two send times in one
    # spring-forward gap); its digest is not this window's.
    open_id = (sa.select(sa.func.max(o.c.id)).where(_same_window(o, grp), o.c.window_end == grp.c.window_end)
               .scalar_subquery())
    conn.execute(sa.update(grp).where(_same_window(grp, existing))
                 .values(digest_id=open_id, next_sequence=existing.c.max_sequence + 1))


def lock_open_digests(conn: Connection) -> None:
    """Record the groups' open digests, locked on PostgreSQL until commit so that no
    sender claims them meanwhile (senders claim with SKIP LOCKED and pass over them)."""
    g, grp, o = m.user_alert_digests, _groups, _open_digests
    source = (sa.select(g.c.id, g.c.user_id, g.c.channel, g.c.period, g.c.window_start, g.c.window_end)
              .select_from(g.join(grp, _same_window(g, grp))).where(_open(g)).distinct())
    if is_postgres(conn):
        source = (sa.select(g.c.id, g.c.user_id, g.c.channel, g.c.period, g.c.window_start, g.c.window_end)
                  .where(_open(g), g.c.id.in_(sa.select(g.c.id).select_from(g.join(grp, _same_window(g, grp)))))
                  .with_for_update(of=g))
    conn.execute(sa.insert(o).from_select([c.name for c in o.c], source))


def _insert_digests(conn: Connection, now: datetime) -> int:
    """A digest for each group without an open one — sequence 0, or a follow-up — not due
    before its window closes. Records the new digest's id on its group."""
    g, grp = m.user_alert_digests, _groups
    key = (sa.cast(grp.c.user_id, sa.Text) + ":" + grp.c.channel + ":" + grp.c.period + ":" + grp.c.start_key
           + sa.case((grp.c.next_sequence > 0, "#" + sa.cast(grp.c.next_sequence, sa.Text)), else_=""))
    columns = ["user_id", "channel", "period", "window_start", "window_end", "sequence", "digest_key",
               "status", "attempts", "next_retry_at", "created_at"]
    source = sa.select(
        grp.c.user_id, grp.c.channel, grp.c.period, grp.c.window_start, grp.c.window_end, grp.c.next_sequence,
        key, sa.literal(m.QUEUED), sa.literal(0), grp.c.window_end, sa.literal(now, m.UTCDateTime()),
    ).where(grp.c.digest_id.is_(None))  # a WHERE also keeps SQLite from reading ON CONFLICT as a join
    insert = _dialect_insert(conn, g).from_select(columns, source).on_conflict_do_nothing(index_elements=["digest_key"])
    if is_postgres(conn):
        # New rows straight from RETURNING: the digests table's statistics do not know
        # them yet, so joining it again here could get a very bad plan.
        new = insert.returning(g.c.id, g.c.user_id, g.c.channel, g.c.period, g.c.window_start).cte("new")
        return conn.execute(sa.update(grp).where(_same_window(grp, new)).values(digest_id=new.c.id)).rowcount
    created = conn.execute(insert).rowcount
    conn.execute(sa.update(grp).where(grp.c.digest_id.is_(None)).values(digest_id=(
        sa.select(g.c.id).where(_same_window(g, grp), g.c.sequence == grp.c.next_sequence).scalar_subquery()
    )))
    return created


def _attach(conn: Connection) -> tuple[int, int]:
    """Give every pending delivery an item in its group's digest and mark it batched."""
    i, d, p, w, grp = m.user_alert_digest_items, m.user_alert_deliveries, _pending, _windows, _groups
    items = (sa.select(grp.c.digest_id, p.c.delivery_id)
             .select_from(_placed().join(grp, sa.and_(
                 grp.c.user_id == p.c.user_id, grp.c.channel == p.c.channel, grp.c.period == p.c.period,
                 grp.c.window_start == w.c.window_start)))
             .where(grp.c.digest_id.is_not(None)))
    batch = {"status": m.SKIPPED, "last_error": m.BATCHED_INTO_DIGEST}
    if is_postgres(conn):
        # One statement: exactly the deliveries that got an item are marked.
        attached = (sa.insert(i).from_select(["digest_id", "delivery_id"], items)
                    .returning(i.c.delivery_id).cte("attached"))
        batched = sa.update(d).where(d.c.id == attached.c.delivery_id).values(**batch).returning(d.c.id).cte("batched")
        row = conn.execute(sa.select(
            sa.select(sa.func.count()).select_from(attached).scalar_subquery(),
            sa.select(sa.func.count()).select_from(batched).scalar_subquery(),
        )).one()
        return row[0], row[1]
    attached = conn.execute(sa.insert(i).from_select(["digest_id", "delivery_id"], items)).rowcount
    batched = conn.execute(
        sa.update(d)
        .where(d.c.id.in_(sa.select(p.c.delivery_id)), sa.exists().where(i.c.delivery_id == d.c.id))
        .values(**batch)
    ).rowcount
    return attached, batched


def _analyze(conn: Connection, table: sa.Table) -> None:
    """Fresh statistics for a scratch table, so PostgreSQL plans the big joins well."""
    if is_postgres(conn):
        conn.exec_driver_sql(f"ANALYZE {table.name}")


def _dialect_insert(conn: Connection, table: sa.Table):
    return (postgresql.insert if is_postgres(conn) else sqlite.insert)(table)
