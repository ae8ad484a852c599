"""Email: over SMTP (one reused connection per run), or as .eml files in an outbox.

Both build the same MIME message: ``multipart/alternative`` with text/plain first and
text/html second (clients show the last part they understand), the deterministic
Message-ID of the delivery or digest, and the extra headers the renderer asked for.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import smtplib
import ssl
from datetime import datetime, timezone
from email import policy
from email.errors import MessageError
from email.message import EmailMessage as MimeMessage
from email.utils import format_datetime
from pathlib import Path

from alerts.channels import Channel, DeliveryError
from alerts.channels.http import describe, redact
from alerts.config import Settings
from alerts.messages import EmailMessage

MAX_FILENAME_STEM = 120


def build_mime(message: EmailMessage, sender: str, recipient: str, date: datetime | None = None) -> MimeMessage:
    """The MIME message both email channels deliver. Raises DeliveryError (permanent)
    for values no mail system would accept, such as a line break in the address."""
    try:
        mime = MimeMessage(policy=policy.SMTP)
        mime["From"] = sender
        mime["To"] = recipient
        mime["Subject"] = message.subject
        mime["Date"] = format_datetime(date or datetime.now(timezone.utc))
        mime["Message-ID"] = message.message_id
        for name, value in message.headers.items():
            del mime[name]
            mime[name] = value
        # quoted-printable: safe through relays without 8BITMIME and for long lines.
        mime.set_content(message.text, cte="quoted-printable")
        mime.add_alternative(message.html, subtype="html", cte="quoted-printable")
    except (ValueError, TypeError, MessageError) as exc:
        raise DeliveryError(f"email: cannot build the message: {describe(exc)}", permanent=True) from None
    return mime


class SmtpEmailChannel(Channel):
    """Opens one SMTP connection on first use and keeps it for the life of the object.

    Not thread-safe: a sender process (or Celery worker process) owns its own channel.
    """

    name = "email"

    def __init__(self, settings: Settings, ssl_context: ssl.SSLContext | None = None):
        self._settings = settings
        self._ssl_context = ssl_context  # tests pass one that trusts their own certificate
        self._smtp: smtplib.SMTP | None = None

    def send(self, recipient: str, message: EmailMessage) -> None:
        mime = build_mime(message, self._settings.email_from, recipient)
        reused = self._smtp is not None
        try:
            try:
                self._deliver(mime)
            except smtplib.SMTPServerDisconnected as exc:
                # The kept connection went stale (the server closed it while idle):
                # reconnect once. Not after a timeout: the server may still be busy
                # accepting this very message, and a resend could deliver it twice.
                if not reused or _timed_out(exc):
                    raise
                self._drop()
                self._deliver(mime)
        except Exception as exc:  # classified below; anything unknown (a bug) is re-raised
            error = classify(exc)
            if error is None or not _connection_survives(exc, self._smtp):
                self._drop()  # the next send starts on a fresh connection
            if error is None:
                raise
            raise DeliveryError(redact(error.reason, self._settings.smtp_password),
                                permanent=error.permanent) from None

    def close(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (smtplib.SMTPException, OSError):
                pass
            self._drop()

    # --- internals -----------------------------------------------------------------

    def _deliver(self, mime: MimeMessage) -> None:
        if self._smtp is None:
            self._smtp = self._connect()
        self._smtp.send_message(mime)

    def _connect(self) -> smtplib.SMTP:
        s = self._settings
        context = self._ssl_context or ssl.create_default_context()
        if s.smtp_tls == "ssl":
            smtp = smtplib.SMTP_SSL(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout_seconds, context=context)
        else:
            smtp = smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout_seconds)
        try:
            if s.smtp_tls == "starttls":
                smtp.starttls(context=context)
            if s.smtp_user:
                smtp.login(s.smtp_user, s.smtp_password or "")
        except BaseException:
            smtp.close()
            raise
        return smtp

    def _drop(self) -> None:
        if self._smtp is not None:
            self._smtp.close()
            self._smtp = None

def classify(exc: Exception) -> DeliveryError | None:
    """SMTP 4xx ⇒ transient, 5xx ⇒ permanent (with the server's words); network trouble
    ⇒ transient. None for exceptions that are not about delivery (bugs)."""
    code, text = _smtp_reply(exc)
    if code is not None:
        reason = f"smtp {code} {text}".rstrip()
        return DeliveryError(reason, permanent=500 <= code < 600)
    if isinstance(exc, smtplib.SMTPNotSupportedError):  # e.g. no STARTTLS, no SMTPUTF8
        return DeliveryError(f"smtp: {describe(exc)}", permanent=True)
    if isinstance(exc, ConnectionRefusedError):
        return DeliveryError("smtp: connection refused")
    if _timed_out(exc):
        return DeliveryError("smtp: no answer in time (timeout)")
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return DeliveryError("smtp: server closed the connection")
    if isinstance(exc, OSError):  # DNS, reset, TLS handshake or certificate
        return DeliveryError(f"smtp: {type(exc).__name__}: {describe(exc.strerror or exc)}")
    if isinstance(exc, smtplib.SMTPException):
        return DeliveryError(f"smtp: {describe(exc) or type(exc).__name__}")
    return None


def _timed_out(exc: BaseException) -> bool:
    """smtplib reports a read timeout as SMTPServerDisconnected raised from TimeoutError."""
    return isinstance(exc, TimeoutError) or (
        isinstance(exc, smtplib.SMTPServerDisconnected) and isinstance(exc.__context__, TimeoutError))


def _smtp_reply(exc: Exception) -> tuple[int | None, str]:
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
    return code, describe(text)


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
        self.last_path: Path | None = None  # the demo prints where mail went

    def send(self, recipient: str, message: EmailMessage) -> None:
        mime = build_mime(message, self._settings.email_from, recipient)
        path = self.outbox / f"{eml_stem(message.message_id)}.eml"
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.outbox.mkdir(parents=True, exist_ok=True)
            partial.write_bytes(mime.as_bytes())
            os.replace(partial, path)  # readers never see a half-written file
        except OSError as exc:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            raise DeliveryError(f"email outbox: cannot write {path}: {exc.strerror or exc}") from None
        self.last_path = path


def eml_stem(message_id: str) -> str:
    """A file name stem from a Message-ID: safe characters only, the same for the same id;
    when characters had to be replaced or cut, a short hash keeps distinct ids apart."""
    raw = message_id.strip().strip("<>")
    safe = re.sub(r"[^A-Za-z0-9@._+-]", "_", raw).lstrip(".")[:MAX_FILENAME_STEM]
    if safe == raw and safe:
        return safe
    digest = hashlib.sha256(message_id.encode("utf-8")).hexdigest()[:10]
    return f"{safe}-{digest}" if safe else f"message-{digest}"
