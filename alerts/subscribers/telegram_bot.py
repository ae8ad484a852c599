"""The Telegram bot: what the webhook (alerts/web/telegram.py) does with a Bot API update,
and the connect codes that link a chat to a user (docs/telegram-bot.md).

    handle_update(engine, update, settings, now)   one update, once: its effect and the
                                                   reply to make, in one transaction with
                                                   its update_id (telegram_updates)
    deliver(engine, channel, reply, now)           the reply, through the Telegram channel
    make_connect_code / connect_code_problem       the code of t.me/<bot>?start=CODE
    set_webhook(settings) / webhook_info(settings) registering the webhook with Telegram

Commands are read only from a ``message`` in a private chat whose text starts with a
``bot_command`` entity: ``/start [CODE]``, ``/stop``, ``/settings`` (``/help`` and any
other command get the list). ``my_chat_member`` (the user blocked or unblocked the bot)
records or lifts a block as a send's "bot was blocked" answer does, and a message with
``migrate_to_chat_id`` moves the chat's users to the new chat id. Everything else —
groups, channel posts, edited messages, callback queries, unknown kinds, bodies that
are not updates at all — is recorded as handled and changes nothing.

Connect codes (at most 64 characters of ``A-Z a-z 0-9 _ -``, Telegram's rule for a
``start`` parameter): 38 characters of base64url over the user id (8 bytes), the time
the code was made (4 bytes) and 16 bytes of an HMAC-SHA256 keyed with
``ALERTS_SECRET_KEY`` under a purpose of its own, over those 12 bytes and the user's
Telegram chat at the time. So a code cannot be made without the key; it is refused 24
hours after it was made; and once it has connected a chat it no longer verifies (the
user's chat changed), so a code seen later cannot move someone's alerts to another
chat.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html
import logging
import re
import time
import struct
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from alerts.channels import Channel, DeliveryError
from alerts.channels.http import HttpClient, describe
from alerts.core import tables as m
from alerts.core.db import is_postgres
from alerts.core.settings import Settings
from alerts.core.tokens import preferences_url
from alerts.messages import TextMessage
from alerts.sending import blocks
from alerts.sending.outbox import skip_queued
from alerts.sending.ratelimit import take_slot
from alerts.subscribers import unsubscribe as unsub

log = logging.getLogger(__name__)

CHANNEL = "telegram"
BLOCKED_REASON = "bot blocked by the user"  # the block my_chat_member "kicked" records
CONNECT_PURPOSE = b"alerts.telegram-connect.v1"
CONNECT_CODE_LIFETIME = timedelta(hours=24)
CONNECT_CODE_SKEW = timedelta(minutes=5)  # a code "made" this far ahead of our clock still counts
_CODE_HEAD = struct.Struct(">QI")  # user id, made at (Unix seconds)
_CODE_MAC_BYTES = 16
CONNECT_CODE_CHARS = len(base64.urlsafe_b64encode(bytes(_CODE_HEAD.size + _CODE_MAC_BYTES)).rstrip(b"="))
# /stop answers once the chat's sends in flight are over, waiting at most this long: far
# below the time Telegram gives a webhook.
STOP_WAIT_SECONDS = 10.0
WEBHOOK_PATH = "/telegram/webhook"
ALLOWED_UPDATES = ("message", "my_chat_member")  # all the webhook acts on
# Handled update ids are kept this long (Telegram gives up redelivering within a day);
# older ones are removed by one update in PRUNE_EVERY.
KEEP_UPDATES = timedelta(days=7)
PRUNE_EVERY = 100
MEMBER_STATUSES = ("member", "administrator", "creator")


# --- connect codes ---------------------------------------------------------------------------

def _connect_mac(secret_key: str, head: bytes, current_chat: str | None) -> bytes:
    key = hmac.new(secret_key.encode(), CONNECT_PURPOSE, hashlib.sha256).digest()
    chat = hashlib.sha256((current_chat or "").strip().encode()).digest()
    return hmac.new(key, head + chat, hashlib.sha256).digest()[:_CODE_MAC_BYTES]


def make_connect_code(secret_key: str, user_id: int, current_chat: str | None, now: datetime) -> str:
    """A code naming ``user_id``, made at ``now`` while the user's chat is ``current_chat``."""
    head = _CODE_HEAD.pack(user_id, int(now.timestamp()))
    raw = head + _connect_mac(secret_key, head, current_chat)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def connect_code_user(code: str) -> int | None:
    """The user a well-formed code names — not yet checked: see ``connect_code_problem``."""
    raw = _decode(code)
    return None if raw is None else _CODE_HEAD.unpack(raw[:_CODE_HEAD.size])[0]


def connect_code_problem(secret_key: str, code: str, current_chat: str | None, now: datetime) -> str | None:
    """None for a code we made for the user it names, whose chat is still ``current_chat``,
    within 24 hours of ``now``; else "invalid" or "expired" (an authentic code only)."""
    raw = _decode(code)
    if raw is None:
        return "invalid"
    head, mac = raw[:_CODE_HEAD.size], raw[_CODE_HEAD.size:]
    if not hmac.compare_digest(mac, _connect_mac(secret_key, head, current_chat)):
        return "invalid"
    made = datetime.fromtimestamp(_CODE_HEAD.unpack(head)[1], timezone.utc)
    if not made - CONNECT_CODE_SKEW <= now <= made + CONNECT_CODE_LIFETIME:
        return "expired"
    return None


def _decode(code: str) -> bytes | None:
    if not isinstance(code, str) or len(code) != CONNECT_CODE_CHARS or not code.isascii():
        return None
    try:
        raw = base64.urlsafe_b64decode(code + "=" * (-len(code) % 4))
    except (binascii.Error, ValueError):
        return None
    # One spelling per code: the last character's unused bits must be zero.
    return raw if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") == code else None


def connect_link(settings: Settings, user_id: int, current_chat: str | None, now: datetime) -> str | None:
    """``https://t.me/<bot>?start=CODE``, or None without ALERTS_TELEGRAM_BOT_USERNAME."""
    if not settings.telegram_bot_username or not settings.secret_key:
        return None
    code = make_connect_code(settings.secret_key, user_id, current_chat, now)
    return f"https://t.me/{settings.telegram_bot_username}?start={code}"


# --- updates -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Reply:
    chat_id: str
    text: str  # Telegram HTML (parse_mode=HTML), every value escaped


@dataclass
class Outcome:
    """What one update did: ``action`` for the log, the reply to make, and the users whose
    Telegram a /stop turned off (the webhook waits for their sends in flight)."""

    update_id: int | None
    action: str
    reply: Reply | None = None
    stopped: list[int] = field(default_factory=list)


def handle_update(engine: Engine, update: object, settings: Settings, now: datetime) -> Outcome:
    """Handle one decoded update body (anything: garbage is ignored), once per update_id."""
    update_id = update.get("update_id") if isinstance(update, dict) else None
    if not _is_int(update_id):
        return Outcome(None, "ignored: not an update")
    with engine.begin() as conn:
        if not _first_time(conn, update_id, now):
            return Outcome(update_id, "duplicate")
        outcome = _dispatch(conn, update, settings, now)
        if update_id % PRUNE_EVERY == 0:
            t = m.telegram_updates
            conn.execute(sa.delete(t).where(t.c.handled_at < now - KEEP_UPDATES))
    outcome.update_id = update_id
    if outcome.stopped and outcome.reply is not None:
        settled = all([unsub.wait_in_flight(engine, user_id, CHANNEL, timeout=STOP_WAIT_SECONDS)
                       for user_id in outcome.stopped])
        if not settled:
            outcome.reply = Reply(outcome.reply.chat_id, outcome.reply.text + "\n" + STILL_ON_ITS_WAY)
    return outcome


def _first_time(conn: Connection, update_id: int, now: datetime) -> bool:
    """Record the update as handled; False when it already was. A second delivery of the
    same update running at once waits here for the first one's transaction."""
    t = m.telegram_updates
    insert = (postgresql.insert if is_postgres(conn) else sqlite.insert)(t)
    return conn.execute(insert.values(update_id=update_id, handled_at=now)
                        .on_conflict_do_nothing(index_elements=[t.c.update_id])).rowcount == 1


def _dispatch(conn: Connection, update: dict, settings: Settings, now: datetime) -> Outcome:
    if isinstance(update.get("message"), dict):
        return _message(conn, update["message"], settings, now)
    if isinstance(update.get("my_chat_member"), dict):
        return _chat_member(conn, update["my_chat_member"], now)
    kinds = sorted(key for key in update if key != "update_id")
    return Outcome(None, f"ignored: {_word(kinds[0]) if kinds else 'empty'} update")


def _message(conn: Connection, message: dict, settings: Settings, now: datetime) -> Outcome:
    chat = message.get("chat") if isinstance(message.get("chat"), dict) else {}
    if not _is_int(chat.get("id")):
        return Outcome(None, "ignored: message without a chat")
    chat_id = str(chat["id"])
    if "migrate_to_chat_id" in message:
        return _migrate(conn, chat_id, message["migrate_to_chat_id"])
    if chat.get("type") != "private":
        return Outcome(None, "ignored: not a private chat")
    command = _command(message)
    if command is None:
        return Outcome(None, "ignored: not a command")
    name, bot, argument = command
    if bot and settings.telegram_bot_username and bot.lower() != settings.telegram_bot_username.lower():
        return Outcome(None, "ignored: a command for another bot")
    if name == "start":
        return _start(conn, chat_id, argument, settings, now)
    if name == "stop":
        return _stop(conn, chat_id, settings, now)
    if name == "settings":
        return _settings(conn, chat_id, settings, now)
    return Outcome(None, "help", Reply(chat_id, HELP))


def _command(message: dict) -> tuple[str, str, str] | None:
    """(command, bot name or "", argument) when the text starts with a bot_command entity."""
    text, entities = message.get("text"), message.get("entities")
    if not isinstance(text, str) or not isinstance(entities, list) or not entities:
        return None
    first = entities[0]
    if (not isinstance(first, dict) or first.get("type") != "bot_command" or first.get("offset") != 0
            or not _is_int(first.get("length")) or first["length"] < 2):
        return None
    units = text.encode("utf-16-le")  # entity offsets and lengths count UTF-16 code units
    command = units[:2 * first["length"]].decode("utf-16-le", "replace")
    argument = units[2 * first["length"]:].decode("utf-16-le", "replace").strip()
    if not command.startswith("/"):
        return None
    name, _, bot = command[1:].partition("@")
    return name.lower(), bot, argument


# --- commands ------------------------------------------------------------------------------

def _start(conn: Connection, chat_id: str, code: str, settings: Settings, now: datetime) -> Outcome:
    if not code:
        users = users_of_chat(conn, chat_id)
        if not users:
            return Outcome(None, "start: chat not connected", Reply(chat_id, WELCOME))
        for user_id in users:
            _lift_blocks(conn, [user_id], chat_id)
            unsub.resubscribe(conn, user_id, CHANNEL)
        return Outcome(None, f"start: users {users} on again", Reply(chat_id, ON_AGAIN))
    user_id = connect_code_user(code.split()[0])
    current = _chat_of_user(conn, user_id) if user_id is not None else None
    if current is None:  # malformed, or no such user
        return Outcome(None, "start: invalid code", Reply(chat_id, CODE_INVALID))
    _, chat_now = current
    if chat_now == chat_id:
        unsub.resubscribe(conn, user_id, CHANNEL)
        return Outcome(None, f"start: user {user_id} already connected", Reply(chat_id, ALREADY_CONNECTED))
    problem = connect_code_problem(settings.secret_key or "", code.split()[0], chat_now, now)
    if problem is not None:
        return Outcome(None, f"start: {problem} code", Reply(chat_id, CODE_EXPIRED if problem == "expired"
                                                               else CODE_INVALID))
    u = m.users
    conn.execute(sa.update(u).where(u.c.id == user_id).values(telegram_chat_id=chat_id))
    blocks.lift(conn, user_id, CHANNEL)
    unsub.resubscribe(conn, user_id, CHANNEL)
    p = m.user_alert_prefs
    subscribed = conn.execute(sa.select(sa.func.count()).where(
        p.c.user_id == user_id, p.c.channel == CHANNEL, p.c.enabled)).scalar_one()
    text = CONNECTED + ("" if subscribed else "\n" + NO_SUBSCRIPTIONS)
    link = preferences_url(settings, user_id, now)
    if link:
        text += "\n" + _link(link, "Manage alerts")
    return Outcome(None, f"start: user {user_id} connected", Reply(chat_id, text))


def _stop(conn: Connection, chat_id: str, settings: Settings, now: datetime) -> Outcome:
    users = users_of_chat(conn, chat_id)
    if not users:
        return Outcome(None, "stop: chat not connected", Reply(chat_id, NOT_CONNECTED))
    for user_id in users:
        counts = unsub.unsubscribe(conn, user_id, CHANNEL, now)
        log.info("user %s unsubscribed on telegram by /stop: %s", user_id, counts)
    return Outcome(None, f"stop: users {users}", Reply(chat_id, STOPPED), stopped=users)


def _settings(conn: Connection, chat_id: str, settings: Settings, now: datetime) -> Outcome:
    users = users_of_chat(conn, chat_id)
    if not users:
        return Outcome(None, "settings: chat not connected", Reply(chat_id, NOT_CONNECTED))
    links = [(user_id, preferences_url(settings, user_id, now)) for user_id in users]
    if any(link is None for _, link in links):
        return Outcome(None, "settings: no preferences page", Reply(chat_id, NO_PAGE))
    if len(links) == 1:
        text = f"{_link(links[0][1], 'Manage your alerts')}\n{PERSONAL_LINK}"
    else:
        text = "\n".join(_link(link, f"Manage the alerts of account {user_id}") for user_id, link in links)
        text += "\n" + PERSONAL_LINK
    return Outcome(None, f"settings: users {users}", Reply(chat_id, text))


# --- membership and migration ----------------------------------------------------------

def _chat_member(conn: Connection, member: dict, now: datetime) -> Outcome:
    chat = member.get("chat") if isinstance(member.get("chat"), dict) else {}
    new = member.get("new_chat_member") if isinstance(member.get("new_chat_member"), dict) else {}
    if not _is_int(chat.get("id")):
        return Outcome(None, "ignored: my_chat_member without a chat")
    chat_id, status = str(chat["id"]), new.get("status")
    users = users_of_chat(conn, chat_id)
    if status == "kicked":
        block(conn, users, chat_id, BLOCKED_REASON, now)
        return Outcome(None, f"blocked by its chat: users {users}")
    if status in MEMBER_STATUSES:
        lifted = _lift_blocks(conn, users, chat_id)
        return Outcome(None, f"unblocked by its chat: {lifted} block(s) lifted")
    return Outcome(None, f"ignored: my_chat_member {_word(str(status))}")


def block(conn: Connection, users: list[int], chat_id: str, reason: str, now: datetime) -> None:
    """Block the chat for these users as a send's "gone" answer does (alerts/phases/send.py):
    the block, and their queued instant deliveries and digests on Telegram skipped."""
    for user_id in users:
        blocks.record(conn, user_id, CHANNEL, chat_id, reason, now)
        skip_queued(conn, user_id, CHANNEL, m.destination_disabled(reason),
                    blocks.address_unchanged(user_id, CHANNEL, chat_id), digest_deliveries=False)


def _lift_blocks(conn: Connection, users: list[int], chat_id: str) -> int:
    b = m.user_channel_blocks
    if not users:
        return 0
    return conn.execute(sa.delete(b).where(b.c.user_id.in_(users), b.c.channel == CHANNEL,
                                           b.c.address == chat_id)).rowcount


def _migrate(conn: Connection, old: str, new: object) -> Outcome:
    if not _is_int(new):
        return Outcome(None, "ignored: migrate_to_chat_id is not a chat id")
    moved = migrate_chat(conn, old, str(new))
    return Outcome(None, f"chat moved to a supergroup: {moved} user(s)")


def migrate_chat(conn: Connection, old: str, new: str) -> int:
    u = m.users
    return conn.execute(sa.update(u).where(sa.func.trim(u.c.telegram_chat_id) == old)
                        .values(telegram_chat_id=new)).rowcount


def users_of_chat(conn: Connection, chat_id: str) -> list[int]:
    u = m.users
    return list(conn.execute(sa.select(u.c.id).where(sa.func.trim(u.c.telegram_chat_id) == chat_id)
                             .order_by(u.c.id)).scalars())


def _chat_of_user(conn: Connection, user_id: int) -> tuple[int, str | None] | None:
    """(id, current chat) of the user, its row locked until the end of the transaction (so
    two chats racing with one code cannot both win), or None when there is no such user."""
    u = m.users
    query = sa.select(u.c.id, u.c.telegram_chat_id).where(u.c.id == user_id)
    row = conn.execute(query.with_for_update() if is_postgres(conn) else query).first()
    if row is None:
        return None
    return row.id, (row.telegram_chat_id or "").strip() or None


def _word(text: str) -> str:
    """A name from an update, safe to log (Telegram's names are letters and _)."""
    return re.sub(r"[^A-Za-z0-9_]", "?", text[:40])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- replies -----------------------------------------------------------------------------

# The longest a reply waits for Telegram's rate limit before the webhook answers.
REPLY_MAX_WAIT_SECONDS = 5.0


def deliver(engine: Engine, channel: Channel | None, reply: Reply, now: datetime, limiter=None,
            sleep=time.sleep) -> str:
    """Send ``reply`` through the Telegram channel; what became of it. It first asks the
    Telegram limiter the sends share (alerts/sending/ratelimit.py), waiting a few seconds
    at most. A chat that is gone is blocked as a send's answer would block it; a chat
    that moved is updated and the reply sent there; any other failure is logged (the
    update stays handled)."""
    if channel is None:
        log.warning("telegram reply not sent: the Telegram channel is not configured")
        return "not configured"
    chat_id = reply.chat_id
    if limiter is not None and take_slot(limiter, chat_id, sleep=sleep, may_sleep=REPLY_MAX_WAIT_SECONDS,
                                         max_reserve=REPLY_MAX_WAIT_SECONDS) is not None:
        log.warning("telegram reply not sent: the chat's rate limit is booked for longer than %ss",
                    REPLY_MAX_WAIT_SECONDS)
        return "rate limited"
    for _ in range(2):
        try:
            channel.send(chat_id, TextMessage(reply.text))
            return "sent"
        except DeliveryError as exc:
            if exc.migrate_to is not None:
                with engine.begin() as conn:
                    migrate_chat(conn, chat_id, exc.migrate_to)
                chat_id = exc.migrate_to
                continue
            if exc.gone:
                with engine.begin() as conn:
                    block(conn, users_of_chat(conn, chat_id), chat_id, exc.reason, now)
            log.warning("telegram reply to a chat not sent (%s): %s",
                        "gone" if exc.gone else "permanent" if exc.permanent else "transient", exc.reason)
            return "failed"
    return "failed"


# --- registering the webhook --------------------------------------------------------------

class BotApiError(Exception):
    """Telegram refused a call, or did not answer; the message is safe to print."""


def webhook_url(settings: Settings) -> str:
    return f"{settings.public_url}{WEBHOOK_PATH}"


def set_webhook(settings: Settings, *, drop_pending_updates: bool = False) -> str:
    """Register ``{ALERTS_PUBLIC_URL}/telegram/webhook`` with the secret and the update kinds
    we act on; Telegram's description of the result."""
    return _call(settings, "setWebhook", {"url": webhook_url(settings), "secret_token": settings.telegram_webhook_secret,
                                          "allowed_updates": list(ALLOWED_UPDATES),
                                          "drop_pending_updates": drop_pending_updates}).get("description") or "ok"


def webhook_info(settings: Settings) -> dict:
    """Telegram's getWebhookInfo: the URL it posts to, pending updates, its last error."""
    return _call(settings, "getWebhookInfo", {}).get("result") or {}


def _call(settings: Settings, method: str, payload: dict) -> dict:
    token = settings.telegram_bot_token or ""
    http = HttpClient("telegram", settings.http_timeout_seconds, secrets=(token,))
    try:
        response = http.post(f"{settings.telegram_api_base}/bot{token}/{method}", json=payload)
    except DeliveryError as exc:
        raise BotApiError(exc.reason) from None
    finally:
        http.close()
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or body.get("ok") is not True:
        said = body.get("description") if isinstance(body, dict) else None
        raise BotApiError(f"telegram {method}: HTTP {response.status_code}: "
                          f"{describe(said, token) if said else 'unexpected answer'}")
    return body


def _link(url: str, label: str) -> str:
    return f'<a href="{html.escape(url, quote=True)}">{html.escape(label)}</a>'


WELCOME = ("Hello! This is the EnergyRiskIQ alerts bot.\n"
           "To get your alerts in this chat, open your preferences page (the “Manage alerts” link in any of "
           "our emails) and follow its “Connect Telegram” link.")
CONNECTED = "This chat is connected: your EnergyRiskIQ Telegram alerts will come here.\n/stop turns them off."
NO_SUBSCRIPTIONS = "You have no Telegram subscriptions yet: add them on your preferences page."
ALREADY_CONNECTED = "This chat is already connected to your EnergyRiskIQ account, and its alerts are on."
ON_AGAIN = "Your EnergyRiskIQ alerts are on in this chat.\n/stop turns them off; /settings sends your preferences link."
CODE_INVALID = ("This connect link is not valid (or was already used). Open your preferences page and follow its "
                "“Connect Telegram” link again.")
CODE_EXPIRED = ("This connect link has expired: they work for 24 hours. Open your preferences page for a new one.")
STOPPED = "Stopped: no more EnergyRiskIQ alerts in this chat.\nSend /start to get them again."
STILL_ON_ITS_WAY = "A message that was already on its way may still arrive; nothing after it will."
NOT_CONNECTED = ("This chat is not connected to an EnergyRiskIQ account. To connect it, follow the "
                 "“Connect Telegram” link on your preferences page.")
NO_PAGE = "The preferences page is not available on this service yet. Please contact support."
PERSONAL_LINK = "This link is personal: anyone who has it can change your alerts."
HELP = ("/start — connect this chat, or turn its alerts back on\n"
        "/stop — no more alerts in this chat\n"
        "/settings — a link to your preferences")
