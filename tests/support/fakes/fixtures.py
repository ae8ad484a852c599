"""Pytest fixtures for the fake providers (registered in conftest with
``pytest_plugins = ["tests.support.fakes.fixtures"]``).

One SMTP server and one provider API run for the whole session; the function-scoped
fixtures reset them (messages, counts, scripts, open connections) before each test.
"""
from __future__ import annotations

from dataclasses import replace

import pytest

from alerts.core.settings import Settings
from tests.support.fakes.provider_api import ProviderApi
from tests.support.fakes.smtp_server import FakeSmtpServer

# Short enough that a test of a hung provider is quick, long enough never to fire on a
# busy 2-core machine by accident.
FAKE_TIMEOUT_SECONDS = 5.0


@pytest.fixture(scope="session")
def smtp_server_session():
    with FakeSmtpServer() as server:
        yield server


@pytest.fixture
def smtp_server(smtp_server_session) -> FakeSmtpServer:
    smtp_server_session.reset()
    yield smtp_server_session
    smtp_server_session.reset()


@pytest.fixture(scope="session")
def provider_api_session():
    with ProviderApi() as api:
        yield api


@pytest.fixture
def provider_api(provider_api_session) -> ProviderApi:
    provider_api_session.reset()
    yield provider_api_session
    provider_api_session.reset()


def with_fakes(settings: Settings, smtp: FakeSmtpServer | None = None, api: ProviderApi | None = None) -> Settings:
    """``settings`` with every channel pointed at the fakes (those given)."""
    changes: dict = {}
    if smtp is not None:
        changes.update(email_backend="smtp", smtp_host=smtp.host, smtp_port=smtp.port, smtp_tls="none",
                       smtp_user=None, smtp_password=None, smtp_timeout_seconds=FAKE_TIMEOUT_SECONDS)
    if api is not None:
        changes.update(telegram_bot_token=api.bot_token, telegram_api_base=api.telegram_api_base,
                       twilio_account_sid=api.twilio_sid, twilio_auth_token=api.twilio_token,
                       twilio_from="+15005550006", twilio_api_base=api.twilio_api_base,
                       http_timeout_seconds=FAKE_TIMEOUT_SECONDS)
    return replace(settings, **changes)


@pytest.fixture
def channel_settings(tmp_path, smtp_server, provider_api) -> Settings:
    """Settings for channel-only tests: no database, all channels at the fakes."""
    base = Settings.from_env({"DATABASE_URL": f"sqlite:///{tmp_path / 'unused.db'}",
                              "ALERTS_OUTBOX_DIR": str(tmp_path / "outbox")})
    return with_fakes(base, smtp_server, provider_api)


@pytest.fixture
def live_settings(settings, smtp_server, provider_api) -> Settings:
    """The database-parametrised ``settings`` with all channels at the fakes."""
    return with_fakes(settings, smtp_server, provider_api)
