"""One event as an instant email, Telegram message or SMS (docs/policy.md)."""
from __future__ import annotations

from datetime import timezone
from typing import Mapping

from alerts.core.settings import Settings
from alerts.messages.types import EmailMessage, Message, TextMessage
from alerts.messages.render import app_link, event_view, html_env, message_id, one_line, text_env
from alerts.messages.telegram_fit import TELEGRAM_LIMIT, telegram_length, truncate_utf16, utf16_len
from alerts.core.tokens import bounce_address, email_headers, preferences_url, unsubscribe_url

SMS_MAX_CHARS = 320
SUBJECT_TITLE_MAX = 200
TELEGRAM_TITLE_MAX = 512  # the summary takes whatever room is left
TELEGRAM_LABEL_MAX = 64  # alert type and region (intake refuses longer ones; old rows may hold them)
URL_TEXT_MAX = 120


def render_instant(channel: str, event: Mapping, *, delivery_id: int, settings: Settings,
                   installation_id: str | None = None) -> Message:
    """``installation_id`` (the ``installation`` table's, which the outbox's load selects)
    goes into the email's Message-ID."""
    if channel == "email":
        return _email(event, delivery_id, settings, installation_id)
    if channel == "telegram":
        return _telegram(event, settings)
    if channel == "sms":
        return _sms(event)
    raise ValueError(f"no instant message for channel {channel!r}")


def _email(event: Mapping, delivery_id: int, settings: Settings, installation_id: str | None) -> EmailMessage:
    view = event_view(event, settings.tz)
    title = truncate_utf16(view.title, SUBJECT_TITLE_MAX)
    # The row's user (outbox.load selects it): the unsubscribe link names them.
    unsubscribe = unsubscribe_url(settings, event["user_id"], "email") if event.get("user_id") else None
    context = {"e": view, "app_url": app_link(settings), "unsubscribe_url": unsubscribe,
               "manage_url": preferences_url(settings, event["user_id"]) if event.get("user_id") else None}
    return EmailMessage(
        subject=one_line(f"[EnergyRiskIQ] {view.label.upper()}: {title}"),
        text=text_env.get_template("instant_email.txt.j2").render(context),
        html=html_env.get_template("instant_email.html.j2").render(context),
        message_id=message_id(f"alert-delivery-{delivery_id}", settings, installation_id),
        headers=email_headers(settings, "instant", unsubscribe),
        envelope_from=bounce_address(settings, event["user_id"]) if event.get("user_id") else None,
    )


def _telegram(event: Mapping, settings: Settings) -> TextMessage:
    caps = {"title_max": TELEGRAM_TITLE_MAX, "url_text_max": URL_TEXT_MAX, "label_max": TELEGRAM_LABEL_MAX}
    view = event_view(event, settings.tz, **caps)
    template = html_env.get_template("instant_telegram.j2")
    text = template.render(e=view, app_url=app_link(settings)).strip()
    over = telegram_length(text) - TELEGRAM_LIMIT
    if over > 0:  # everything else is capped far below the limit: cut exactly the summary's excess
        view = event_view(event, settings.tz, **caps, summary_max=utf16_len(view.summary or "") - over)
        text = template.render(e=view, app_url=app_link(settings)).strip()
    return TextMessage(text)


def _sms(event: Mapping) -> TextMessage:
    view = event_view(event, timezone.utc)  # an SMS shows no time
    template = text_env.get_template("instant_sms.txt.j2")
    url = view.url
    room = SMS_MAX_CHARS - len(template.render(e=view, title="", url=url))
    if room < 20:  # a giant url would crowd out the title: the title matters more
        url = None
        room = SMS_MAX_CHARS - len(template.render(e=view, title="", url=url))
    title = view.title if len(view.title) <= room else view.title[:room - 1].rstrip() + "…"
    return TextMessage(template.render(e=view, title=title, url=url))

