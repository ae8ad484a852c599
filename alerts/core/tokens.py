"""Signed tokens and the links that carry them (docs/web-and-security.md): what an email's unsubscribe
link names. Kept below messages and subscribers, which both need them.

A token names one user and one channel, nothing else (no address): itsdangerous signs
``[user_id, channel]`` with ``ALERTS_SECRET_KEY`` under a salt naming the purpose, so a
token made for anything else with the same key does not verify here. It has no expiry:
a link in a years-old email still works (at least 90 days are promised). The library
compares signatures in constant time.

A preferences token (the "Manage alerts" link) names one user, every channel, under a
salt of its own, so neither kind of token verifies as the other. It carries the time it
was made and is refused after ``PREFERENCES_MAX_AGE`` (a year: every email brings a
fresh one).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

import itsdangerous

from alerts.core import tables as m
from alerts.core.settings import Settings

SALT = "alerts.unsubscribe.v1"
PREFERENCES_SALT = "alerts.preferences.v1"
PREFERENCES_MAX_AGE = timedelta(days=365)


class BadToken(ValueError):
    """Malformed, altered, forged, or signed with another key."""


class ExpiredToken(BadToken):
    """Authentic, but older than its kind may be."""


def _serializer(secret_key: str, salt: str = SALT) -> itsdangerous.URLSafeSerializer:
    return itsdangerous.URLSafeSerializer(secret_key, salt=salt, signer_kwargs={"digest_method": hashlib.sha256})


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


def make_preferences_token(secret_key: str, user_id: int, now: datetime) -> str:
    """The token of a user's preferences page, made at ``now``."""
    return _serializer(secret_key, PREFERENCES_SALT).dumps([user_id, int(now.timestamp())])


def read_preferences_token(secret_key: str, token: str, now: datetime) -> int:
    """The user id of a preferences token we signed and made within PREFERENCES_MAX_AGE of
    ``now``; ExpiredToken when older, BadToken for anything else."""
    try:
        payload = _serializer(secret_key, PREFERENCES_SALT).loads(token)
    except itsdangerous.BadData:
        raise BadToken("not a valid preferences token") from None
    if (not isinstance(payload, list) or len(payload) != 2
            or not all(type(part) is int for part in payload)):  # noqa: E721 (bool is not an id)
        raise BadToken("not a valid preferences token")
    made = datetime.fromtimestamp(payload[1], timezone.utc)
    if now - made > PREFERENCES_MAX_AGE:
        raise ExpiredToken("this preferences link has expired")
    return payload[0]


def preferences_url(settings: Settings, user_id: int, now: datetime | None = None) -> str | None:
    """The "Manage alerts" URL, or None when ALERTS_PUBLIC_URL is not set."""
    if not settings.public_url or not settings.secret_key:
        return None
    token = make_preferences_token(settings.secret_key, user_id, now or datetime.now(timezone.utc))
    return f"{settings.public_url}/preferences/{token}"


def email_headers(settings: Settings, stream: str, url: str | None) -> dict[str, str]:
    """RFC 8058 one-click and RFC 2919 List-Id headers; ``stream`` is instant or digest."""
    if url is None:
        return {}
    host = urlsplit(settings.public_url).hostname
    return {"List-Id": f'"EnergyRiskIQ {stream} alerts" <{stream}.alerts.{host}>',
            "List-Unsubscribe": f"<{url}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}


# --- bounce addresses (VERP) ----------------------------------------------------------------
# With ALERTS_BOUNCE_ADDRESS (local@domain) every email's envelope sender is
# local+TOKEN@domain, so a bounce or an abuse report that comes back to it names the user
# it is about (alerts/subscribers/bounces.py). TOKEN is the user id in decimal followed by
# 16 characters of lowercase base32: 80 bits of an HMAC-SHA256 of the id, keyed with
# ALERTS_SECRET_KEY under a salt of its own, so no other token of ours verifies as one.
# Lowercase letters and digits only: some MTAs lowercase local parts. No expiry: a report
# may come days after the message.

BOUNCE_SALT = "alerts.bounce.v1"
BOUNCE_MAC_CHARS = 16
_BASE32_LOWER = frozenset("abcdefghijklmnopqrstuvwxyz234567")


def _bounce_mac(secret_key: str, user_id: int) -> str:
    key = hmac.new(secret_key.encode(), BOUNCE_SALT.encode(), hashlib.sha256).digest()
    mac = hmac.new(key, str(user_id).encode(), hashlib.sha256).digest()[:BOUNCE_MAC_CHARS * 5 // 8]
    return base64.b32encode(mac).decode("ascii").lower()


def make_bounce_token(secret_key: str, user_id: int) -> str:
    return f"{user_id}{_bounce_mac(secret_key, user_id)}"


def read_bounce_token(secret_key: str, token: str) -> int:
    """The user id of a bounce token we signed (compared in constant time); BadToken for
    anything else. Read in any case, as an MTA may have changed it."""
    token = token.lower()
    digits, mac = token[:-BOUNCE_MAC_CHARS], token[-BOUNCE_MAC_CHARS:]
    if not (digits.isascii() and digits.isdigit() and digits[0] != "0" and len(digits) <= 18
            and len(mac) == BOUNCE_MAC_CHARS and set(mac) <= _BASE32_LOWER):
        raise BadToken("not a bounce token")
    user_id = int(digits)
    if not hmac.compare_digest(mac, _bounce_mac(secret_key, user_id)):
        raise BadToken("not a valid bounce token")
    return user_id


def bounce_address(settings: Settings, user_id: int) -> str | None:
    """The envelope sender of an email to ``user_id`` (local+TOKEN@domain), or None when
    ALERTS_BOUNCE_ADDRESS is not set."""
    if not settings.bounce_address or not settings.secret_key:
        return None
    local, _, domain = settings.bounce_address.rpartition("@")
    return f"{local}+{make_bounce_token(settings.secret_key, user_id)}@{domain}"
