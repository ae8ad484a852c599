"""Email channels against a real SMTP server (aiosmtpd) and a real outbox directory."""
from __future__ import annotations

import email
import ipaddress
import smtplib
import socket
import ssl
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from email import policy

import pytest

from alerts.channels import DeliveryError
from alerts.channels.email import BOUNDARY, FileEmailChannel, SmtpEmailChannel, build_mime, classify, eml_stem
from alerts.messages import EmailMessage
from tests.support.fakes.smtp_server import FakeSmtpServer

PASSWORD = "hunter2-SMTP-SECRET"

MESSAGE = EmailMessage(
    subject="EnergyRiskIQ daily digest — 2026-05-12 (2 alerts)",
    text="2 alerts ✓\nPipeline outage NL",
    html="<p>2 alerts ✓</p><p>Pipeline outage NL</p>",
    message_id="<digest.42.abc@energyriskiq.com>",
    headers={"X-Alerts-Digest-Key": "u1:email:daily:2026-05-11T22:00Z"},
)


def message(n: int) -> EmailMessage:
    return replace(MESSAGE, subject=f"alert {n}", message_id=f"<delivery.{n}@energyriskiq.com>")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def channel(channel_settings):
    smtp = SmtpEmailChannel(channel_settings)
    yield smtp
    smtp.close()


# --- the message -------------------------------------------------------------------------

def test_it_sends_multipart_alternative_with_text_before_html(channel, smtp_server):
    channel.send("alice@example.com", MESSAGE)

    (mail,) = smtp_server.messages
    msg = mail.message
    assert mail.rcpt_tos == ["alice@example.com"]
    assert mail.mail_from == "alerts@energyriskiq.com"
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert parts[0].get_content().replace("\r\n", "\n").strip() == MESSAGE.text
    assert parts[1].get_content().strip() == MESSAGE.html


def test_it_keeps_the_message_id_subject_and_extra_headers(channel, smtp_server):
    channel.send("alice@example.com", MESSAGE)

    msg = smtp_server.messages[0].message
    assert msg["Message-ID"] == MESSAGE.message_id
    assert msg["Subject"] == MESSAGE.subject
    assert msg["X-Alerts-Digest-Key"] == MESSAGE.headers["X-Alerts-Digest-Key"]
    assert msg["From"] == "EnergyRiskIQ Alerts <alerts@energyriskiq.com>"
    assert msg["To"] == "alice@example.com"
    assert abs(msg["Date"].datetime - datetime.now(timezone.utc)) < timedelta(minutes=1)


def test_it_refuses_a_recipient_that_would_inject_headers():
    with pytest.raises(DeliveryError) as err:
        build_mime(MESSAGE, "alerts@energyriskiq.com", "alice@example.com\r\nBcc: eve@example.com")
    assert err.value.permanent


# Every character that ends a line for str.splitlines(), and NUL.
LINE_BREAKS = ["\r\n", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\x00"]


@pytest.mark.parametrize("brk", LINE_BREAKS, ids=[repr(b) for b in LINE_BREAKS])
@pytest.mark.parametrize("field", ["recipient", "sender", "subject", "message_id", "extra header"])
def test_it_refuses_a_line_break_in_any_header_value(field, brk):
    injected = f"x{brk}Bcc: eve@example.com"
    message, sender, recipient = MESSAGE, "alerts@energyriskiq.com", "alice@example.com"
    if field == "recipient":
        recipient = "alice@example.com" + injected
    elif field == "sender":
        sender += injected
    elif field == "subject":
        message = replace(MESSAGE, subject=injected)
    elif field == "message_id":
        message = replace(MESSAGE, message_id=f"<{injected}@x>")
    else:
        message = replace(MESSAGE, headers={"X-Alerts-Digest-Key": injected})

    with pytest.raises(DeliveryError) as err:
        build_mime(message, sender, recipient)
    assert err.value.permanent and "line break" in err.value.reason


@pytest.mark.parametrize("name", ["X-Bad Name", "X-Bad:Name", "", "X-Bad\r\nBcc", "Content-Type", "MIME-Version",
                                  "content-transfer-encoding"])
def test_it_refuses_a_malformed_or_structural_extra_header_name(name):
    with pytest.raises(DeliveryError) as err:
        build_mime(replace(MESSAGE, headers={name: "v"}), "alerts@energyriskiq.com", "alice@example.com")
    assert err.value.permanent


def test_a_refused_message_never_reaches_the_server(channel, smtp_server):
    with pytest.raises(DeliveryError):
        channel.send("alice@example.com", replace(MESSAGE, subject="hi\u2028Bcc: eve@example.com"))
    channel.send("bob@example.com", MESSAGE)

    assert [mail.rcpt_tos for mail in smtp_server.messages] == [["bob@example.com"]]


HOSTILE_TEXT = ("Prices ✓ up 18% = a lot\n"
                "A line far longer than seventy-six characters, so quoted-printable has to break it softly"
                " somewhere in the middle — twice, in fact, because it goes on and on and on\n"
                "trailing spaces   \n"
                "\ttab first\n.\n..two dots\nFrom the start of a line\r\nold mac line\rend =?utf-8?q?x?=\n"
                "--=_not_a_boundary\n")
HOSTILE = EmailMessage(
    subject="EnergyRiskIQ daily digest — 2026-05-12 (51 alerts) with a title long enough to be folded 🔥",
    text=HOSTILE_TEXT, html="<p>" + HOSTILE_TEXT.replace("\n", "<br>") + "</p>",
    message_id="<digest-0f3a@alerts.energyriskiq.com>",
    headers={"X-Alerts-Digest-Key": "7:email:daily:2026-05-11T22:00:00Z"})
SENT_AT = datetime(2026, 5, 13, 0, 1, tzinfo=timezone.utc)


def reference_mime(message: EmailMessage, sender: str, recipient: str) -> email.message.EmailMessage:
    """What the channel built before with the standard library's EmailMessage API."""
    from email.message import EmailMessage as StdMessage
    from email.utils import format_datetime

    mime = StdMessage(policy=policy.SMTP)
    mime["From"], mime["To"], mime["Subject"] = sender, recipient, message.subject
    mime["Date"], mime["Message-ID"] = format_datetime(SENT_AT), message.message_id
    for name, value in message.headers.items():
        mime[name] = value
    mime.set_content(message.text, cte="quoted-printable")
    mime.add_alternative(message.html, subtype="html", cte="quoted-printable")
    return email.message_from_bytes(mime.as_bytes(), policy=policy.default)


@pytest.mark.parametrize("message", [MESSAGE, HOSTILE], ids=["plain", "hostile"])
def test_the_message_reads_back_as_the_standard_library_built_it(message):
    sender, recipient = "EnergyRiskIQ Alerts <alerts@energyriskiq.com>", "alice@example.com"
    ours = email.message_from_bytes(build_mime(message, sender, recipient, SENT_AT), policy=policy.default)
    theirs = reference_mime(message, sender, recipient)

    for name in ("From", "To", "Subject", "Date", "Message-ID", "X-Alerts-Digest-Key"):
        assert str(ours[name]) == str(theirs[name]), name
    assert ours.get_content_type() == theirs.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in ours.iter_parts()] == ["text/plain", "text/html"]
    for mine, reference in zip(ours.iter_parts(), theirs.iter_parts()):
        assert mine["Content-Transfer-Encoding"] == "quoted-printable"
        assert mine.get_content_charset() == "utf-8"
        assert mine.get_content().replace("\r\n", "\n") == reference.get_content().replace("\r\n", "\n")
    assert ours.defects == [] and all(part.defects == [] for part in ours.walk())


def stock_mime(message: EmailMessage, sender: str, recipient: str, *, utf8: bool) -> bytes:
    """The same steps as build_mime, with the standard library's own header registry."""
    from email.message import EmailMessage as StdMessage
    from email.utils import format_datetime

    mime = StdMessage(policy=policy.SMTPUTF8 if utf8 else policy.SMTP)
    mime["From"], mime["To"], mime["Subject"] = sender, recipient, message.subject
    mime["Date"], mime["Message-ID"] = format_datetime(SENT_AT), message.message_id
    for name, value in message.headers.items():
        mime[name] = value
    mime.set_content(message.text, subtype="plain", charset="utf-8", cte="quoted-printable")
    mime.make_alternative(boundary=BOUNDARY)
    mime.add_alternative(message.html, subtype="html", charset="utf-8", cte="quoted-printable")
    for part in mime.iter_parts():
        del part["MIME-Version"]
    return mime.as_bytes()


@pytest.mark.parametrize("utf8", [False, True], ids=["ascii", "smtputf8"])
@pytest.mark.parametrize("message", [MESSAGE, HOSTILE], ids=["plain", "hostile"])
def test_remembered_headers_are_written_byte_for_byte_as_the_stock_registry_writes_them(message, utf8):
    sender, recipient = "EnergyRiskIQ Alerts <alerts@energyriskiq.com>", "alice@example.com"
    other = replace(message, subject=message.subject + " (2)", message_id="<other@alerts.energyriskiq.com>")
    reference = stock_mime(message, sender, recipient, utf8=utf8)
    # Built again and again, so later builds take the parsed and folded headers from the cache.
    builds = [build_mime(m, sender, recipient, SENT_AT, utf8=utf8) for m in (message, other, message, message)]

    assert builds[0] == builds[2] == builds[3] == reference
    assert builds[1] == stock_mime(other, sender, recipient, utf8=utf8)


def test_no_line_of_a_part_can_be_the_boundary():
    raw = build_mime(HOSTILE, "alerts@energyriskiq.com", "alice@example.com", SENT_AT)
    body = raw.split(b"\r\n\r\n", 1)[1]
    lines = body.split(b"\r\n")
    assert BOUNDARY.encode() in raw
    # Only the delimiters carry the boundary: quoted-printable writes "=" as "=3D".
    assert [line for line in lines if BOUNDARY.encode() in line] == [
        b"--" + BOUNDARY.encode(), b"--" + BOUNDARY.encode(), b"--" + BOUNDARY.encode() + b"--"]


def test_the_raw_message_has_crlf_lines_of_at_most_78_characters_and_ascii_only():
    raw = build_mime(HOSTILE, "EnergyRiskIQ Alerts <alerts@energyriskiq.com>", "alice@example.com", SENT_AT)

    assert raw.isascii()
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    assert [line.split(":")[0] for line in head.split("\r\n") if not line.startswith(" ")] == [
        "From", "To", "Subject", "Date", "Message-ID", "X-Alerts-Digest-Key", "MIME-Version", "Content-Type"]


def test_the_message_id_is_the_same_on_every_build():
    def message_id_line(raw: bytes) -> bytes:
        return next(line for line in raw.split(b"\r\n") if line.startswith(b"Message-ID:"))

    first = build_mime(MESSAGE, "alerts@energyriskiq.com", "alice@example.com", SENT_AT)
    retry = build_mime(MESSAGE, "alerts@energyriskiq.com", "alice@example.com", SENT_AT + timedelta(hours=1))
    assert message_id_line(first) == message_id_line(retry) == b"Message-ID: " + MESSAGE.message_id.encode()


def test_an_extra_header_may_replace_an_addressing_header():
    raw = build_mime(replace(MESSAGE, headers={"subject": "replaced"}), "alerts@energyriskiq.com",
                     "alice@example.com", SENT_AT)
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert msg.get_all("Subject") == ["replaced"]


# --- internationalised addresses ------------------------------------------------------------

class _Recorder:
    def __init__(self):
        self.envelopes = []

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append(envelope)
        return "250 OK"


@contextmanager
def plain_aiosmtpd(smtputf8: bool):
    """A bare aiosmtpd server that offers SMTPUTF8 or not: (port, recorded envelopes)."""
    from aiosmtpd.controller import Controller

    handler = _Recorder()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(), enable_SMTPUTF8=smtputf8)
    controller.start()
    try:
        yield controller.port, handler.envelopes
    finally:
        controller.stop()


def test_a_non_ascii_address_fails_permanently_when_the_server_lacks_smtputf8(channel_settings):
    with plain_aiosmtpd(smtputf8=False) as (port, envelopes):
        channel = SmtpEmailChannel(replace(channel_settings, smtp_port=port))
        with pytest.raises(DeliveryError) as err:
            channel.send("jörg@example.com", MESSAGE)
        channel.send("alice@example.com", MESSAGE)  # the connection is still fine for others
        channel.close()

    assert err.value.permanent and "SMTPUTF8" in err.value.reason
    assert [envelope.rcpt_tos for envelope in envelopes] == [["alice@example.com"]]


def test_a_non_ascii_address_is_sent_with_smtputf8_when_the_server_offers_it(channel_settings):
    with plain_aiosmtpd(smtputf8=True) as (port, envelopes):
        channel = SmtpEmailChannel(replace(channel_settings, smtp_port=port))
        channel.send("jörg@example.com", MESSAGE)
        channel.close()

    (envelope,) = envelopes
    assert envelope.rcpt_tos == ["jörg@example.com"]
    assert "SMTPUTF8" in envelope.mail_options
    msg = email.message_from_bytes(envelope.original_content, policy=policy.default)
    assert msg["To"] == "jörg@example.com" and msg["Message-ID"] == MESSAGE.message_id


# --- connections -------------------------------------------------------------------------

def test_it_opens_no_connection_before_the_first_send(channel_settings, smtp_server):
    SmtpEmailChannel(channel_settings).close()
    assert smtp_server.connections == 0


def test_it_reuses_one_connection_for_many_sends(channel, smtp_server):
    for n in range(25):
        channel.send(f"user{n}@example.com", message(n))

    assert len(smtp_server.messages) == 25
    assert smtp_server.connections == 1


def test_it_reconnects_once_when_the_server_dropped_the_connection(channel, smtp_server):
    channel.send("alice@example.com", message(1))
    smtp_server.drop_connections()

    channel.send("bob@example.com", message(2))

    assert [m.rcpt_tos for m in smtp_server.messages] == [["alice@example.com"], ["bob@example.com"]]
    assert smtp_server.connections == 2


def test_it_keeps_the_connection_after_a_refused_recipient(channel, smtp_server):
    smtp_server.reject_recipient("gone@example.com")

    with pytest.raises(DeliveryError):
        channel.send("gone@example.com", message(1))
    channel.send("alice@example.com", message(2))

    assert smtp_server.connections == 1
    assert len(smtp_server.messages) == 1


def test_it_starts_a_new_connection_after_a_timeout(channel_settings, smtp_server):
    channel = SmtpEmailChannel(replace(channel_settings, smtp_timeout_seconds=0.3))
    smtp_server.data_delay = 1.0
    with pytest.raises(DeliveryError) as err:
        channel.send("alice@example.com", message(1))
    smtp_server.data_delay = 0

    channel.send("alice@example.com", message(2))
    channel.close()

    assert not err.value.permanent
    assert "timeout" in err.value.reason
    assert smtp_server.connections == 2  # not resent on the timed-out connection


# --- classification ----------------------------------------------------------------------

def test_it_fails_permanently_on_a_5xx_with_the_servers_words(channel, smtp_server):
    smtp_server.reject_recipient("gone@example.com")

    with pytest.raises(DeliveryError) as err:
        channel.send("gone@example.com", MESSAGE)

    assert err.value.permanent
    assert err.value.reason == "smtp 550 5.1.1 mailbox unavailable"


def test_it_retries_a_4xx_after_data(channel, smtp_server):
    smtp_server.fail_data("451 4.3.0 try later", times=1)

    with pytest.raises(DeliveryError) as err:
        channel.send("alice@example.com", MESSAGE)
    channel.send("alice@example.com", MESSAGE)

    assert not err.value.permanent
    assert err.value.reason == "smtp 451 4.3.0 try later"
    assert len(smtp_server.messages) == 1


def test_it_retries_a_temporarily_refused_sender(channel, smtp_server):
    smtp_server.fail_mail_from("421 4.7.0 too many connections, slow down")

    with pytest.raises(DeliveryError) as err:
        channel.send("alice@example.com", MESSAGE)

    assert not err.value.permanent
    assert err.value.reason.startswith("smtp 421")


def test_it_retries_when_the_connection_is_refused(channel_settings):
    channel = SmtpEmailChannel(replace(channel_settings, smtp_port=free_port()))

    with pytest.raises(DeliveryError) as err:
        channel.send("alice@example.com", MESSAGE)

    assert not err.value.permanent
    assert err.value.reason == "smtp: connection refused"


REPLY_TABLE = [
    # exception                                                            permanent  reason
    (smtplib.SMTPRecipientsRefused({"a@x": (550, b"5.1.1 no such user")}),  True,  "smtp 550 5.1.1 no such user"),
    (smtplib.SMTPRecipientsRefused({"a@x": (452, b"4.2.2 mailbox full")}),  False, "smtp 452 4.2.2 mailbox full"),
    (smtplib.SMTPSenderRefused(553, b"5.7.1 sender rejected", "a@x"),       True,  "smtp 553 5.7.1 sender rejected"),
    (smtplib.SMTPDataError(554, b"5.7.1 spam"),                              True,  "smtp 554 5.7.1 spam"),
    (smtplib.SMTPDataError(451, b"4.3.0 try later"),                         False, "smtp 451 4.3.0 try later"),
    (smtplib.SMTPAuthenticationError(535, b"5.7.8 bad credentials"),         False,
     "credentials refused: smtp 535 5.7.8 bad credentials"),
    (smtplib.SMTPSenderRefused(530, b"5.7.0 Authentication required", "a@x"), False,
     "credentials refused: smtp 530 5.7.0 Authentication required"),
    (smtplib.SMTPConnectError(421, b"busy"),                                 False, "smtp 421 busy"),
    (smtplib.SMTPServerDisconnected("Connection unexpectedly closed"),      False, "smtp: server closed the connection"),
    (ConnectionRefusedError(111, "Connection refused"),                     False, "smtp: connection refused"),
    (TimeoutError("timed out"),                                             False, "smtp: no answer in time (timeout)"),
    (socket.gaierror(-2, "Name or service not known"),                      False, "smtp: gaierror: Name or service not known"),
    (smtplib.SMTPNotSupportedError("STARTTLS extension not supported by server."), True,
     "smtp: STARTTLS extension not supported by server."),
]


@pytest.mark.parametrize("exc, permanent, reason", REPLY_TABLE, ids=[type(row[0]).__name__ + str(i) for i, row in enumerate(REPLY_TABLE)])
def test_it_classifies_smtp_failures(exc, permanent, reason):
    error = classify(exc)
    assert (error.permanent, error.reason) == (permanent, reason)


def test_it_calls_a_timeout_during_a_reply_a_timeout():
    try:
        try:
            raise TimeoutError("timed out")
        except TimeoutError:
            raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed: timed out")
    except smtplib.SMTPServerDisconnected as exc:
        assert classify(exc).reason == "smtp: no answer in time (timeout)"


def test_it_leaves_bugs_unclassified():
    assert classify(KeyError("x")) is None


# --- authentication and TLS --------------------------------------------------------------

@pytest.fixture
def auth_server():
    with FakeSmtpServer(users={"alerts": PASSWORD}) as server:
        yield server


def test_it_logs_in_when_a_user_is_set(channel_settings, auth_server):
    settings = replace(channel_settings, smtp_port=auth_server.port, smtp_user="alerts", smtp_password=PASSWORD)
    channel = SmtpEmailChannel(settings)
    channel.send("alice@example.com", MESSAGE)
    channel.close()
    assert len(auth_server.messages) == 1


def test_bad_credentials_are_a_transient_failure_that_never_shows_the_password(channel_settings, auth_server):
    """Our wrong password is not the recipients' fault: the rows wait for the operator."""
    settings = replace(channel_settings, smtp_port=auth_server.port, smtp_user="alerts", smtp_password=PASSWORD + "x")
    with pytest.raises(DeliveryError) as err:
        SmtpEmailChannel(settings).send("alice@example.com", MESSAGE)
    assert not err.value.permanent and not err.value.gone
    assert err.value.reason.startswith("credentials refused: smtp 535")
    assert PASSWORD not in err.value.reason


@pytest.mark.parametrize("port, delay", [("refused", 0), ("server", 1.0)], ids=["refused", "timeout"])
def test_it_never_shows_the_password_on_network_failures(channel_settings, auth_server, port, delay):
    settings = replace(channel_settings, smtp_port=free_port() if port == "refused" else auth_server.port,
                       smtp_user="alerts", smtp_password=PASSWORD, smtp_timeout_seconds=0.3)
    auth_server.data_delay = delay
    with pytest.raises(DeliveryError) as err:
        SmtpEmailChannel(settings).send("alice@example.com", MESSAGE)
    assert not err.value.permanent
    assert PASSWORD not in err.value.reason and PASSWORD not in repr(err.value)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1: (cert path, key path)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return str(folder / "cert.pem"), str(folder / "key.pem")


def server_context(certificate) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


@pytest.mark.parametrize("mode", ["starttls", "ssl"])
def test_it_encrypts_the_connection_when_told_to(channel_settings, certificate, mode):
    tls = {"starttls_context": server_context(certificate)} if mode == "starttls" else \
          {"implicit_tls_context": server_context(certificate)}
    with FakeSmtpServer(users={"alerts": PASSWORD}, **tls) as server:
        settings = replace(channel_settings, smtp_port=server.port, smtp_tls=mode, smtp_user="alerts",
                           smtp_password=PASSWORD)
        channel = SmtpEmailChannel(settings, ssl_context=ssl.create_default_context(cafile=certificate[0]))
        channel.send("alice@example.com", message(1))
        channel.send("bob@example.com", message(2))
        channel.close()
        assert [m.tls for m in server.messages] == [True, True]
        assert server.connections == 1


def test_it_refuses_an_untrusted_certificate_as_a_transient_failure(channel_settings, certificate):
    with FakeSmtpServer(implicit_tls_context=server_context(certificate)) as server:
        channel = SmtpEmailChannel(replace(channel_settings, smtp_port=server.port, smtp_tls="ssl"))
        with pytest.raises(DeliveryError) as err:
            channel.send("alice@example.com", MESSAGE)
    assert not err.value.permanent
    assert "CERTIFICATE_VERIFY_FAILED" in err.value.reason or "certificate" in err.value.reason


def test_it_fails_permanently_when_starttls_is_required_but_not_offered(channel_settings, smtp_server):
    channel = SmtpEmailChannel(replace(channel_settings, smtp_tls="starttls"))
    with pytest.raises(DeliveryError) as err:
        channel.send("alice@example.com", MESSAGE)
    assert err.value.permanent
    assert "STARTTLS" in err.value.reason
    assert smtp_server.messages == []


# --- the file outbox ---------------------------------------------------------------------

def read_eml(path) -> email.message.EmailMessage:
    return email.message_from_bytes(path.read_bytes(), policy=policy.default)


def test_it_writes_each_message_as_an_eml_file_in_a_new_outbox(channel_settings, tmp_path):
    settings = replace(channel_settings, email_backend="file", outbox_dir=str(tmp_path / "new" / "outbox"))
    channel = FileEmailChannel(settings)

    channel.send("alice@example.com", MESSAGE)

    (written,) = (tmp_path / "new" / "outbox").iterdir()
    assert written.name == "digest.42.abc@energyriskiq.com.eml"
    msg = read_eml(written)
    assert msg["Message-ID"] == MESSAGE.message_id
    assert msg["To"] == "alice@example.com"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]


def test_it_overwrites_the_same_file_on_a_retry(channel_settings, tmp_path):
    channel = FileEmailChannel(replace(channel_settings, outbox_dir=str(tmp_path / "outbox")))

    channel.send("alice@example.com", MESSAGE)
    channel.send("alice@example.com", replace(MESSAGE, subject="second try"))

    (only,) = (tmp_path / "outbox").iterdir()
    assert read_eml(only)["Subject"] == "second try"


def test_it_reports_an_unwritable_outbox_as_transient(channel_settings, tmp_path):
    (tmp_path / "blocker").write_text("a file where the outbox directory should be")
    channel = FileEmailChannel(replace(channel_settings, outbox_dir=str(tmp_path / "blocker" / "outbox")))
    with pytest.raises(DeliveryError) as err:
        channel.send("alice@example.com", MESSAGE)
    assert not err.value.permanent


@pytest.mark.parametrize("message_id, stem", [
    ("<digest.42.abc@energyriskiq.com>", "digest.42.abc@energyriskiq.com"),
    ("<delivery-7+x@energyriskiq.com>", "delivery-7+x@energyriskiq.com"),
    ("<../../etc/passwd@x>", "_.._etc_passwd@x-" + "{hash}"),
    ("<a b/c@x>", "a_b_c@x-{hash}"),
    ("<>", "message-{hash}"),
])
def test_it_derives_a_safe_file_name_from_the_message_id(message_id, stem):
    result = eml_stem(message_id)
    prefix = stem.split("{hash}")[0]
    assert result.startswith(prefix)
    assert len(result) == len(prefix) + (10 if "{hash}" in stem else 0)
    assert "/" not in result and not result.startswith(".")
    assert eml_stem(message_id) == result  # the same id always gives the same file


def test_it_keeps_ids_apart_that_differ_only_in_unsafe_characters():
    assert eml_stem("<a/b@x>") != eml_stem("<a_b@x>")
