"""What ``GET /metrics`` exports (docs/monitoring.md): gauges read from the database when
Prometheus scrapes, one query per family, so every process — web workers, Celery workers,
the cron runner — is seen the same way, whichever of them answers.

    alerts_rows{table,channel,status}      instant deliveries (table="deliveries") and
                                           digests (table="digests") by channel and status
    alerts_due_oldest_seconds{table}       how long the oldest due ``queued`` row has been
                                           due (since ``next_retry_at``, else ``created_at``,
                                           as ``alerts check`` counts); 0 when none is due
    alerts_sending_past_lease{table}       rows in ``sending`` longer than the lease
    alerts_blocked_destinations{channel}   rows of ``user_channel_blocks``
    alerts_events{status}                  events by status

Every label value the schema allows is exported, zeros included, so a series never
vanishes when its rows do (an alert rule on it keeps working). Labels are fixed names —
statuses and channels — never an address, an id or a provider's words.

Cost: the due, lease and block families read partial indexes or small tables; the row
and event counts read their whole table, so they grow with history
(bench/bench_explain.py measures a scrape on a million deliveries). On PostgreSQL a scrape
is one read-only transaction with a statement timeout, so a slow one fails fast instead
of piling up behind the next.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Callable, Iterator

import sqlalchemy as sa
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy.engine import Connection, Engine

from alerts.core import tables as m
from alerts.core.db import is_postgres

# Far below any sensible scrape interval; a scrape that needs longer gets a 503.
SCRAPE_STATEMENT_TIMEOUT_MS = 10_000
TABLES = {"deliveries": m.user_alert_deliveries, "digests": m.user_alert_digests}
TABLE_CHANNELS = {"deliveries": m.CHANNELS, "digests": m.DIGEST_CHANNELS}


def _where(name: str) -> list[sa.ColumnElement]:
    """table="deliveries" counts instant deliveries: a digest delivery is never sent itself."""
    t = TABLES[name]
    return [t.c.delivery_kind == m.INSTANT] if name == "deliveries" else []


def _label(name: str) -> sa.ColumnElement:
    return sa.literal(name, sa.Text).label("table")


def rows(conn: Connection, now: datetime, lease_seconds: int) -> GaugeMetricFamily:
    family = GaugeMetricFamily("alerts_rows", "Instant deliveries (table=deliveries) and digests (table=digests) "
                               "by channel and status.", labels=["table", "channel", "status"])
    query = sa.union_all(*(
        sa.select(_label(name), t.c.channel, t.c.status, sa.func.count().label("n"))
        .where(*_where(name)).group_by(t.c.channel, t.c.status)
        for name, t in TABLES.items()))
    counts = {(r.table, r.channel, r.status): r.n for r in conn.execute(query)}
    for name, channels in TABLE_CHANNELS.items():
        for channel in channels:
            for status in m.SEND_STATUSES:
                family.add_metric([name, channel, status], counts.pop((name, channel, status), 0))
    for labels, n in sorted(counts.items()):  # none while the CHECK constraints hold
        family.add_metric(list(labels), n)
    return family


def due_oldest(conn: Connection, now: datetime, lease_seconds: int) -> GaugeMetricFamily:
    family = GaugeMetricFamily("alerts_due_oldest_seconds", "Seconds the oldest due queued row has been due "
                               "(since next_retry_at, else created_at); 0 when none is due.", labels=["table"])
    parts = []
    for name, t in TABLES.items():
        due = sa.func.coalesce(t.c.next_retry_at, t.c.created_at)
        parts.append(sa.select(_label(name), sa.func.min(due).label("oldest"))
                     .where(t.c.status == m.QUEUED, due <= now, *_where(name)))
    oldest = {r.table: r.oldest for r in conn.execute(sa.union_all(*parts))}
    for name in TABLES:
        since = oldest.get(name)
        family.add_metric([name], max(0.0, (now - since).total_seconds()) if since is not None else 0.0)
    return family


def sending_past_lease(conn: Connection, now: datetime, lease_seconds: int) -> GaugeMetricFamily:
    family = GaugeMetricFamily("alerts_sending_past_lease", "Rows in sending longer than "
                               "ALERTS_SENDING_LEASE_SECONDS: a sender died and nothing has recovered them.",
                               labels=["table"])
    cutoff = now - timedelta(seconds=lease_seconds)
    parts = [sa.select(_label(name), sa.func.count().label("n"))
             .where(t.c.status == m.SENDING, sa.func.coalesce(t.c.claimed_at, t.c.created_at) < cutoff)
             for name, t in TABLES.items()]
    counts = {r.table: r.n for r in conn.execute(sa.union_all(*parts))}
    for name in TABLES:
        family.add_metric([name], counts.get(name, 0))
    return family


def blocked_destinations(conn: Connection, now: datetime, lease_seconds: int) -> GaugeMetricFamily:
    family = GaugeMetricFamily("alerts_blocked_destinations", "Destinations a provider said are gone "
                               "(rows of user_channel_blocks), by channel.", labels=["channel"])
    b = m.user_channel_blocks
    counts = dict(conn.execute(sa.select(b.c.channel, sa.func.count()).group_by(b.c.channel)).all())
    for channel in m.CHANNELS:
        family.add_metric([channel], counts.get(channel, 0))
    return family


def events(conn: Connection, now: datetime, lease_seconds: int) -> GaugeMetricFamily:
    family = GaugeMetricFamily("alerts_events", "Alert events by status.", labels=["status"])
    e = m.alert_events
    counts = dict(conn.execute(sa.select(e.c.status, sa.func.count()).group_by(e.c.status)).all())
    for status in m.EVENT_STATUSES:
        family.add_metric([status], counts.pop(status, 0))
    return family


FAMILIES: tuple[Callable[[Connection, datetime, int], GaugeMetricFamily], ...] = (
    rows, due_oldest, sending_past_lease, blocked_destinations, events)


def read_all(conn: Connection, now: datetime, lease_seconds: int) -> list[GaugeMetricFamily]:
    """Every family, as of ``now``, in one read-only transaction of ``conn``."""
    if is_postgres(conn):
        conn.exec_driver_sql("SET TRANSACTION READ ONLY")
        conn.execute(sa.select(sa.func.set_config("statement_timeout", str(SCRAPE_STATEMENT_TIMEOUT_MS), True)))
    return [family(conn, now, lease_seconds) for family in FAMILIES]


class DatabaseCollector:
    """A prometheus_client collector: reads every family from the database on each
    ``collect()`` (each scrape), at the clock's ``now``."""

    def __init__(self, engine: Engine, lease_seconds: int, clock: Callable[[], datetime]):
        self.engine, self.lease_seconds, self.clock = engine, lease_seconds, clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self.engine.connect() as conn:
            families = read_all(conn, self.clock(), self.lease_seconds)
        yield from families
