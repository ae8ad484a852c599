"""Rendering: events and digests into the message each channel sends (docs/policy.md).

Channels never render; phases render with this package and hand the result over.
"""
from alerts.messages.digest import digest_message_id, render_digest, window_label
from alerts.messages.instant import render_instant
from alerts.messages.render import severity_label
from alerts.messages.telegram_fit import fit_telegram, telegram_length
from alerts.messages.types import EmailMessage, Message, TextMessage

__all__ = ["EmailMessage", "TextMessage", "Message", "render_instant", "render_digest", "severity_label",
           "digest_message_id", "window_label", "fit_telegram", "telegram_length"]
