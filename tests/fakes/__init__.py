"""Fake providers for tests: a real SMTP server and a local HTTP server answering like
the Telegram Bot API and Twilio. Fixtures live in ``tests.fakes.fixtures``."""
from tests.fakes.provider_api import ProviderApi
from tests.fakes.smtp_server import FakeSmtpServer

__all__ = ["FakeSmtpServer", "ProviderApi"]
