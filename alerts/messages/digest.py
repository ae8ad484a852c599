"""A digest (many events of one window) as one email or one Telegram message (docs/policy.md)."""
from __future__ import annotations

import hashlib
from datetime import datetime, time, timedelta
from typing import Mapping, Sequence
from zoneinfo import ZoneInfo

from alerts.core.settings import Settings
from alerts.messages.types import EmailMessage, Message, TextMessage
from alerts.messages.render import (app_link, as_utc, event_view, html_env, message_id, one_line, sort_items,
                                    text_env, zone)
from alerts.messages.collapse import collapse
from alerts.messages.telegram_fit import fit_telegram
from alerts.core.tokens import bounce_address, email_headers, preferences_url, unsubscribe_url

EMAIL_MAX_ITEMS = 50
# Per-item caps keep one huge event from crowding every other item out of a Telegram digest.
TELEGRAM_TITLE_MAX = 200
TELEGRAM_SUMMARY_MAX = 400
TELEGRAM_URL_TEXT_MAX = 80
# A story of hundreds of updates lists only its newest ids (and the count), so even the
# largest item fits: the digest always shows at least its highest-severity item.
TELEGRAM_IDS_MAX = 10
TELEGRAM_SEPARATOR = "\n\n"

_DEFAULTS = Settings()  # digest_message_id without settings: ALERTS_EMAIL_FROM's default domain
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")


def render_digest(channel: str, digest: Mapping, items: Sequence[Mapping], *, settings: Settings,
                  installation_id: str | None = None) -> Message:
    """``installation_id`` (the ``installation`` table's, which the outbox's load selects)
    goes into the email's Message-ID."""
    if channel == "email":
        return _email(digest, items, settings, installation_id)
    if channel == "telegram":
        return _telegram(digest, items, settings)
    raise ValueError(f"no digest message for channel {channel!r}")


def digest_message_id(digest_key: str, settings: Settings | None = None, installation_id: str | None = None) -> str:
    """The same on every retry of one digest, different for every other digest (and, with
    ``installation_id``, for every digest of another installation)."""
    digest = hashlib.sha256(digest_key.encode("utf-8")).hexdigest()[:32]
    return message_id(f"digest-{digest}", settings or _DEFAULTS, installation_id)


def window_label(start: datetime, end: datetime, tz: ZoneInfo) -> str:
    """The window in local time, e.g. "Tuesday 12 May 2026, 00:00–24:00 Europe/Amsterdam",
    or, for a daily window from a send time that is not midnight, both bounds:
    "Tue 12 May 08:00 – Wed 13 May 08:00 Europe/Amsterdam".

    When the UTC offset changes inside the window, or a local time occurs twice (the
    repeated hour of a fall-back day), both ends carry their offset, and the real length
    is added when it is not a whole day or hour: "…00:00 (UTC+01:00)–24:00 (UTC+02:00)
    Europe/Amsterdam, 23 h".
    """
    a, b = as_utc(start).astimezone(tz), as_utc(end).astimezone(tz)
    marked = a.utcoffset() != b.utcoffset() or _ambiguous(a) or _ambiguous(b)
    ends_at_midnight = b.time() == time(0) and b.date() == a.date() + timedelta(days=1)
    if b.date() != a.date() and not ends_at_midnight:
        # A daily window from a send time that is not midnight (§10.1): both bounds.
        return f"{_bound(a, marked)} – {_bound(b, marked)} {tz.key}" + _length_note(start, end)
    end_clock = "24:00" if ends_at_midnight else f"{b:%H:%M}"
    span = f"{a:%H:%M}–{end_clock}"
    if marked:
        span = f"{a:%H:%M} ({_offset(a)})–{end_clock} ({_offset(b)})"
    return f"{_day(a)}, {span} {tz.key}" + _length_note(start, end)


def _bound(local: datetime, marked: bool) -> str:
    """One bound of a send-time window, e.g. "Tue 12 May 08:00" (and its offset when marked)."""
    text = f"{_DAYS[local.weekday()][:3]} {local.day} {_MONTHS[local.month - 1][:3]} {local:%H:%M}"
    return f"{text} ({_offset(local)})" if marked else text


def _length_note(start: datetime, end: datetime) -> str:
    hours = (as_utc(end) - as_utc(start)).total_seconds() / 3600  # not b - a: that is wall time
    return "" if hours in (1, 24) else f", {hours:g} h"


def _email(digest: Mapping, items: Sequence[Mapping], settings: Settings, installation_id: str | None) -> EmailMessage:
    tz = zone(digest.get("timezone"), settings)
    ordered = sort_items(collapse(items))  # items, not events (§10.3)
    key = digest["digest_key"]
    unsubscribe = unsubscribe_url(settings, digest["user_id"], "email") if digest.get("user_id") else None
    context = {
        "heading": _heading(digest),
        "window": window_label(digest["window_start"], digest["window_end"], tz),
        "count": _count(len(ordered)),
        "items": [event_view(e, tz) for e in ordered[:EMAIL_MAX_ITEMS]],
        "more": max(0, len(ordered) - EMAIL_MAX_ITEMS),
        "app_url": app_link(settings),
        "unsubscribe_url": unsubscribe,
        "manage_url": preferences_url(settings, digest["user_id"]) if digest.get("user_id") else None,
    }
    return EmailMessage(
        subject=_subject(digest, len(ordered), tz),
        text=text_env.get_template("digest_email.txt.j2").render(context),
        html=html_env.get_template("digest_email.html.j2").render(context),
        message_id=digest_message_id(key, settings, installation_id),
        headers={"X-Alerts-Digest-Key": one_line(key), **email_headers(settings, "digest", unsubscribe)},
        envelope_from=bounce_address(settings, digest["user_id"]) if digest.get("user_id") else None,
    )


def _telegram(digest: Mapping, items: Sequence[Mapping], settings: Settings) -> TextMessage:
    tz = zone(digest.get("timezone"), settings)
    ordered = sort_items(collapse(items))  # items, not events (§10.3)
    parts = html_env.get_template("digest_telegram.j2").module
    app_url = app_link(settings)
    header = _part(parts.header(_heading(digest), window_label(digest["window_start"], digest["window_end"], tz),
                              _count(len(ordered))))
    # A generator: fit_telegram renders only the items that can still fit.
    blocks = (TELEGRAM_SEPARATOR + _part(parts.item(event_view(
        e, tz, title_max=TELEGRAM_TITLE_MAX, summary_max=TELEGRAM_SUMMARY_MAX,
        url_text_max=TELEGRAM_URL_TEXT_MAX, ids_max=TELEGRAM_IDS_MAX))) for e in ordered)

    def footer(more: int) -> str:
        text = _part(parts.footer(more, app_url))
        return TELEGRAM_SEPARATOR + text if text else ""

    return TextMessage(fit_telegram(header, blocks, footer, total=len(ordered)))


def _part(markup) -> str:
    """A macro's output as a plain string, without the blank lines its if-blocks leave."""
    return str(markup).strip()


def _heading(digest: Mapping) -> str:
    return f"EnergyRiskIQ {digest['period']} digest"


def _subject(digest: Mapping, n: int, tz: ZoneInfo) -> str:
    start = as_utc(digest["window_start"]).astimezone(tz)
    when = f"{start:%Y-%m-%d %H:00}" if digest["period"] == "hourly" else f"{start:%Y-%m-%d}"
    return f"{_heading(digest)} — {when} ({_count(n)})"


def _count(n: int) -> str:
    return "1 alert" if n == 1 else f"{n} alerts"


def _day(local: datetime) -> str:
    # Spelled out here, not with %A/%B, so the process locale cannot change it.
    return f"{_DAYS[local.weekday()]} {local.day} {_MONTHS[local.month - 1]} {local.year}"


def _offset(local: datetime) -> str:
    minutes = int(local.utcoffset().total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    return f"UTC{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def _ambiguous(local: datetime) -> bool:
    """True for a wall time that happens twice (clocks going back)."""
    return local.replace(fold=1 - local.fold).utcoffset() != local.utcoffset()
