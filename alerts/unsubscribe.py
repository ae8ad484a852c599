"""One-click unsubscribe (SPEC §11.1, §11.2): the signed token an email's links carry,
the email headers that carry it, and the one transaction that unsubscribes.

A token names one user and one channel, nothing else (no address): itsdangerous signs
``[user_id, channel]`` with ``ALERTS_SECRET_KEY`` under a salt naming the purpose, so a
token made for anything else with the same key does not verify here. It has no expiry:
a link in a years-old email still works (the SPEC asks for at least 90 days). The
library compares signatures in constant time.

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

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

import itsdangerous
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from alerts import models as m
from alerts.config import Settings

log = logging.getLogger(__name__)

SALT = "alerts.unsubscribe.v1"
# How long the POST waits for sends already in flight (a claimed row's SMTP or HTTP
# call) before answering: longer than one send takes with the default timeouts.
IN_FLIGHT_WAIT_SECONDS = 45.0
IN_FLIGHT_POLL_SECONDS = 0.05


class BadToken(ValueError):
    """Malformed, altered, forged, or signed with another key."""


def _serializer(secret_key: str) -> itsdangerous.URLSafeSerializer:
    return itsdangerous.URLSafeSerializer(secret_key, salt=SALT, signer_kwargs={"digest_method": hashlib.sha256})


def make_token(secret_key: str, user_id: int, channel: str) -> str:
    return _serializer(secret_key).dumps([user_id, channel])


def read_token(secret_key: str, token: str) -> tuple[int, str]:
    """(user id, channel) of a token we signed; BadToken for anything else."""
    try:
        payload = _serializer(secret_key).loads(token)
    except itsdangerous.BadData:
        raise BadToken("not a valid unsubscribe token") from None
    if (not isinstance(payload, list) or len(payload) != 2 or type(payload[0]) is not int
            or payload[1] not in m.CHANNELS):
        raise BadToken("not a valid unsubscribe token")  # signed by us, but not a token of this kind
    return payload[0], payload[1]


def unsubscribe_url(settings: Settings, user_id: int, channel: str) -> str | None:
    """The one-click URL, or None when ALERTS_PUBLIC_URL is not set."""
    if not settings.public_url or not settings.secret_key:
        return None
    return f"{settings.public_url}/unsubscribe/{make_token(settings.secret_key, user_id, channel)}"


def email_headers(settings: Settings, stream: str, url: str | None) -> dict[str, str]:
    """RFC 8058 one-click and RFC 2919 List-Id headers; ``stream`` is instant or digest."""
    if url is None:
        return {}
    host = urlsplit(settings.public_url).hostname
    return {"List-Id": f'"EnergyRiskIQ {stream} alerts" <{stream}.alerts.{host}>',
            "List-Unsubscribe": f"<{url}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}


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


def unsubscribe(conn: Connection, user_id: int, channel: str) -> dict[str, int]:
    """Disable the channel's preferences and skip what is queued on it — call it in one
    transaction. Pending digest items are skipped too, so no digest is built of them."""
    p = m.user_alert_prefs
    counts = {"prefs": conn.execute(sa.update(p).where(p.c.user_id == user_id, p.c.channel == channel)
                                    .values(enabled=False)).rowcount}
    counts.update(_skip_queued(conn, user_id, channel))
    return counts


def _skip_queued(conn: Connection, user_id: int, channel: str) -> dict[str, int]:
    # Imported here: the outbox renders messages, and the message modules import this one.
    from alerts.outbox import skip_queued

    return skip_queued(conn, user_id, channel, m.UNSUBSCRIBED)


def resubscribe(conn: Connection, user_id: int, channel: str) -> int:
    """Turn the channel's preferences back on; rows already skipped stay skipped."""
    p = m.user_alert_prefs
    return conn.execute(sa.update(p).where(p.c.user_id == user_id, p.c.channel == channel)
                        .values(enabled=True)).rowcount


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
