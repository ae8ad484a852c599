"""One-click unsubscribe (docs/web-and-security.md): the one transaction that unsubscribes, resubscribing,
and the wait for sends in flight. The token an email's link carries is alerts/core/tokens.py.

"Never sent after the 200" holds by three things together:

1. ``unsubscribe`` disables the channel's preferences and skips the user's ``queued``
   rows on it in one transaction;
2. a row claimed after that commit is skipped by the sender itself: ``outbox.load``
   (read after the claim) skips a row whose user has preferences on the channel and
   none enabled — this also catches rows a concurrent fan-out created from preferences
   it read just before the commit;
3. rows already ``sending`` when it commits are in flight: ``wait_in_flight`` waits (a
   bounded time) for their outcome before the web app answers 200. When one is still in
   flight after that (a sender died mid-send; its row waits for the lease), the answer
   is 503 with Retry-After instead — the unsubscribe is committed, and the 200 comes
   once no send can still arrive.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from alerts.core import tables as m
from alerts.core.db import retrying
from alerts.sending.outbox import skip_queued

log = logging.getLogger(__name__)

# How long the POST waits for sends already in flight (a claimed row's SMTP or HTTP
# call) before answering: longer than one send takes with the default timeouts.
IN_FLIGHT_WAIT_SECONDS = 45.0
IN_FLIGHT_POLL_SECONDS = 0.05


def mask_address(channel: str, address: str | None) -> str | None:
    """Enough to recognise one's own address, never all of it: j***@example.com, ***89."""
    address = (address or "").strip()
    if not address:
        return None
    if channel == "email" and "@" in address:
        local, _, domain = address.rpartition("@")
        return f"{local[:1]}***@{domain}"
    return "***" + address[-2:] if len(address) > 4 else "***"


@dataclass(frozen=True)
class Subscriber:
    user_id: int
    channel: str
    address: str | None
    subscribed: bool  # some preference on the channel is enabled (or there are none)


def find(conn: Connection, user_id: int, channel: str) -> Subscriber | None:
    """The user behind a token, or None when the user no longer exists."""
    u, p = m.users, m.user_alert_prefs
    row = conn.execute(sa.select(u.c[m.RECIPIENT_COLUMNS[channel]].label("address")).where(u.c.id == user_id)).first()
    if row is None:
        return None
    enabled = conn.execute(sa.select(p.c.enabled).where(p.c.user_id == user_id, p.c.channel == channel)).scalars().all()
    return Subscriber(user_id, channel, row.address, not enabled or any(enabled))


def unsubscribe(conn: Connection, user_id: int, channel: str, now: datetime | None = None) -> dict[str, int]:
    """Disable the channel's preferences and skip what is queued on it — call it in one
    transaction. Pending digest items are skipped too, so no digest is built of them.
    The preferences it turns off are marked (``unsubscribed_at``) for ``resubscribe``."""
    p = m.user_alert_prefs
    now = now or datetime.now(timezone.utc)
    counts = {"prefs": conn.execute(sa.update(p).where(p.c.user_id == user_id, p.c.channel == channel).values(
        enabled=False, unsubscribed_at=sa.case((p.c.enabled, sa.literal(now, m.UTCDateTime())),
                                               else_=p.c.unsubscribed_at))).rowcount}
    counts.update(_skip_queued(conn, user_id, channel))
    return counts


def _skip_queued(conn: Connection, user_id: int, channel: str) -> dict[str, int]:
    return skip_queued(conn, user_id, channel, m.UNSUBSCRIBED)


def unsubscribe_committed(engine: Engine, user_id: int, channel: str) -> dict[str, int]:
    """``unsubscribe`` in a transaction of its own, committed; one that meets a deadlock
    or a dropped connection is run again (``db.retrying``), never shown to the subscriber."""
    def run() -> dict[str, int]:
        with engine.begin() as conn:
            return unsubscribe(conn, user_id, channel)

    return retrying(run, f"unsubscribing user {user_id} on {channel}")


def resubscribe(conn: Connection, user_id: int, channel: str) -> int:
    """Turn back on the channel's preferences that an unsubscribe turned off, not those
    the subscriber had switched off before; rows already skipped stay skipped. A channel
    that is off with none so marked (turned off before the marks existed) gets all of
    its preferences back on."""
    p = m.user_alert_prefs
    on_channel = [p.c.user_id == user_id, p.c.channel == channel]
    restored = conn.execute(sa.update(p).where(*on_channel, p.c.unsubscribed_at.is_not(None))
                            .values(enabled=True, unsubscribed_at=None)).rowcount
    if restored:
        return restored
    any_enabled = sa.select(p.c.id).where(*on_channel, p.c.enabled).exists()
    return conn.execute(sa.update(p).where(*on_channel, ~any_enabled).values(enabled=True)).rowcount


def in_flight(conn: Connection, user_id: int, channel: str) -> int:
    """The user's rows on the channel that a sender holds (status ``sending``)."""
    total = 0
    for table in (m.user_alert_deliveries, m.user_alert_digests):
        total += conn.execute(sa.select(sa.func.count()).select_from(table).where(
            table.c.user_id == user_id, table.c.channel == channel, table.c.status == m.SENDING)).scalar_one()
    return total


def wait_in_flight(engine: Engine, user_id: int, channel: str, *, timeout: float | None = None,
                   sleep: Callable[[float], None] = time.sleep) -> bool:
    """After ``unsubscribe`` committed: wait until no send of the user's on the channel is
    in flight, then skip once more whatever came back to ``queued`` meanwhile (a send
    that failed transiently). True when nothing was left in flight."""
    timeout = IN_FLIGHT_WAIT_SECONDS if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            left = in_flight(conn, user_id, channel)
        if not left or time.monotonic() >= deadline:
            break
        sleep(IN_FLIGHT_POLL_SECONDS)
    with engine.begin() as conn:
        _skip_queued(conn, user_id, channel)
    if left:
        log.warning("unsubscribe of user %s on %s: %s send(s) still in flight after %.1fs", user_id, channel,
                    left, timeout)
    return not left
