"""Telegram Bot API ``sendMessage``; the text is already HTML for ``parse_mode=HTML``.

Classification follows the Bot API error shape
``{"ok": false, "error_code": N, "description": "...", "parameters": {"retry_after": S}}``:
429 waits ``retry_after`` and retries, other 4xx (blocked bot, chat not found, bad
entities, bad token) are permanent, 5xx and unreadable gateway pages are transient.
The token is in the URL only; it never reaches a reason.
"""
from __future__ import annotations

import requests

from alerts.channels import Channel, DeliveryError
from alerts.channels.http import HttpClient, describe, redact, retry_after_seconds
from alerts.config import Settings
from alerts.messages import Message


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
                                retry_after=error.retry_after)

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
    if body is not None and body.get("description"):
        reason = f"telegram {code}: {describe(body['description'], *secrets)}"
    else:
        reason = f"telegram {code}: unexpected answer (HTTP {status}, {'no JSON' if body is None else 'no description'})"
    parameters = body.get("parameters") if body is not None else None
    parameters = parameters if isinstance(parameters, dict) else {}
    if parameters.get("migrate_to_chat_id"):
        reason += f" (group moved to chat {describe(parameters['migrate_to_chat_id'], *secrets)})"
    if code == 429:
        wait = retry_after_seconds(parameters.get("retry_after"))
        return DeliveryError(reason, retry_after=wait if wait is not None else retry_after_seconds(retry_after_header))
    return DeliveryError(reason, permanent=400 <= code < 500)


def _json(response: requests.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return None
