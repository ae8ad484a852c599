"""SMTP against a real server (aiosmtpd): our credentials refused is transient and marked
(never the recipients' fault), and a message is resent at once only when none of it left."""
from __future__ import annotations

from dataclasses import replace

import pytest

from alerts.channels import DeliveryError
from alerts.channels.email import SmtpEmailChannel
from alerts.core import tables as m
from alerts.messages import EmailMessage
from tests.support.fakes.smtp_server import FakeSmtpServer

PASSWORD = "hunter2-SMTP-SECRET"


def message(n: int) -> EmailMessage:
    return EmailMessage(subject=f"alert {n}", text=f"alert {n}", html=f"<p>alert {n}</p>",
                        message_id=f"<delivery.{n}@energyriskiq.com>")


@pytest.fixture
def channel(channel_settings):
    smtp = SmtpEmailChannel(channel_settings)
    yield smtp
    smtp.close()


def failure(channel, recipient: str = "alice@example.com", n: int = 1) -> DeliveryError:
    with pytest.raises(DeliveryError) as caught:
        channel.send(recipient, message(n))
    return caught.value


# --- our credentials ----------------------------------------------------------------------

def test_a_wrong_password_535_is_transient_marked_and_never_a_block(channel_settings):
    with FakeSmtpServer(users={"alerts": PASSWORD}) as server:
        channel = SmtpEmailChannel(replace(channel_settings, smtp_port=server.port, smtp_user="alerts",
                                           smtp_password="wrong-" + PASSWORD))
        error = failure(channel)
        channel.close()

    assert (error.permanent, error.gone) == (False, False)
    assert error.reason.startswith(m.CREDENTIALS_REFUSED + " smtp 535")
    assert PASSWORD not in error.reason


def test_authentication_required_530_is_transient_and_marked(channel, smtp_server):
    smtp_server.fail_mail_from("530 5.7.0 Authentication required", times=1)

    error = failure(channel)

    assert not error.permanent
    assert error.reason == "credentials refused: smtp 530 5.7.0 Authentication required"
    channel.send("alice@example.com", message(2))  # the next attempt goes through
    assert len(smtp_server.messages) == 1


def test_a_server_that_offers_no_login_is_a_transient_credentials_refusal(channel_settings, smtp_server):
    """A user is configured but the server offers no AUTH: our configuration to fix."""
    channel = SmtpEmailChannel(replace(channel_settings, smtp_user="alerts", smtp_password=PASSWORD))

    error = failure(channel)
    channel.close()

    assert not error.permanent
    assert error.reason == "credentials refused: smtp: cannot log in: SMTP AUTH extension not supported by server."
    assert smtp_server.messages == []


# --- resending only what never left --------------------------------------------------------

def test_a_reused_connection_found_dead_before_the_message_is_retried_at_once(channel, smtp_server):
    channel.send("alice@example.com", message(1))
    smtp_server.drop_connections()  # the server closed the idle connection

    channel.send("bob@example.com", message(2))

    assert [mail.rcpt_tos for mail in smtp_server.messages] == [["alice@example.com"], ["bob@example.com"]]
    assert smtp_server.connections == 2


def test_a_connection_lost_after_the_messages_data_is_a_transient_failure_not_a_resend(channel, smtp_server):
    channel.send("alice@example.com", message(1))  # the connection is now a reused one
    smtp_server.drop_after_data(times=1)

    error = failure(channel, "bob@example.com", 2)

    assert not error.permanent
    assert error.reason == "smtp: connection lost after the message's data, before the server's answer"
    # The server took it once; a resend at once would have delivered it twice.
    assert [mail.message["Message-ID"] for mail in smtp_server.messages] == [
        "<delivery.1@energyriskiq.com>", "<delivery.2@energyriskiq.com>"]
    assert smtp_server.connections == 1

    channel.send("carol@example.com", message(3))  # the next send opens a fresh connection
    assert smtp_server.connections == 2 and len(smtp_server.messages) == 3


def test_a_first_connection_lost_after_the_data_is_the_same_transient_failure(channel, smtp_server):
    smtp_server.drop_after_data(times=1)

    error = failure(channel)

    assert not error.permanent and "after the message's data" in error.reason
    assert len(smtp_server.messages) == 1
