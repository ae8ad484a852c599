"""Which channels a run gets, what it says about the missing ones, and dry-run recording."""
from __future__ import annotations

import time
from dataclasses import replace
from datetime import datetime, timezone

import pytest

from alerts.channels.email import FileEmailChannel, SmtpEmailChannel
from alerts.channels.http import retry_after_seconds
from alerts.channels.recorder import RecordingChannel
from alerts.channels.registry import build_channels, recording_channels
from alerts.core.tables import RECIPIENT_COLUMNS
from alerts.channels.sms import TwilioSmsChannel
from alerts.channels.telegram import TelegramChannel
from alerts.core.settings import Settings
from alerts.messages import EmailMessage, TextMessage

EMAIL = EmailMessage("subject", "text", "<p>html</p>", "<delivery.1@energyriskiq.com>")
TEXT = TextMessage("<b>alert</b>")


@pytest.fixture
def bare_settings(tmp_path) -> Settings:
    return Settings.from_env({"DATABASE_URL": f"sqlite:///{tmp_path / 'unused.db'}",
                              "ALERTS_OUTBOX_DIR": str(tmp_path / "outbox")})


def test_it_names_the_missing_variable_for_each_unconfigured_channel(bare_settings):
    channels = build_channels(bare_settings)

    assert [channels.get(name) for name in ("email", "telegram", "sms")] == [None, None, None]
    assert channels.unconfigured_reason("email") == "email not configured: ALERTS_SMTP_HOST is not set"
    assert channels.unconfigured_reason("telegram") == "telegram not configured: ALERTS_TELEGRAM_BOT_TOKEN is not set"
    assert channels.unconfigured_reason("sms") == (
        "sms not configured: ALERTS_TWILIO_ACCOUNT_SID/ALERTS_TWILIO_AUTH_TOKEN/ALERTS_TWILIO_FROM are not set")


def test_it_names_only_the_twilio_variables_still_missing(bare_settings):
    channels = build_channels(replace(bare_settings, twilio_account_sid="AC1", twilio_auth_token="t"))
    assert channels.unconfigured_reason("sms") == "sms not configured: ALERTS_TWILIO_FROM is not set"


def test_it_builds_every_configured_channel(channel_settings):
    channels = build_channels(channel_settings)

    assert isinstance(channels.get("email"), SmtpEmailChannel)
    assert isinstance(channels.get("telegram"), TelegramChannel)
    assert isinstance(channels.get("sms"), TwilioSmsChannel)
    assert [channels.unconfigured_reason(name) for name in ("email", "telegram", "sms")] == [None, None, None]
    channels.close()


def test_the_file_backend_needs_no_smtp_host(bare_settings):
    channels = build_channels(replace(bare_settings, email_backend="file"))
    assert isinstance(channels.get("email"), FileEmailChannel)
    assert channels.unconfigured_reason("email") is None


def test_it_reports_an_unknown_channel_instead_of_crashing(bare_settings):
    channels = build_channels(bare_settings)
    assert channels.get("pigeon") is None
    assert channels.unconfigured_reason("pigeon") == "pigeon: unknown channel"


def test_close_ends_the_smtp_connection(channel_settings, smtp_server):
    channels = build_channels(channel_settings)
    channels.get("email").send("alice@example.com", EMAIL)
    assert smtp_server.open_connections == 1

    channels.close()

    deadline = time.monotonic() + 2
    while smtp_server.open_connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert smtp_server.open_connections == 0


# --- dry runs ----------------------------------------------------------------------------

def test_recording_channels_mirror_what_is_configured(bare_settings):
    settings = replace(bare_settings, telegram_bot_token="1:SECRET")
    real, recording = build_channels(settings), recording_channels(settings)

    for name in ("email", "telegram", "sms"):
        assert (recording.get(name) is None) == (real.get(name) is None)
        assert recording.unconfigured_reason(name) == real.unconfigured_reason(name)
    assert isinstance(recording.get("telegram"), RecordingChannel)


def test_recording_channels_record_in_order_and_send_nothing(channel_settings, smtp_server, provider_api):
    channels = recording_channels(channel_settings)

    channels.get("telegram").send("100", TEXT)
    channels.get("email").send("alice@example.com", EMAIL)
    channels.get("sms").send("+31612345678", TEXT)
    channels.close()

    assert channels.recorded() == [("telegram", "100", TEXT), ("email", "alice@example.com", EMAIL),
                                   ("sms", "+31612345678", TEXT)]
    assert smtp_server.messages == [] and smtp_server.connections == 0
    assert provider_api.requests == []


def test_real_channels_record_nothing(channel_settings):
    channels = build_channels(channel_settings)
    assert channels.recorded() == []


@pytest.mark.parametrize("channel, column", [("email", "email"), ("telegram", "telegram_chat_id"), ("sms", "phone")])
def test_each_channel_reads_its_address_from_its_users_column(channel, column):
    assert RECIPIENT_COLUMNS[channel] == column


@pytest.mark.parametrize("value, seconds", [
    ("30", 30.0), (7, 7.0), ("1.5", 1.5), (None, None), ("soon", None), (True, None), ("-5", 0.0),
    ("Tue, 12 May 2026 12:01:00 GMT", 60.0), ("Tue, 12 May 2026 11:00:00 GMT", 0.0),
])
def test_retry_after_values_become_seconds(value, seconds):
    now = datetime(2026, 5, 12, 12, 0, tzinfo=timezone.utc)
    assert retry_after_seconds(value, now) == seconds
