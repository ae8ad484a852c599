"""`alerts demo`: the whole pipeline on sample data, on the embedded default database,
with email written to the file outbox. Needs no services and can be run again."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

import sqlalchemy as sa

from alerts.core import tables as m
from alerts.core.clock import Clock
from alerts.core.settings import Settings
from alerts.core.db import Database, make_engine, migrate
from alerts.phases.ingest import ingest_lines
from alerts.phases.pipeline import ALL, run_phases, session

# (email, telegram chat, phone, timezone, prefs as (alert_type, region, min_severity, channel, kind))
DEMO_USERS = [
    ("alice@example.com", None, None, "Europe/Amsterdam", [
        ("pipeline_outage", "*", 3, "email", "instant"),
        ("*", "*", 1, "email", "digest"),
    ]),
    ("bob@example.com", "100200300", "+31600000000", "America/New_York", [
        ("price_spike", "NL", 2, "email", "digest"),
        ("*", "*", 4, "telegram", "instant"),
        ("*", "*", 5, "sms", "instant"),
    ]),
]


def _sample_events(run_id: str, now: datetime) -> list[dict]:
    """Instant-worthy events now, and digest material from two days ago: whatever the
    time of day and zone, its daily window has closed, so the digest goes out now."""
    yesterday = now - timedelta(days=2)
    events = [
        dict(alert_type="pipeline_outage", region="NO", severity=5, title="Nord Stream compressor trip",
             summary="Flows to Germany down 40% after an unplanned outage.", url="https://energyriskiq.com/e/ns-1",
             created_at=now.isoformat()),
        dict(alert_type="price_spike", region="NL", severity=3, title="TTF day-ahead +18%",
             summary="Cold snap & low wind push Dutch gas prices up.", url="https://energyriskiq.com/e/ttf-1",
             created_at=(yesterday - timedelta(hours=2)).isoformat()),
        dict(alert_type="regional_risk", region="NL", severity=2, title="Groningen <maintenance> window",
             summary="Planned works; low impact expected.", url=None, created_at=yesterday.isoformat()),
        dict(alert_type="price_spike", region="NL", severity=4, title="Power prices spike at evening peak",
             summary="Imbalance prices above €1,000/MWh.", url="https://energyriskiq.com/e/pwr-1",
             created_at=(yesterday + timedelta(hours=1)).isoformat()),
        dict(alert_type="Bad Type!", region="NL", severity=9, title="", summary="A malformed event",
             url="javascript:alert(1)", created_at=now.isoformat()),
    ]
    return [{"event_key": f"demo-{run_id}-{i}", **event} for i, event in enumerate(events)]


def _ensure_users(conn) -> None:
    for email, chat, phone, tz, prefs in DEMO_USERS:
        if conn.execute(sa.select(m.users.c.id).where(m.users.c.email == email)).first():
            continue
        user_id = conn.execute(
            sa.insert(m.users).values(email=email, telegram_chat_id=chat, phone=phone, timezone=tz)
            .returning(m.users.c.id)
        ).scalar_one()
        conn.execute(sa.insert(m.user_alert_prefs), [
            dict(user_id=user_id, alert_type=t, region=r, min_severity=s, channel=c, delivery_kind=k)
            for t, r, s, c, k in prefs
        ])


def run_demo(settings: Settings, *, outbox: str | None = None, echo: Callable[[str], None] = print) -> dict:
    settings = replace(settings, email_backend="file", outbox_dir=outbox or settings.outbox_dir)
    clock = Clock()
    now = clock.now()
    echo(f"database: {make_engine(settings.database_url).url.render_as_string(hide_password=True)}")
    migrate(settings.database_url)
    engine = make_engine(settings.database_url)
    started = time.time()
    try:
        with engine.begin() as conn:
            _ensure_users(conn)
        report = ingest_lines(Database(engine), [json.dumps(e) for e in _sample_events(str(int(started)), now)])
        echo(f"ingested {report.stored} sample events")
        with session(engine, settings) as (db, channels):
            results = run_phases(db, ALL, clock, settings, channels)
        for name in ALL:
            echo(f"phase {name}: {json.dumps(results[name])}")
        _show_outcomes(engine, echo)
    finally:
        engine.dispose()
    written = sorted(p for p in Path(settings.outbox_dir).glob("*.eml") if p.stat().st_mtime >= started - 1)
    echo(f"\n{len(written)} email(s) written to {Path(settings.outbox_dir).resolve()}:")
    for path in written:
        echo(f"  {path}")
    return results


def _show_outcomes(engine, echo) -> None:
    d, g, e, u = m.user_alert_deliveries, m.user_alert_digests, m.alert_events, m.users
    with engine.connect() as conn:
        echo("\nrejected events:")
        for row in conn.execute(sa.select(e.c.event_key, e.c.reject_reason).where(e.c.status == "rejected")
                                .order_by(e.c.id.desc()).limit(3)):
            echo(f"  {row.event_key}: {row.reject_reason}")
        echo("instant deliveries:")
        for row in conn.execute(
            sa.select(u.c.email, d.c.channel, d.c.status, d.c.last_error, e.c.title)
            .select_from(d.join(u, u.c.id == d.c.user_id).join(e, e.c.id == d.c.alert_event_id))
            .where(d.c.delivery_kind == "instant").order_by(d.c.id.desc()).limit(10)
        ):
            echo(f"  {row.channel:8} {row.email:20} {row.status:8} {row.title}"
                 + (f"  ({row.last_error})" if row.last_error else ""))
        echo("digests:")
        for row in conn.execute(
            sa.select(u.c.email, g.c.channel, g.c.period, g.c.window_start, g.c.status, g.c.last_error)
            .select_from(g.join(u, u.c.id == g.c.user_id)).order_by(g.c.id.desc()).limit(10)
        ):
            echo(f"  {row.channel:8} {row.email:20} {row.status:8} {row.period} window from {row.window_start:%Y-%m-%d %H:%M} UTC"
                 + (f"  ({row.last_error})" if row.last_error else ""))
