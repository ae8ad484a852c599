"""The rendered message a channel sends: an email, or a text (Telegram HTML, SMS)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EmailMessage:
    subject: str
    text: str
    html: str
    message_id: str  # "<...@...>", deterministic per delivery / digest: the same on every retry
    headers: dict[str, str] = field(default_factory=dict)  # extra headers, e.g. X-Alerts-Digest-Key
    # The SMTP envelope sender (MAIL FROM) when it is not ALERTS_EMAIL_FROM's address: the
    # user's bounce address (VERP, alerts/core/tokens.py). The From header is unchanged.
    envelope_from: str | None = None


@dataclass(frozen=True)
class TextMessage:
    """A Telegram message (HTML parse mode) or an SMS body (plain text)."""

    text: str


Message = EmailMessage | TextMessage
