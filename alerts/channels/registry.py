"""Which channels a run can use, built once from Settings.

A channel without configuration is absent, with a reason naming the missing variables;
the send phase marks its rows ``skipped`` with that reason instead of crashing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from alerts.channels import Channel
from alerts.channels.email import FileEmailChannel, SmtpEmailChannel
from alerts.channels.recorder import Recorded, RecordingChannel
from alerts.channels.sms import TwilioSmsChannel
from alerts.channels.telegram import TelegramChannel
from alerts.core.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ChannelSet:
    channels: dict[str, Channel] = field(default_factory=dict)
    unconfigured: dict[str, str] = field(default_factory=dict)  # name -> why it is absent
    log: list[Recorded] = field(default_factory=list)  # what recording channels were given
    # What a Telegram send asks first (alerts/sending/ratelimit.py), set by whoever runs
    # the sends: the runner's session, a worker's state. None: no limit to ask.
    limiter: Any = None

    def get(self, name: str) -> Channel | None:
        return self.channels.get(name)

    def unconfigured_reason(self, name: str) -> str | None:
        if name in self.channels:
            return None
        return self.unconfigured.get(name, f"{name}: unknown channel")

    def recorded(self) -> list[Recorded]:
        """(channel, recipient, message) for every send a dry run would have made."""
        return list(self.log)

    def close(self) -> None:
        """Close every channel. Runs in ``finally`` blocks, so a failing close is logged,
        not raised: it must not hide the run's own outcome or keep the others open."""
        for name, channel in self.channels.items():
            try:
                channel.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("closing the %s channel failed: %s", name, type(exc).__name__)


def missing_configuration(settings: Settings) -> dict[str, str | None]:
    """For each channel: None when configured, else the reason it is not."""
    if settings.email_backend == "file" or settings.smtp_host:
        email = None
    else:
        email = "email not configured: ALERTS_SMTP_HOST is not set"
    telegram = None if settings.telegram_bot_token else "telegram not configured: ALERTS_TELEGRAM_BOT_TOKEN is not set"
    twilio = {"ALERTS_TWILIO_ACCOUNT_SID": settings.twilio_account_sid,
              "ALERTS_TWILIO_AUTH_TOKEN": settings.twilio_auth_token,
              "ALERTS_TWILIO_FROM": settings.twilio_from}
    unset = [name for name, value in twilio.items() if not value]
    sms = f"sms not configured: {'/'.join(unset)} {'is' if len(unset) == 1 else 'are'} not set" if unset else None
    return {"email": email, "telegram": telegram, "sms": sms}


def _email(settings: Settings) -> Channel:
    return FileEmailChannel(settings) if settings.email_backend == "file" else SmtpEmailChannel(settings)


_BUILDERS: dict[str, Callable[[Settings], Channel]] = {
    "email": _email, "telegram": TelegramChannel, "sms": TwilioSmsChannel,
}


def build_channels(settings: Settings) -> ChannelSet:
    """The real channels; connections open lazily, on the first send."""
    missing = missing_configuration(settings)
    return ChannelSet(
        channels={name: _BUILDERS[name](settings) for name, reason in missing.items() if reason is None},
        unconfigured={name: reason for name, reason in missing.items() if reason is not None},
    )


def recording_channels(settings: Settings) -> ChannelSet:
    """For --dry-run: the same channels as build_channels, each one only recording."""
    missing = missing_configuration(settings)
    log: list[Recorded] = []
    return ChannelSet(
        channels={name: RecordingChannel(name, log) for name, reason in missing.items() if reason is None},
        unconfigured={name: reason for name, reason in missing.items() if reason is not None},
        log=log,
    )
