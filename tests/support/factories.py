"""Row factories for tests: real INSERTs, readable defaults."""
from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from alerts.core import tables as m

_seq = itertools.count(1)

WINDOW_START = datetime(2026, 5, 11, 22, 0, tzinfo=timezone.utc)  # 2026-05-12 in Amsterdam
WINDOW_END = WINDOW_START + timedelta(days=1)


def add_user(conn, **cols) -> int:
    values = {"email": f"user{next(_seq)}@example.com", **cols}
    return conn.execute(sa.insert(m.users).values(**values).returning(m.users.c.id)).scalar_one()


def add_pref(conn, user_id: int, **cols) -> int:
    values = {"alert_type": "*", "region": "*", "min_severity": 1, "channel": "email",
              "delivery_kind": "instant", **cols}
    return conn.execute(
        sa.insert(m.user_alert_prefs).values(user_id=user_id, **values).returning(m.user_alert_prefs.c.id)
    ).scalar_one()


def add_event(conn, **cols) -> int:
    n = next(_seq)
    values = {"event_key": f"evt-{n}", "alert_type": "pipeline_outage", "region": "NL", "severity": 3,
              "title": f"Event {n}", "summary": "Flow reduced", "url": "https://energyriskiq.com/e/1",
              "status": "new", "created_at": datetime(2026, 5, 12, 9, 0, tzinfo=timezone.utc), **cols}
    return conn.execute(sa.insert(m.alert_events).values(**values).returning(m.alert_events.c.id)).scalar_one()


def add_delivery(conn, user_id: int, event_id: int, **cols) -> int:
    values = {"channel": "email", "delivery_kind": "instant", "status": "queued", **cols}
    return conn.execute(
        sa.insert(m.user_alert_deliveries).values(user_id=user_id, alert_event_id=event_id, **values)
        .returning(m.user_alert_deliveries.c.id)
    ).scalar_one()


def rows(conn, table, order_by="id"):
    return [dict(r._mapping) for r in conn.execute(sa.select(table).order_by(sa.text(order_by)))]


def add_digest(conn, user_id: int, events: int = 2, channel: str = "email", **cols) -> int:
    """A queued daily digest for the 2026-05-12 Amsterdam window, with ``events`` items
    (their per-event deliveries already batched)."""
    values = {"user_id": user_id, "channel": channel, "period": "daily", "window_start": WINDOW_START,
              "window_end": WINDOW_END, "digest_key": f"test:{user_id}:{channel}", "status": "queued",
              "next_retry_at": WINDOW_END, **cols}
    digest_id = conn.execute(sa.insert(m.user_alert_digests).values(**values)
                             .returning(m.user_alert_digests.c.id)).scalar_one()
    for _ in range(events):
        delivery = add_delivery(conn, user_id, add_event(conn, status="fanned_out"), channel=channel,
                                delivery_kind="digest", status="skipped", last_error="batched_into_digest")
        conn.execute(sa.insert(m.user_alert_digest_items).values(digest_id=digest_id, delivery_id=delivery))
    return digest_id
