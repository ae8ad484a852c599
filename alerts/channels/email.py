"""Email: over SMTP (a reused connection per sending thread), or as .eml files in an outbox.

Both deliver the same bytes, built by ``build_mime`` with the standard library's
``email`` package — an ``EmailMessage`` with the SMTP policy (CRLF line ends, headers
encoded and folded to 78 characters): ``multipart/alternative`` with text/plain first
and text/html second (clients show the last part they understand), both UTF-8 and
quoted-printable, the deterministic Message-ID of the delivery or digest, and the extra
headers the renderer asked for. Line breaks in any header value are refused here,
explicitly, whatever the policy would make of them.
"""
from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import os
import re
import smtplib
import ssl
import threading
from datetime import datetime, timezone
from email import policy
from email.errors import MessageError
from email.headerregistry import HeaderRegistry, UnstructuredHeader
from email.message import EmailMessage as MimeMessage
from email.utils import format_datetime, getaddresses
from pathlib import Path

from alerts.channels import Channel, DeliveryError
from alerts.channels.http import describe, redact
from alerts.core import tables as m
from alerts.core.settings import Settings
from alerts.messages import EmailMessage

MAX_FILENAME_STEM = 120
# One boundary for every message. Both parts are quoted-printable, which writes "=" as
# "=3D", so no line of a part can contain "=_": the boundary can never clash with the
# text, the generator need not search for a clash, and the Content-Type header is the
# same parsed header in every message.
BOUNDARY = "=_energyriskiq-alerts"
HEADER_CACHE_SIZE = 1024  # parsed headers kept (a few hundred bytes each)
# Every character str.splitlines() breaks on, and NUL: none may reach a header, or a
# value could end its header line and start a forged one (Bcc:, a second Subject:).
_LINE_BREAK = re.compile("[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\x00]")
_HEADER_NAME = re.compile(r"[!-9;-~]+\Z")  # RFC 5322 ftext
# The renderer may add headers or replace the addressing ones, never the MIME structure.
_STRUCTURE_HEADERS = frozenset({"mime-version", "content-type", "content-transfer-encoding"})
# SMTP 5xx answers to RCPT that say the mailbox itself is gone (docs/policy.md).
RECIPIENT_GONE_CODES = frozenset({550, 551, 553})
# Answers that refuse our credentials, not the message: authentication required (530),
# mechanism too weak (534), credentials invalid (535), encryption required for it (538).
CREDENTIALS_REFUSED_CODES = frozenset({530, 534, 535, 538})
_SMTPUTF8_MISSING = ("One or more source or delivery addresses require internationalized email support, "
                     "but the server does not advertise the required SMTPUTF8 capability")


class _RememberingHeaders(HeaderRegistry):
    """The standard header registry, remembering what it made: the header class for each
    name (the stock registry builds a new class for every header of every message) and
    the parsed header for each (name, value) seen lately — the sender, the MIME
    structure headers and most subjects repeat from one message to the next. Parsed
    headers are immutable, so sharing them is safe.

    Building the message is the largest CPU cost of a send; what this saves, and how it
    was measured, is in docs/decisions.md ("Mechanisms kept for speed").
    """

    @functools.lru_cache(maxsize=None)
    def __getitem__(self, name: str):
        return super().__getitem__(name)

    @functools.lru_cache(maxsize=HEADER_CACHE_SIZE)
    def __call__(self, name: str, value: str):
        return super().__call__(name, value)


class _OneLineHeader(UnstructuredHeader):
    """Written as it is, on one line: the standard folding would split a long
    ``<https://…/unsubscribe/token>`` into RFC 2047 encoded words, which no mail provider
    reads as a URL (RFC 2369 wants it as it is). Non-ASCII values fold as usual."""

    def fold(self, *, policy):
        value = str(self)
        if value.isascii() and len(self.name) + len(value) + 2 <= 998:
            return f"{self.name}: {value}{policy.linesep}"
        return super().fold(policy=policy)


ONE_LINE_HEADERS = ("list-unsubscribe", "list-unsubscribe-post")


def _header_registry() -> HeaderRegistry:
    registry = _RememberingHeaders()
    for name in ONE_LINE_HEADERS:
        registry.map_to_type(name, _OneLineHeader)
    return registry


_POLICIES = {utf8: (policy.SMTPUTF8 if utf8 else policy.SMTP).clone(header_factory=_header_registry())
             for utf8 in (False, True)}


def build_mime(message: EmailMessage, sender: str, recipient: str, date: datetime | None = None,
               *, utf8: bool = False) -> bytes:
    """The MIME message both email channels deliver. ``utf8`` writes non-ASCII headers
    raw (for an SMTPUTF8 session) instead of RFC 2047 words. Raises DeliveryError
    (permanent) for values no mail system would accept, such as a line break in a header."""
    try:
        headers = {"from": ("From", sender), "to": ("To", recipient), "subject": ("Subject", message.subject),
                   "date": ("Date", format_datetime(date or datetime.now(timezone.utc))),
                   "message-id": ("Message-ID", message.message_id)}
        for name, value in message.headers.items():
            if name.lower() in _STRUCTURE_HEADERS:
                raise ValueError(f"header {name} is set by the email channel")
            headers.pop(name.lower(), None)  # replaced, and moved to the end
            headers[name.lower()] = (name, value)
        mime = MimeMessage(policy=_POLICIES[utf8])
        for name, value in headers.values():
            _check_header(name, value)
            mime[name] = value
        mime.set_content(message.text, subtype="plain", charset="utf-8", cte="quoted-printable")
        mime.make_alternative(boundary=BOUNDARY)
        mime.add_alternative(message.html, subtype="html", charset="utf-8", cte="quoted-printable")
        for part in mime.iter_parts():
            del part["MIME-Version"]  # make_alternative leaves it on the first part; it belongs on top only
        return mime.as_bytes()
    except (ValueError, TypeError, MessageError) as exc:
        raise DeliveryError(f"email: cannot build the message: {describe(exc)}", permanent=True) from None


def _check_header(name: str, value: str) -> None:
    if not isinstance(name, str) or not _HEADER_NAME.match(name):
        raise ValueError(f"invalid header name {name!r}")
    if not isinstance(value, str):
        raise TypeError(f"header {name}: value must be text, not {type(value).__name__}")
    if _LINE_BREAK.search(value):
        raise ValueError(f"header {name}: values may not contain line breaks")


def envelope_sender(sender: str) -> str:
    """The address in a From value ("Name <addr>" ⇒ addr), as smtplib would take it."""
    return getaddresses([sender])[0][1]


def needs_smtputf8(*addresses: str) -> bool:
    return not "".join(addresses).isascii()


class SmtpEmailChannel(Channel):
    """Each thread that sends opens one SMTP connection on its first send and keeps it
    for the life of the channel: an SMTP conversation is one message at a time, and a
    new connection costs a real provider TCP, TLS, EHLO and AUTH round trips."""

    name = "email"

    def __init__(self, settings: Settings, ssl_context: ssl.SSLContext | None = None):
        self._settings = settings
        self._ssl_context = ssl_context  # tests pass one that trusts their own certificate
        self._from = envelope_sender(settings.email_from)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: set[smtplib.SMTP] = set()  # every thread's, for close()

    @property
    def _smtp(self) -> smtplib.SMTP | None:
        return getattr(self._local, "smtp", None)

    @_smtp.setter
    def _smtp(self, smtp: smtplib.SMTP | None) -> None:
        with self._lock:
            if self._smtp is not None:
                self._all.discard(self._smtp)
            if smtp is not None:
                self._all.add(smtp)
        self._local.smtp = smtp

    def send(self, recipient: str, message: EmailMessage) -> None:
        sender = message.envelope_from or self._from  # MAIL FROM: the bounce address (VERP) when set
        international = needs_smtputf8(sender, recipient)
        mime = build_mime(message, self._settings.email_from, recipient, utf8=international)
        reused = self._smtp is not None
        try:
            try:
                self._deliver(sender, recipient, mime, international)
            except smtplib.SMTPServerDisconnected as exc:
                # The kept connection went stale (the server closed it while idle):
                # reconnect once — only when none of the message was written to it. Not
                # after a timeout, nor once its data went out: the server may have taken
                # (or still be taking) this very message, and a resend could deliver it
                # twice. That attempt is a transient failure; the retry carries the same
                # Message-ID, so a receiver can drop a copy.
                if not reused or _timed_out(exc) or _data_sent(self._smtp):
                    raise
                self._drop()
                self._deliver(sender, recipient, mime, international)
        except Exception as exc:  # classified below; anything unknown (a bug) is re-raised
            secrets = smtp_secrets(self._settings.smtp_user, self._settings.smtp_password)
            error = classify(exc, secrets=secrets, data_sent=_data_sent(self._smtp))
            if error is None or not _connection_survives(exc, self._smtp):
                self._drop()  # the next send starts on a fresh connection
            if error is None:
                raise
            raise DeliveryError(redact(error.reason, *secrets), permanent=error.permanent, gone=error.gone) from None

    def close(self) -> None:
        """Quit every thread's connection (at the end of a run or a worker's life)."""
        with self._lock:
            connections, self._all = list(self._all), set()
        for smtp in connections:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                smtp.quit()
            smtp.close()
        self._local = threading.local()

    # --- internals -----------------------------------------------------------------

    def _deliver(self, sender: str, recipient: str, mime: bytes, international: bool) -> None:
        if self._smtp is None:
            self._smtp = self._connect()
        self._smtp.data_sent = False
        options: tuple[str, ...] = ()
        if international:  # what smtplib's send_message does for such addresses
            self._smtp.ehlo_or_helo_if_needed()
            if not self._smtp.has_extn("smtputf8"):
                raise smtplib.SMTPNotSupportedError(_SMTPUTF8_MISSING)
            options = ("SMTPUTF8", "BODY=8BITMIME")
        self._smtp.sendmail(sender, [recipient], mime, options)

    def _connect(self) -> smtplib.SMTP:
        s = self._settings
        # Only a TLS connection needs a context: making one loads the system's CA certificates.
        context = None if s.smtp_tls == "none" else self._ssl_context or ssl.create_default_context()
        if s.smtp_tls == "ssl":
            smtp = _TrackedSMTP_SSL(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout_seconds, context=context)
        else:
            smtp = _TrackedSMTP(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout_seconds)
        try:
            if s.smtp_tls == "starttls":
                smtp.starttls(context=context)
            if s.smtp_user:
                _login(smtp, s.smtp_user, s.smtp_password or "")
        except BaseException:
            smtp.close()
            raise
        return smtp

    def _drop(self) -> None:
        smtp = self._smtp
        if smtp is not None:
            self._smtp = None
            smtp.close()


class _DataTracking:
    """An SMTP connection that knows whether any of the current message's data has been
    handed to its socket: smtplib writes commands as text and the message (DATA's
    content) as bytes. Set before the write, so a write that fails half-way counts."""

    data_sent = False

    def send(self, s):
        if isinstance(s, bytes):
            self.data_sent = True
        return super().send(s)


class _TrackedSMTP(_DataTracking, smtplib.SMTP):
    pass


class _TrackedSMTP_SSL(_DataTracking, smtplib.SMTP_SSL):
    pass


def _data_sent(smtp: smtplib.SMTP | None) -> bool:
    return bool(getattr(smtp, "data_sent", False))


class LoginImpossible(smtplib.SMTPException):
    """The server offers no way to log in with what we have (no AUTH, no common
    mechanism): our configuration's fault, like a wrong password."""


def _login(smtp: smtplib.SMTP, user: str, password: str) -> None:
    try:
        smtp.login(user, password)
    except (smtplib.SMTPResponseException, smtplib.SMTPServerDisconnected):
        raise  # a refusal (535 …) is classified by its code; a drop is network trouble
    except smtplib.SMTPException as exc:
        raise LoginImpossible(str(exc)) from exc


def smtp_secrets(user: str | None, password: str | None) -> tuple[str, ...]:
    """The password and the AUTH PLAIN / AUTH LOGIN strings that carry it, as a server
    might echo them in a reply."""
    if not password:
        return ()
    plain = base64.b64encode(f"\0{user or ''}\0{password}".encode()).decode()
    login = base64.b64encode(password.encode()).decode()
    return (password, plain, login)


def classify(exc: Exception, *, secrets: tuple[str, ...] = (), data_sent: bool = False) -> DeliveryError | None:
    """SMTP 4xx ⇒ transient, 5xx ⇒ permanent (with the server's words); a refusal of our
    credentials (530/534/535/538, no way to log in) and network trouble ⇒ transient.
    None for exceptions that are not about delivery (bugs). ``secrets`` are masked in
    the server's words before they are shortened. ``data_sent``: the message's data had
    gone out when the connection was lost (it may have arrived)."""
    code, text = _smtp_reply(exc, secrets)
    if code is not None:
        reason = f"smtp {code} {text}".rstrip()
        if code in CREDENTIALS_REFUSED_CODES:
            return DeliveryError(m.credentials_refused(reason))
        gone = isinstance(exc, smtplib.SMTPRecipientsRefused) and code in RECIPIENT_GONE_CODES
        return DeliveryError(reason, permanent=500 <= code < 600, gone=gone)
    if isinstance(exc, LoginImpossible):
        return DeliveryError(m.credentials_refused(f"smtp: cannot log in: {describe(exc, *secrets)}"))
    if isinstance(exc, smtplib.SMTPNotSupportedError):  # e.g. no STARTTLS, no SMTPUTF8
        return DeliveryError(f"smtp: {describe(exc, *secrets)}", permanent=True)
    if isinstance(exc, ConnectionRefusedError):
        return DeliveryError("smtp: connection refused")
    if _timed_out(exc):
        return DeliveryError("smtp: no answer in time (timeout)")
    if isinstance(exc, smtplib.SMTPServerDisconnected) and data_sent:
        return DeliveryError("smtp: connection lost after the message's data, before the server's answer")
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return DeliveryError("smtp: server closed the connection")
    if isinstance(exc, OSError):  # DNS, reset, TLS handshake or certificate
        return DeliveryError(f"smtp: {type(exc).__name__}: {describe(exc.strerror or exc, *secrets)}")
    if isinstance(exc, smtplib.SMTPException):
        return DeliveryError(f"smtp: {describe(exc, *secrets) or type(exc).__name__}")
    return None


def _timed_out(exc: BaseException) -> bool:
    """smtplib reports a read timeout as SMTPServerDisconnected raised from TimeoutError."""
    return isinstance(exc, TimeoutError) or (
        isinstance(exc, smtplib.SMTPServerDisconnected) and isinstance(exc.__context__, TimeoutError))


def _smtp_reply(exc: Exception, secrets: tuple[str, ...] = ()) -> tuple[int | None, str]:
    """The (code, text) a server answered with, when the exception carries one."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused) and exc.recipients:
        code, text = next(iter(exc.recipients.values()))
    elif isinstance(exc, smtplib.SMTPResponseException):
        code, text = exc.smtp_code, exc.smtp_error
    else:
        return None, ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not isinstance(code, int) or not 400 <= code < 600:
        return None, ""
    return code, describe(text, *secrets)


def _connection_survives(exc: Exception, smtp: smtplib.SMTP | None) -> bool:
    """A refused sender/recipient/message leaves the session usable (smtplib sends RSET);
    anything else (timeouts, drops, 421) leaves it in an unknown state."""
    refused = isinstance(exc, (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused, smtplib.SMTPDataError))
    return refused and smtp is not None and getattr(smtp, "sock", None) is not None


class FileEmailChannel(Channel):
    """Writes each message to ``<outbox>/<Message-ID>.eml``; a retry overwrites the same
    file, so writing is idempotent."""

    name = "email"

    def __init__(self, settings: Settings):
        self._settings = settings
        self.outbox = Path(settings.outbox_dir)

    def send(self, recipient: str, message: EmailMessage) -> None:
        mime = build_mime(message, self._settings.email_from, recipient,
                          utf8=needs_smtputf8(envelope_sender(self._settings.email_from), recipient))
        path = self.outbox / f"{eml_stem(message.message_id)}.eml"
        partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.outbox.mkdir(parents=True, exist_ok=True)
            partial.write_bytes(mime)
            os.replace(partial, path)  # readers never see a half-written file
        except OSError as exc:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            raise DeliveryError(f"email outbox: cannot write {path}: {exc.strerror or exc}") from None


def eml_stem(message_id: str) -> str:
    """A file name stem from a Message-ID: safe characters only, the same for the same id;
    when characters had to be replaced or cut, a short hash keeps distinct ids apart."""
    raw = message_id.strip().strip("<>")
    safe = re.sub(r"[^A-Za-z0-9@._+-]", "_", raw).lstrip(".")[:MAX_FILENAME_STEM]
    if safe == raw and safe:
        return safe
    digest = hashlib.sha256(message_id.encode("utf-8")).hexdigest()[:10]
    return f"{safe}-{digest}" if safe else f"message-{digest}"
