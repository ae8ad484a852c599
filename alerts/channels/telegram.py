"""Telegram Bot API ``sendMessage``; the text is already HTML for ``parse_mode=HTML``.

Classification follows the Bot API error shape
``{"ok": false, "error_code": N, "description": "...", "parameters": {...}}``, as
healthchecks does it — by an allow-list of descriptions, not by status code alone:

- the destination is gone (``gone``, permanent): the bot was blocked, the user is
  deactivated, the bot was kicked, the chat was deleted or not found;
- ``parameters.migrate_to_chat_id``: the group became a supergroup (``migrate_to``);
- 429 waits ``retry_after``; 401 (a bad bot token: our fault, not the recipient's), 5xx
  and unreadable gateway pages are transient;
- any other 4xx (can't parse entities, message too long, …) fails the message.

The token is in the URL only; it never reaches a reason.
"""
from __future__ import annotations

import re

import requests

from alerts.channels import Channel, DeliveryError
from alerts.channels.http import HttpClient, describe, redact, retry_after_seconds
from alerts.core import tables as m
from alerts.core.settings import Settings
from alerts.messages import Message

# Descriptions that say the chat is gone for this bot (Bot API 403s, and 400 "chat not found").
DESTINATION_GONE = re.compile(r"bot was blocked by the user|user is deactivated|bot was kicked|"
                              r"chat was deleted|chat not found", re.IGNORECASE)


class TelegramChannel(Channel):
    name = "telegram"

    def __init__(self, settings: Settings):
        self._token = settings.telegram_bot_token or ""
        self._url = f"{settings.telegram_api_base}/bot{self._token}/sendMessage"
        self._http = HttpClient("telegram", settings.http_timeout_seconds, secrets=(self._token,))

    def send(self, recipient: str, message: Message) -> None:
        response = self._http.post(self._url, json={
            "chat_id": recipient,
            "text": message.text,
            "parse_mode": "HTML",
            "link_preview_options": {"is_disabled": True},
            "disable_web_page_preview": True,  # for Bot API servers older than 7.0
        })
        error = classify(response.status_code, _json(response), response.headers.get("Retry-After"),
                         secrets=(self._token,))
        if error is not None:
            raise DeliveryError(redact(error.reason, self._token), permanent=error.permanent,
                                retry_after=error.retry_after, gone=error.gone, migrate_to=error.migrate_to)

    def close(self) -> None:
        self._http.close()


def classify(status: int, body: object, retry_after_header: str | None = None, *,
             secrets: tuple[str, ...] = ()) -> DeliveryError | None:
    """The error for one Bot API answer, or None when the message was accepted.

    ``body`` is the decoded JSON, or None when the body was not JSON. ``secrets`` are
    masked in the provider's text before it is shortened (a server may echo the token).
    """
    if not isinstance(body, dict):
        body = None
    if body is not None and body.get("ok") is True and 200 <= status < 300:
        return None
    code = body.get("error_code") if body is not None else None
    code = code if isinstance(code, int) and not isinstance(code, bool) else status
    description = body.get("description") if body is not None else None
    if description:
        reason = f"telegram {code}: {describe(description, *secrets)}"
    else:
        reason = f"telegram {code}: unexpected answer (HTTP {status}, {'no JSON' if body is None else 'no description'})"
    parameters = body.get("parameters") if body is not None else None
    parameters = parameters if isinstance(parameters, dict) else {}
    migrate_to = parameters.get("migrate_to_chat_id")
    if isinstance(migrate_to, (int, str)) and not isinstance(migrate_to, bool) and str(migrate_to).lstrip("-").isdigit():
        moved = str(migrate_to)
        return DeliveryError(f"{reason} (group moved to chat {moved})", permanent=True, migrate_to=moved)
    if code == 429:
        wait = retry_after_seconds(parameters.get("retry_after"))
        return DeliveryError(reason, retry_after=wait if wait is not None else retry_after_seconds(retry_after_header))
    if code in (400, 403) and isinstance(description, str) and DESTINATION_GONE.search(description):
        return DeliveryError(reason, gone=True)
    if code == 401:  # the bot token is wrong or revoked: fix the setting, the rows wait
        return DeliveryError(m.credentials_refused(reason))
    return DeliveryError(reason, permanent=400 <= code < 500)


def _json(response: requests.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return None
