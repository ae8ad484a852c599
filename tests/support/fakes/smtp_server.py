"""A real SMTP server (aiosmtpd) on 127.0.0.1 that stores what it receives and can be
told to fail: temporary or permanent refusals, a slow DATA answer, dropped connections.

Messages are kept as raw bytes and parsed on first access, so thousands of sends
(benchmarks, several sender processes) cost little.

    server = FakeSmtpServer().start()
    server.fail_data(times=2)                      # next 2 messages: 451 4.3.0 try later
    server.reject_recipient("gone@example.com")    # 550 5.1.1 mailbox unavailable
    server.data_delay = 1.0                        # answer DATA after a second
    server.drop_connections()                      # close every open session
    server.drop_after_data(times=1)                # take the next message, then hang up unanswered
"""
from __future__ import annotations

import asyncio
import email
import threading
import time
from dataclasses import dataclass, field
from email import policy
from functools import cached_property

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Session

TRY_LATER = "451 4.3.0 try later"
MAILBOX_UNAVAILABLE = "550 5.1.1 mailbox unavailable"
USER_NOT_LOCAL = "551 5.1.6 user not local; please try <gone@example.net>"
MAILBOX_NAME_NOT_ALLOWED = "553 5.1.3 mailbox name not allowed"
MESSAGE_REJECTED = "554 5.7.1 message content rejected"  # at DATA: this message, not the mailbox


@dataclass
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: tuple | None = None
    tls: bool = False  # arrived over TLS (STARTTLS or implicit)
    received_at: float = field(default_factory=time.time)  # when DATA was accepted (time.time())

    @cached_property
    def message(self) -> email.message.EmailMessage:
        return email.message_from_bytes(self.data, policy=policy.default)


@dataclass
class _Failure:
    reply: str
    times: int | None  # None ⇒ until reset


@dataclass
class _Script:
    mail: list[_Failure] = field(default_factory=list)
    data: list[_Failure] = field(default_factory=list)
    recipients: dict[str, str] = field(default_factory=dict)  # lower-cased address -> reply
    data_delay: float = 0.0
    drops: list[_Failure] = field(default_factory=list)  # hang up after taking a message's data


def _take(failures: list[_Failure]) -> str | None:
    """Consume one scripted reply, if any."""
    if not failures:
        return None
    failure = failures[0]
    if failure.times is not None:
        failure.times -= 1
        if failure.times <= 0:
            failures.pop(0)
    return failure.reply


class _Handler:
    """aiosmtpd hooks. Runs on the server's event loop thread; state shared with the
    test thread is guarded by the server's lock."""

    def __init__(self, server: "FakeSmtpServer"):
        self.server = server

    async def handle_MAIL(self, smtp, session, envelope, address, mail_options):
        with self.server._lock:
            reply = _take(self.server._script.mail)
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, smtp, session, envelope, address, rcpt_options):
        with self.server._lock:
            self.server.rcpt_log.append((address, time.time()))
            reply = self.server._script.recipients.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, smtp, session, envelope):
        with self.server._lock:
            delay = self.server._script.data_delay
        if delay:
            await asyncio.sleep(delay)
        with self.server._lock:
            reply = _take(self.server._script.data)
            if reply:
                return reply
            self.server._received.append(ReceivedMail(
                envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content or envelope.content),
                session.peer, smtp.transport.get_extra_info("ssl_object") is not None))
            drop = _take(self.server._script.drops)
        if drop:
            smtp.transport.close()  # the message is taken; the client never hears so
        return "250 2.0.0 OK queued"


class _Session(Session):
    login_data = None  # shadows a property aiosmtpd itself sets, and warns about, on AUTH


class _TrackingSMTP(SMTP):
    """Counts client connections (those that greet with EHLO/HELO, so the controller's
    start-up probe does not count) and remembers open ones so they can be dropped."""

    def __init__(self, server: "FakeSmtpServer", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fake = server
        self._counted = False

    def _create_session(self) -> Session:
        return _Session(self.loop)

    def connection_made(self, transport):
        fresh = self.transport is None  # STARTTLS calls this again for the same client
        super().connection_made(transport)
        if fresh:
            self._fake._sessions.add(self)

    def connection_lost(self, error):
        self._fake._sessions.discard(self)
        super().connection_lost(error)

    def _count(self):
        if not self._counted:
            self._counted = True
            with self._fake._lock:
                self._fake._connections += 1

    async def smtp_EHLO(self, arg):
        self._count()
        await super().smtp_EHLO(arg)

    async def smtp_HELO(self, arg):
        self._count()
        await super().smtp_HELO(arg)


class _Controller(Controller):
    def __init__(self, fake: "FakeSmtpServer", **kwargs):
        super().__init__(_Handler(fake), hostname="127.0.0.1", port=0, **kwargs)
        self._fake = fake

    def factory(self):
        return _TrackingSMTP(self._fake, self.handler, **self.SMTP_kwargs)

    def _create_server(self):
        async def bind_free_port():
            server = await super(_Controller, self)._create_server()
            self.port = server.sockets[0].getsockname()[1]
            return server

        return bind_free_port()


class FakeSmtpServer:
    def __init__(self, *, users: dict[str, str] | None = None, starttls_context=None, implicit_tls_context=None):
        """``users`` turns on AUTH (plain connections allowed); ``starttls_context``
        offers STARTTLS; ``implicit_tls_context`` makes it an SMTPS (port 465 style) server."""
        self._lock = threading.Lock()
        self._received: list[ReceivedMail] = []
        self._script = _Script()
        self._connections = 0
        self.rcpt_log: list[tuple[str, float]] = []  # (address, time.time()) of every RCPT TO
        self._sessions: set[_TrackingSMTP] = set()
        self.users = dict(users or {})
        kwargs = {"server_hostname": "fake-smtp.test", "ready_timeout": 10.0}
        if users is not None:
            kwargs.update(authenticator=self._authenticate, auth_require_tls=False)
        if starttls_context is not None:
            kwargs["tls_context"] = starttls_context
        if implicit_tls_context is not None:
            kwargs["ssl_context"] = implicit_tls_context
        self._controller = _Controller(self, **kwargs)

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> "FakeSmtpServer":
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> "FakeSmtpServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self._controller.port

    # --- what arrived --------------------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMail]:
        with self._lock:
            return list(self._received)

    @property
    def connections(self) -> int:
        """Client connections opened since start (or the last reset)."""
        with self._lock:
            return self._connections

    @property
    def open_connections(self) -> int:
        """Client connections open right now (updated on the server thread)."""
        return len(self._sessions)

    # --- scripting ---------------------------------------------------------------------

    def fail_data(self, reply: str = TRY_LATER, times: int | None = 1) -> None:
        """Answer the end of DATA with ``reply`` for the next ``times`` messages (None: always)."""
        with self._lock:
            self._script.data.append(_Failure(reply, times))

    def fail_mail_from(self, reply: str = TRY_LATER, times: int | None = 1) -> None:
        """Refuse MAIL FROM (smtplib: SMTPSenderRefused) for the next ``times`` messages."""
        with self._lock:
            self._script.mail.append(_Failure(reply, times))

    def reject_recipient(self, address: str, reply: str = MAILBOX_UNAVAILABLE) -> None:
        """Answer RCPT TO for this address with ``reply`` until reset."""
        with self._lock:
            self._script.recipients[address.lower()] = reply

    def drop_after_data(self, times: int | None = 1) -> None:
        """Take the next ``times`` messages, then close the connection before answering
        their DATA: the client cannot tell whether they arrived (they did)."""
        with self._lock:
            self._script.drops.append(_Failure("drop", times))

    @property
    def data_delay(self) -> float:
        with self._lock:
            return self._script.data_delay

    @data_delay.setter
    def data_delay(self, seconds: float) -> None:
        with self._lock:
            self._script.data_delay = seconds

    def drop_connections(self) -> None:
        """Close every open client session from the server side, and wait until done."""
        async def close_all():
            for session in list(self._sessions):
                if session.transport is not None:
                    session.transport.close()
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(close_all(), self._controller.loop).result(5)

    def reset(self) -> None:
        """Forget messages, counts and scripts; drop open sessions (tests start clean)."""
        self.drop_connections()
        with self._lock:
            self._received.clear()
            self.rcpt_log.clear()
            self._script = _Script()
            self._connections = 0

    def _authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        login = auth_data.login.decode() if isinstance(auth_data.login, bytes) else auth_data.login
        password = auth_data.password.decode() if isinstance(auth_data.password, bytes) else auth_data.password
        return AuthResult(success=self.users.get(login) == password, handled=False)  # aiosmtpd answers 535
