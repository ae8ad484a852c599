"""Rendering: events and digests into the message each channel sends (SPEC §5).

Channels never render; phases render with this package and hand the result over.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EmailMessage:
    subject: str
    text: str
    html: str
    message_id: str  # "<...@...>", deterministic per delivery / digest: the same on every retry
    headers: dict[str, str] = field(default_factory=dict)  # extra headers, e.g. X-Alerts-Digest-Key


@dataclass(frozen=True)
class TextMessage:
    """A Telegram message (HTML parse mode) or an SMS body (plain text)."""

    text: str


Message = EmailMessage | TextMessage


# Imported last: these modules build on the message types above.
from alerts.messages.digest import digest_message_id, render_digest, window_label  # noqa: E402
from alerts.messages.instant import render_instant  # noqa: E402
from alerts.messages.render import severity_label  # noqa: E402
from alerts.messages.telegram_fit import fit_telegram, telegram_length  # noqa: E402

__all__ = ["EmailMessage", "TextMessage", "Message", "render_instant", "render_digest", "severity_label",
           "digest_message_id", "window_label", "fit_telegram", "telegram_length"]
