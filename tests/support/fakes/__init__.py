"""Fake providers for tests: a real SMTP server and a local HTTP server answering like
the Telegram Bot API and Twilio. Fixtures live in ``tests.support.fakes.fixtures``."""
from tests.support.fakes.provider_api import ProviderApi
from tests.support.fakes.smtp_server import FakeSmtpServer

__all__ = ["FakeSmtpServer", "ProviderApi"]
