"""Asynchronous bounces and complaints: what ``alerts bounce`` does with one message an
MTA pipes in (docs/bounces.md).

Real providers accept a message at RCPT and report trouble later, to the envelope
sender. With ``ALERTS_BOUNCE_ADDRESS`` set every email goes out with the envelope sender
``local+TOKEN@domain`` (alerts/core/tokens.py), so the report comes back carrying a
token that names the user:

    read_report(raw)            parse, with the standard ``email`` package: a delivery
                                status notification (RFC 3464: multipart/report with a
                                message/delivery-status part), an abuse feedback report
                                (RFC 5965: a message/feedback-report part), or neither
    decide(report, settings)    which user (the first authentic token, in the search
                                order below) and what to do — no database needed, so a
                                forged or foreign report never waits for one
    apply(engine, decision)     the change, through the functions the synchronous paths
                                use: a permanent failure (5.x.x) blocks the user's email
                                as an SMTP 550 at RCPT does (sending/blocks.record plus
                                outbox.skip_queued, one transaction); an abuse report
                                unsubscribes the user's email as the one-click POST does

Where the token is looked for, first authentic one wins: ``--recipient`` (what the MTA
pipe passes), the report's ``Delivered-To``, ``X-Original-To`` and ``To``, the
``Return-Path`` of the original message the report carries, and the ARF field
``Original-Mail-From`` (the original envelope sender, which some feedback loops give
when they redact the original's headers). Everything else — a temporary failure
(4.x.x), a report without an authentic token, a DSN for an address the user has since
changed, a message that is no report at all — changes nothing, and is never bounced
back: the caller exits 0 with one line saying so.
"""
from __future__ import annotations

import email
import email.errors
import email.parser
import email.policy
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from email.message import Message
from email.utils import getaddresses

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from alerts.channels.http import describe
from alerts.core import tables as m
from alerts.core import tokens
from alerts.core.db import is_postgres
from alerts.core.settings import Settings
from alerts.sending import blocks
from alerts.sending.outbox import skip_queued
from alerts.subscribers import unsubscribe as unsub

log = logging.getLogger(__name__)

CHANNEL = "email"
DSN, ARF = "delivery status notification", "abuse report"
DSN_PARTS = ("message/delivery-status", "message/global-delivery-status")  # RFC 3464, RFC 6533
ARF_PART = "message/feedback-report"  # RFC 5965
ORIGINAL_PARTS = ("message/rfc822", "text/rfc822-headers", "message/global", "message/global-headers")
ABUSE = "abuse"
# RFC 3464 status: class.subject.detail; 2 success, 4 persistent transient, 5 permanent.
_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})\b")
# What the email package may raise on a malformed message (its header parsers have raised
# each of these on hostile input): such a message is "not a report", never a crash.
PARSE_ERRORS = (email.errors.MessageError, ValueError, TypeError, IndexError, LookupError, AttributeError)


@dataclass(frozen=True)
class Recipient:
    """One per-recipient block of a DSN."""

    final_recipient: str  # the address, its type ("rfc822;") removed
    status: str  # "5.1.1"; "" when missing or malformed
    diagnostic: str  # the Diagnostic-Code's text, its type ("smtp;") removed, on one line

    @property
    def permanent(self) -> bool:
        return self.status.startswith("5.")

    @property
    def temporary(self) -> bool:
        return self.status.startswith("4.")


@dataclass(frozen=True)
class Report:
    kind: str | None  # DSN, ARF, or None: not a report we act on
    recipients: tuple[Recipient, ...] = ()
    feedback_type: str | None = None
    addresses: tuple[str, ...] = ()  # where a token may be, in search order (after --recipient)


@dataclass(frozen=True)
class Decision:
    """What to do for which user; ``failed`` are the DSN's permanent failures."""

    user_id: int
    kind: str
    failed: tuple[Recipient, ...] = ()


# --- reading ---------------------------------------------------------------------------------

def read_report(raw: bytes) -> Report:
    """The report in ``raw`` (one whole message, as the MTA hands it over)."""
    try:
        message = email.message_from_bytes(raw, policy=email.policy.default)
        return _report(message)
    except PARSE_ERRORS as exc:
        log.info("not a readable message: %s", type(exc).__name__)
        return Report(None)


def _report(message: Message) -> Report:
    if message.get_content_type() != "multipart/report" or not message.is_multipart():
        return Report(None)
    parts = list(message.iter_parts())
    kinds = {part.get_content_type() for part in parts}
    addresses = _envelope_addresses(message) + _original_senders(parts)
    if kinds & set(DSN_PARTS):
        part = next(p for p in parts if p.get_content_type() in DSN_PARTS)
        return Report(DSN, recipients=_recipients(part), addresses=addresses)
    if ARF_PART in kinds:
        fields = _field_blocks(next(p for p in parts if p.get_content_type() == ARF_PART))
        first = fields[0] if fields else Message()
        feedback_type = str(first.get("Feedback-Type", "")).strip().lower() or None
        mail_from = [str(value) for value in first.get_all("Original-Mail-From") or []]
        return Report(ARF, feedback_type=feedback_type, addresses=addresses + _addresses(mail_from))
    return Report(None, addresses=addresses)


def _envelope_addresses(message: Message) -> tuple[str, ...]:
    """The report's own recipients, in the search order: Delivered-To, X-Original-To, To."""
    found: list[str] = []
    for name in ("Delivered-To", "X-Original-To", "To"):
        found += _addresses([str(value) for value in message.get_all(name) or []])
    return tuple(found)


def _original_senders(parts: list[Message]) -> tuple[str, ...]:
    """The Return-Path of the original message (or its headers) the report carries."""
    for part in parts:
        if part.get_content_type() not in ORIGINAL_PARTS:
            continue
        original = _original(part)
        if original is not None:
            return _addresses([str(value) for value in original.get_all("Return-Path") or []])
    return ()


def _original(part: Message) -> Message | None:
    payload = part.get_payload()
    if isinstance(payload, list):  # message/rfc822: parsed already
        return payload[0] if payload else None
    text = part.get_payload(decode=True) or b""  # text/rfc822-headers, possibly encoded
    return email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(text)


def _field_blocks(part: Message) -> list[Message]:
    """The blocks of header fields of a message/delivery-status or message/feedback-report
    part. The parser splits message/delivery-status into blocks itself; another message/*
    type comes as one message (its first block as headers, the others as its body), whose
    body is split here with the same header parser."""
    payload = part.get_payload()
    if not isinstance(payload, list) or not payload:
        return []
    if part.get_content_type() == "message/delivery-status":
        return payload
    first, rest = payload[0], payload[0].get_payload()
    if not isinstance(rest, str) or not rest.strip():
        return [first]
    parser = email.parser.HeaderParser(policy=email.policy.default)
    return [first] + [parser.parsestr(block + "\n") for block in re.split(r"\r?\n[ \t]*\r?\n", rest.strip())
                      if block.strip()]


def _recipients(part: Message) -> tuple[Recipient, ...]:
    """The per-recipient blocks (every block after the per-message one that names a
    Final-Recipient)."""
    found = []
    for block in _field_blocks(part)[1:]:
        final = _typed_value(block.get("Final-Recipient"))
        if not final:
            continue
        status = _STATUS.match(str(block.get("Status", "")).strip())
        found.append(Recipient(final_recipient=final.strip("<>").strip(),
                               status=status.group(0) if status else "",
                               diagnostic=describe(_typed_value(block.get("Diagnostic-Code")))))
    return tuple(found)


def _typed_value(value: object) -> str:
    """``type; value`` (Final-Recipient: rfc822; a@b, Diagnostic-Code: smtp; 550 …) → value."""
    if value is None:
        return ""
    text = " ".join(str(value).split())
    kind, sep, rest = text.partition(";")
    return (rest if sep else kind).strip()


def _addresses(values: list[str]) -> tuple[str, ...]:
    return tuple(address for _, address in getaddresses(values) if address)


# --- deciding ----------------------------------------------------------------------------------

def find_user(addresses: tuple[str, ...], settings: Settings) -> int | None:
    """The user named by the first authentic bounce token among ``addresses``."""
    if not settings.bounce_address or not settings.secret_key:
        return None
    local = settings.bounce_address.rpartition("@")[0].lower()
    for address in addresses:
        base, plus, token = address.rpartition("@")[0].partition("+")
        if not plus or base.lower() != local:
            continue
        try:
            return tokens.read_bounce_token(settings.secret_key, token)
        except tokens.BadToken:
            log.info("ignoring a bounce address whose token is not authentic")
    return None


def decide(report: Report, settings: Settings, recipient: str | None = None) -> Decision | str:
    """What to do, or — when nothing is to be done — the line that says why."""
    if report.kind is None:
        return "nothing done: not a delivery status notification or an abuse feedback report"
    given = _addresses([recipient]) if recipient else ()
    user_id = find_user(given + report.addresses, settings)
    if user_id is None:
        return f"nothing done: {report.kind} without an authentic bounce token"
    if report.kind == ARF:
        if report.feedback_type != ABUSE:
            return f"nothing done: feedback report of type {report.feedback_type or 'none'}, not abuse"
        return Decision(user_id, ARF)
    failed = tuple(r for r in report.recipients if r.permanent)
    if failed:
        return Decision(user_id, DSN, failed)
    temporary = [r.status for r in report.recipients if r.temporary]
    if temporary:
        return f"nothing done: temporary failure ({', '.join(temporary)}) for user {user_id}"
    return f"nothing done: no permanent failure in the delivery status notification for user {user_id}"


# --- acting -----------------------------------------------------------------------------------

def apply(engine: Engine, decision: Decision, now: datetime) -> str:
    """Make the change in one transaction; the line that says what was done."""
    with engine.begin() as conn:
        address = _current_email(conn, decision.user_id)
        if address is None:
            return f"nothing done: user {decision.user_id} no longer exists"
        if decision.kind == ARF:
            return _unsubscribe(conn, decision.user_id)
        return _block(conn, decision, address, now)


def _current_email(conn: Connection, user_id: int) -> str | None:
    """The user's email as a send uses it (trimmed; '' when none), None for no such user.
    Locked on PostgreSQL, so the address cannot change between the check and the block."""
    u = m.users
    query = sa.select(sa.func.coalesce(blocks.current_address(sa.literal(CHANNEL)), "")).where(u.c.id == user_id)
    if is_postgres(conn):
        query = query.with_for_update(of=u)
    return conn.execute(query).scalar()


def _unsubscribe(conn: Connection, user_id: int) -> str:
    counts = unsub.unsubscribe(conn, user_id, CHANNEL)
    skipped = counts.get(m.user_alert_deliveries.name, 0) + counts.get(m.user_alert_digests.name, 0)
    log.info("user %s unsubscribed from email by an abuse report", user_id)
    return (f"unsubscribed user {user_id} from email (abuse report): {counts['prefs']} subscription(s) off, "
            f"{skipped} queued row(s) skipped")


def _block(conn: Connection, decision: Decision, address: str, now: datetime) -> str:
    matching = [r for r in decision.failed if address and r.final_recipient.lower() == address.lower()]
    if not matching:
        about = ", ".join(unsub.mask_address(CHANNEL, r.final_recipient) or "?" for r in decision.failed)
        return f"nothing done: the bounce is for {about}, not the current email of user {decision.user_id}"
    failure = matching[0]
    reason = f"bounce: {failure.status} {failure.diagnostic}".rstrip()
    # What phases/send.py does with an SMTP 550 at RCPT, in the same transaction.
    blocks.record(conn, decision.user_id, CHANNEL, address, reason, now)
    skipped = sum(skip_queued(conn, decision.user_id, CHANNEL, m.destination_disabled(reason),
                              blocks.address_unchanged(decision.user_id, CHANNEL, address),
                              digest_deliveries=False).values())
    log.info("user %s email blocked (%s); %d queued row(s) skipped", decision.user_id, reason, skipped)
    return f"blocked email of user {decision.user_id} ({reason}); {skipped} queued row(s) skipped"
