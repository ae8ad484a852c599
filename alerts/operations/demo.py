"""`alerts demo`: the whole pipeline on sample data, sealed off from any real
installation. It runs on a SQLite file of its own (``--db``, default ``alerts-demo.db`` in
the current directory) and writes every message — email, Telegram, SMS — as a file into
its outbox, whatever DATABASE_URL and the provider settings in the environment say: it
reads no setting from the environment, so it never connects to another database, an SMTP
server, Redis, or the Telegram or Twilio API. It can be run again."""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

import sqlalchemy as sa

from alerts.channels import Channel, DeliveryError
from alerts.channels.email import FileEmailChannel
from alerts.channels.registry import ChannelSet
from alerts.core import tables as m
from alerts.core.clock import Clock
from alerts.core.settings import Settings
from alerts.core.db import Database, make_engine, migrate
from alerts.messages import Message
from alerts.phases.ingest import ingest_lines
from alerts.phases.pipeline import ALL, run_phases

DEMO_DATABASE = "alerts-demo.db"
DEMO_OUTBOX = "outbox"

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


class FileTextChannel(Channel):
    """Writes each Telegram or SMS text to ``<outbox>/<channel>-<recipient>-<hash>.txt``;
    the same message to the same recipient overwrites its file."""

    def __init__(self, name: str, outbox: Path):
        self.name = name
        self.outbox = outbox

    def send(self, recipient: str, message: Message) -> None:
        digest = hashlib.sha256(message.text.encode("utf-8")).hexdigest()[:12]
        path = self.outbox / f"{self.name}-{re.sub(r'[^A-Za-z0-9+_-]', '_', recipient)[:40]}-{digest}.txt"
        try:
            self.outbox.mkdir(parents=True, exist_ok=True)
            path.write_text(f"to: {recipient}\n\n{message.text}\n", encoding="utf-8")
        except OSError as exc:
            raise DeliveryError(f"{self.name} outbox: cannot write {path}: {exc.strerror or exc}") from None


def demo_settings(db_path: str | os.PathLike, outbox: str | os.PathLike) -> Settings:
    """The demo's settings: the defaults, its own SQLite file and outbox — nothing from
    the environment."""
    return Settings(database_url=f"sqlite:///{Path(db_path).resolve()}", email_backend="file",
                    outbox_dir=str(outbox))


def demo_channels(settings: Settings) -> ChannelSet:
    """Every channel, each writing files into the outbox: no server is ever reached."""
    outbox = Path(settings.outbox_dir)
    return ChannelSet(channels={"email": FileEmailChannel(settings), "telegram": FileTextChannel("telegram", outbox),
                                "sms": FileTextChannel("sms", outbox)})


def run_demo(db_path: str | os.PathLike = DEMO_DATABASE, *, outbox: str | os.PathLike = DEMO_OUTBOX,
             echo: Callable[[str], None] = print) -> dict:
    settings = demo_settings(db_path, outbox)
    clock = Clock()
    now = clock.now()
    echo(f"database: {settings.database_url} (the demo's own)")
    migrate(settings.database_url)
    engine = make_engine(settings.database_url)
    started = time.time()
    channels = demo_channels(settings)
    try:
        with engine.begin() as conn:
            _ensure_users(conn)
        report = ingest_lines(Database(engine), [json.dumps(e) for e in _sample_events(str(int(started)), now)])
        echo(f"ingested {report.stored} sample events")
        results = run_phases(Database(engine), ALL, clock, settings, channels)
        for name in ALL:
            echo(f"phase {name}: {json.dumps(results[name])}")
        _show_outcomes(engine, echo)
    finally:
        channels.close()
        engine.dispose()
    written = sorted(p for pattern in ("*.eml", "*.txt") for p in Path(settings.outbox_dir).glob(pattern)
                     if p.stat().st_mtime >= started - 1)
    echo(f"\n{len(written)} message(s) written to {Path(settings.outbox_dir).resolve()}:")
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
