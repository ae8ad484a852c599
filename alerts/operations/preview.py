"""`alerts preview`: render a digest's email and Telegram text without sending or
changing anything — for a built digest, or for a user's window not built yet."""
from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from alerts.core import tables as m
from alerts.core.settings import Settings
from alerts.messages import EmailMessage, render_digest
from alerts.policy.windows import MIDNIGHT, day_start, digest_key, resolve_period, resolve_send_time, resolve_timezone

# collapse_key too: the digest renderer collapses the items of one story (§10.3).
EVENT_COLUMNS = ("id", "event_key", "alert_type", "region", "severity", "title", "summary", "url", "created_at",
                 "collapse_key")


def _event_cols():
    return [m.alert_events.c[name] for name in EVENT_COLUMNS]


def preview_digest(engine: Engine, settings: Settings, *, digest_id=None, user_id=None, day=None,
                   channel=None, out_dir=None, echo: Callable[[str], None] = print) -> None:
    with engine.connect() as conn:
        if digest_id is not None:
            digest, items = _built(conn, settings, digest_id)
            channels = [channel or digest["channel"]]
        else:
            digest, items = _unbuilt(conn, settings, user_id, day, channel)
            channels = [channel] if channel else ["email", "telegram"]
        installation_id = conn.execute(sa.select(m.installation.c.installation_id)).scalar()  # as the sender's Message-ID
    echo(f"digest {digest['digest_key']}: {len(items)} item(s), window "
         f"{digest['window_start']:%Y-%m-%d %H:%M} – {digest['window_end']:%Y-%m-%d %H:%M} UTC")
    tz = resolve_timezone(digest["timezone"], settings)
    if "send_time" in digest:
        echo(f"send time {digest['send_time']:%H:%M} {tz.key}: due {_when(digest['window_end'], tz)}")
    elif digest.get("next_retry_at") is not None:
        echo(f"{digest['status']}, due {_when(digest['next_retry_at'], tz)}")
    for name in channels:
        message = render_digest(name, digest, items, settings=settings, installation_id=installation_id)
        if isinstance(message, EmailMessage):
            _show_email(message, out_dir, echo)
        else:
            echo(f"\n=== telegram (parse_mode=HTML) ===\n{message.text}")


def _when(instant, tz) -> str:
    return f"{instant.astimezone(tz):%a %d %b %Y %H:%M} {tz.key} ({instant:%Y-%m-%d %H:%M} UTC)"


def _built(conn, settings, digest_id):
    g, u = m.user_alert_digests, m.users
    digest = conn.execute(
        sa.select(g, sa.func.coalesce(u.c.timezone, settings.timezone).label("timezone"))
        .select_from(g.join(u, u.c.id == g.c.user_id)).where(g.c.id == digest_id)
    ).mappings().first()
    if digest is None:
        raise LookupError(f"--digest: no digest with id {digest_id}")
    i, d = m.user_alert_digest_items, m.user_alert_deliveries
    items = conn.execute(
        sa.select(*_event_cols())
        .select_from(i.join(d, d.c.id == i.c.delivery_id).join(m.alert_events, m.alert_events.c.id == d.c.alert_event_id))
        .where(i.c.digest_id == digest_id)
    ).mappings().all()
    return dict(digest), items


def _unbuilt(conn, settings, user_id, day, channel):
    user = conn.execute(sa.select(m.users).where(m.users.c.id == user_id)).mappings().first()
    if user is None:
        raise LookupError(f"--user: no user with id {user_id}")
    try:
        local_day = date.fromisoformat(day)
    except ValueError:
        raise LookupError(f"--date: not a YYYY-MM-DD date: {day!r}") from None
    tz = resolve_timezone(user["timezone"], settings)
    period = resolve_period(user["digest_period"], user["plan"], settings)
    # The daily window that starts on the local day (§10.5); for hourly users, whose
    # windows have no send time, the whole calendar day as one list.
    send_time = MIDNIGHT if period == m.HOURLY else resolve_send_time(user["digest_send_time"], settings)
    start = day_start(local_day, send_time, tz)
    end = day_start(local_day + timedelta(days=1), send_time, tz)
    d, e = m.user_alert_deliveries, m.alert_events
    where = [d.c.user_id == user_id, d.c.delivery_kind == "digest", d.c.channel != "sms",
             e.c.created_at >= start, e.c.created_at < end]
    if channel:
        where.append(d.c.channel == channel)
    items = conn.execute(
        sa.select(*_event_cols()).distinct().select_from(d.join(e, e.c.id == d.c.alert_event_id)).where(*where)
    ).mappings().all()
    digest = {"id": None, "digest_key": digest_key(user_id, channel or "email", period, start) + ":preview",
              "user_id": user_id, "channel": channel or "email", "period": "daily", "window_start": start,
              "window_end": end, "timezone": tz.key, "send_time": send_time}
    return digest, items


def _show_email(message: EmailMessage, out_dir, echo) -> None:
    echo(f"\n=== email ===\nSubject: {message.subject}\nMessage-ID: {message.message_id}")
    for name, value in message.headers.items():
        echo(f"{name}: {value}")
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "digest.txt").write_text(message.text, encoding="utf-8")
        (out / "digest.html").write_text(message.html, encoding="utf-8")
        echo(f"wrote {out / 'digest.txt'} and {out / 'digest.html'}")
    else:
        echo(f"\n{message.text}")
