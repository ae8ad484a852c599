"""Twilio SMS channel against a local server that answers like Twilio's Messages API."""
from __future__ import annotations

import socket
import traceback
from dataclasses import replace

import pytest

from alerts.channels import DeliveryError
from alerts.channels.sms import TwilioSmsChannel, classify
from alerts.messages import TextMessage
from tests.support.fakes.provider_api import INVALID_TO

BODY = TextMessage("EnergyRiskIQ: Pipeline outage NL (high) #7 https://e.com/7")


@pytest.fixture
def channel(channel_settings):
    sms = TwilioSmsChannel(channel_settings)
    yield sms
    sms.close()


def failure(channel, to="+31612345678") -> DeliveryError:
    with pytest.raises(DeliveryError) as err:
        channel.send(to, BODY)
    return err.value


def everything_said(error: DeliveryError) -> str:
    return error.reason + repr(error) + "".join(traceback.format_exception(error))


def test_it_posts_to_from_and_body_with_basic_auth(channel, channel_settings, provider_api):
    channel.send("+31612345678", BODY)

    (sent,) = provider_api.sms_messages
    assert (sent.to, sent.from_, sent.body) == ("+31612345678", channel_settings.twilio_from, BODY.text)
    assert sent.account_sid == channel_settings.twilio_account_sid


def test_it_fails_permanently_on_an_invalid_number_with_twilios_code(channel, provider_api):
    error = failure(channel, to="0612")

    assert error.permanent
    assert error.reason == f"twilio 400 21211: {INVALID_TO}"
    assert provider_api.sms_messages == []


def test_it_honours_retry_after_on_429(channel, provider_api):
    provider_api.twilio_error(429, 20429, "Too Many Requests", retry_after="30", times=1)

    error = failure(channel)
    channel.send("+31612345678", BODY)

    assert not error.permanent
    assert error.retry_after == 30
    assert error.reason == "twilio 429 20429: Too Many Requests"


def test_it_retries_server_errors(channel, provider_api):
    provider_api.twilio_error(503, 20503, "Service Unavailable")
    error = failure(channel)
    assert not error.permanent
    assert error.retry_after is None


def test_wrong_credentials_are_a_transient_failure_that_never_shows_the_token(channel_settings, provider_api):
    """Our account's credentials are not the recipients' fault: the rows wait for the operator."""
    channel = TwilioSmsChannel(replace(channel_settings, twilio_auth_token="wrong-SECRET-token"))
    error = failure(channel)
    assert not error.permanent and not error.gone
    assert error.reason == "credentials refused: twilio 401 20003: Authenticate"
    assert "wrong-SECRET-token" not in everything_said(error)


def test_it_retries_a_timeout_without_showing_the_token(channel_settings, provider_api):
    provider_api.delay(2.0, service="twilio", times=1)
    error = failure(TwilioSmsChannel(replace(channel_settings, http_timeout_seconds=0.3)))
    assert not error.permanent
    assert "timeout" in error.reason
    assert provider_api.twilio_token not in everything_said(error)


def test_it_retries_a_refused_connection_without_showing_the_token(channel_settings):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    error = failure(TwilioSmsChannel(replace(channel_settings, twilio_api_base=f"http://127.0.0.1:{port}/2010-04-01")))
    assert not error.permanent
    assert error.reason == "twilio: connection refused"
    assert channel_settings.twilio_auth_token not in everything_said(error)


@pytest.mark.parametrize("status, body, http_reason, header, expected", [
    (201, {"sid": "SM1", "status": "queued"}, "Created", None, None),
    (400, {"code": 21211, "message": INVALID_TO}, "Bad Request", None, (True, None, f"twilio 400 21211: {INVALID_TO}")),
    (400, {"code": 21610, "message": "Attempt to send to unsubscribed recipient"}, "Bad Request", None,
     (True, None, "twilio 400 21610: Attempt to send to unsubscribed recipient")),
    (404, None, "Not Found", None, (True, None, "twilio 404: Not Found")),
    (401, {"code": 20003, "message": "Authenticate"}, "Unauthorized", None,
     (False, None, "credentials refused: twilio 401 20003: Authenticate")),
    (403, {"code": 20003, "message": "Permission Denied"}, "Forbidden", None,
     (False, None, "credentials refused: twilio 403 20003: Permission Denied")),
    (429, {"code": 20429, "message": "Too Many Requests"}, "Too Many Requests", "5",
     (False, 5.0, "twilio 429 20429: Too Many Requests")),
    (429, None, "Too Many Requests", "soon", (False, None, "twilio 429: Too Many Requests")),
    (500, None, "Internal Server Error", None, (False, None, "twilio 500: Internal Server Error")),
    (503, {"code": 20503, "message": "Service Unavailable"}, "Service Unavailable", "120",
     (False, 120.0, "twilio 503 20503: Service Unavailable")),
])
def test_it_classifies_twilio_answers(status, body, http_reason, header, expected):
    error = classify(status, body, http_reason, header)
    assert (None if error is None else (error.permanent, error.retry_after, error.reason)) == expected
