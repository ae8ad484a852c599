"""Instant SMS through Twilio's Messages resource (form POST, basic auth).

2xx ⇒ accepted; 429 and 5xx ⇒ transient (honouring Retry-After); 401/403 ⇒ our
account's credentials were refused (a wrong token, a suspended account): transient, the
rows wait for the operator; any other 4xx ⇒ permanent with Twilio's error ``code`` and
``message`` (e.g. 21211, invalid number).
"""
from __future__ import annotations

from alerts.channels import Channel, DeliveryError
from alerts.channels.http import HttpClient, basic_auth_forms, describe, redact, retry_after_seconds
from alerts.core import tables as m
from alerts.core.settings import Settings
from alerts.messages import Message

CREDENTIALS_REFUSED_STATUSES = frozenset({401, 403})


class TwilioSmsChannel(Channel):
    name = "sms"

    def __init__(self, settings: Settings):
        self._sid = settings.twilio_account_sid or ""
        self._token = settings.twilio_auth_token or ""
        self._from = settings.twilio_from or ""
        self._url = f"{settings.twilio_api_base}/Accounts/{self._sid}/Messages.json"
        # The token, and the Basic credentials that carry it, should a proxy echo them.
        self._secrets = basic_auth_forms(self._sid, self._token)
        self._http = HttpClient("twilio", settings.http_timeout_seconds, secrets=self._secrets)

    def send(self, recipient: str, message: Message) -> None:
        response = self._http.post(self._url, auth=(self._sid, self._token),
                                   data={"To": recipient, "From": self._from, "Body": message.text})
        try:
            body = response.json()
        except ValueError:
            body = None
        error = classify(response.status_code, body, response.reason, response.headers.get("Retry-After"),
                         secrets=self._secrets)
        if error is not None:
            raise DeliveryError(redact(error.reason, *self._secrets), permanent=error.permanent,
                                retry_after=error.retry_after)

    def close(self) -> None:
        self._http.close()


def classify(status: int, body: object, http_reason: str | None = None,
             retry_after_header: str | None = None, *, secrets: tuple[str, ...] = ()) -> DeliveryError | None:
    """The error for one Twilio answer, or None when the message was accepted. ``secrets``
    are masked in the provider's text before it is shortened."""
    if 200 <= status < 300:
        return None
    body = body if isinstance(body, dict) else {}
    code, text = body.get("code"), body.get("message") or http_reason or "no description"
    code = describe(code, *secrets) if code else None
    reason = f"twilio {status}{f' {code}' if code else ''}: {describe(text, *secrets)}"
    if status == 429 or status >= 500:
        return DeliveryError(reason, retry_after=retry_after_seconds(retry_after_header))
    if status in CREDENTIALS_REFUSED_STATUSES:
        return DeliveryError(m.credentials_refused(reason))
    return DeliveryError(reason, permanent=400 <= status < 500)
