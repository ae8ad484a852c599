"""The Telegram bot's webhook (the bot itself is alerts/subscribers/telegram_bot.py).

    POST /telegram/webhook   a Bot API update. Only with the header
                             X-Telegram-Bot-Api-Secret-Token equal to
                             ALERTS_TELEGRAM_WEBHOOK_SECRET (compared in constant time;
                             else 403, nothing done); 404 while that is unset.

Every request that carries the secret is answered 200, whatever its body — garbage, an
update kind we ignore, a repeated update — so Telegram never redelivers what we chose to
ignore. The reply to the chat is sent before the answer. Only a database we cannot reach
answers otherwise (503): then the update was not handled, and Telegram delivers it again.
"""
from __future__ import annotations

import hmac
import json
import logging
from datetime import datetime, timezone

import sqlalchemy as sa
from flask import Blueprint, abort, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from alerts.channels.telegram import TelegramChannel
from alerts.sending.ratelimit import runner_limiter
from alerts.subscribers import telegram_bot
from alerts.web.common import context

log = logging.getLogger(__name__)

blueprint = Blueprint("telegram", __name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
# Updates are larger than the app's forms (a 4096-character message, its entities, the
# message it replies to); anything beyond this is answered 200 and ignored.
WEBHOOK_MAX_BODY_BYTES = 1024 * 1024
_CHANNEL_KEY = "alerts.telegram_channel"
_LIMITER_KEY = "alerts.telegram_limiter"
DATABASE_DOWN = (sa.exc.OperationalError, sa.exc.InterfaceError)


def _channel() -> TelegramChannel | None:
    """One Telegram channel per app (its HTTP connections are reused across requests)."""
    settings = context().settings
    if not settings.telegram_bot_token:
        return None
    if _CHANNEL_KEY not in current_app.extensions:
        current_app.extensions[_CHANNEL_KEY] = TelegramChannel(settings)
    return current_app.extensions[_CHANNEL_KEY]


def _limiter():
    """The Telegram limit the sends share (Redis), or one of this process's own."""
    if _LIMITER_KEY not in current_app.extensions:
        current_app.extensions[_LIMITER_KEY] = runner_limiter(context().settings.ratelimit_redis_url)
    return current_app.extensions[_LIMITER_KEY]


def _authentic(secret: str) -> bool:
    given = request.headers.get(SECRET_HEADER, "")
    return hmac.compare_digest(given.encode("utf-8", "replace"), secret.encode("utf-8"))


@blueprint.post("/telegram/webhook")
def webhook():
    secret = context().settings.telegram_webhook_secret
    if not secret:
        abort(404)
    if not _authentic(secret):
        log.warning("telegram webhook: a request without the secret token refused")
        abort(403)
    request.max_content_length = WEBHOOK_MAX_BODY_BYTES
    try:
        raw = request.get_data(cache=False)
    except RequestEntityTooLarge:
        log.warning("telegram webhook: a body over %d bytes ignored", WEBHOOK_MAX_BODY_BYTES)
        return "", 200
    try:
        update = json.loads(raw)
    except ValueError:  # not JSON, or not UTF-8
        update = None
    engine, now = context().engine, datetime.now(timezone.utc)
    try:
        outcome = telegram_bot.handle_update(engine, update, context().settings, now)
        if outcome.reply is not None:
            reply = telegram_bot.deliver(engine, _channel(), outcome.reply, now, limiter=_limiter())
            outcome.action += f"; reply {reply}"
    except DATABASE_DOWN:
        raise  # 503 (or 500): the update was not handled, and Telegram delivers it again
    except Exception:  # noqa: BLE001 - one odd update must not make Telegram redeliver it for ever
        log.exception("telegram webhook: an update could not be handled; answered 200 and dropped")
        return "", 200
    log.info("telegram update %s: %s", outcome.update_id, outcome.action)
    return "", 200
