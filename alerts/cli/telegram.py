"""``alerts telegram``: the bot's webhook (docs/telegram-bot.md).

    alerts telegram set-webhook [--drop-pending-updates]
        registers {ALERTS_PUBLIC_URL}/telegram/webhook with Telegram (setWebhook), with
        ALERTS_TELEGRAM_WEBHOOK_SECRET as its secret_token and the update kinds the bot
        acts on (message, my_chat_member)
    alerts telegram webhook-info
        what Telegram has: the URL, updates waiting, its last delivery error

A missing setting exits 2 naming the variable; Telegram refusing (or not answering)
exits 1 with its words.
"""
from __future__ import annotations

import click

from alerts.cli.common import Fatal, load_settings
from alerts.core.settings import Settings
from alerts.subscribers import telegram_bot

EXIT_REFUSED = 1


@click.group()
def telegram() -> None:
    """The Telegram bot's webhook."""


def _needs(settings: Settings, *names: str) -> None:
    for name in names:
        if not getattr(settings, {"ALERTS_TELEGRAM_BOT_TOKEN": "telegram_bot_token",
                                  "ALERTS_PUBLIC_URL": "public_url",
                                  "ALERTS_TELEGRAM_WEBHOOK_SECRET": "telegram_webhook_secret"}[name]):
            raise Fatal(f"{name} is not set: needed to register the webhook")


@telegram.command(name="set-webhook")
@click.option("--drop-pending-updates", is_flag=True, help="Drop the updates Telegram holds for the bot.")
def set_webhook(drop_pending_updates: bool) -> None:
    """Register {ALERTS_PUBLIC_URL}/telegram/webhook with Telegram."""
    settings = load_settings()
    _needs(settings, "ALERTS_TELEGRAM_BOT_TOKEN", "ALERTS_PUBLIC_URL", "ALERTS_TELEGRAM_WEBHOOK_SECRET")
    try:
        said = telegram_bot.set_webhook(settings, drop_pending_updates=drop_pending_updates)
    except telegram_bot.BotApiError as exc:
        raise Fatal(str(exc), EXIT_REFUSED) from None
    click.echo(f"webhook set to {telegram_bot.webhook_url(settings)} "
               f"(updates: {', '.join(telegram_bot.ALLOWED_UPDATES)}): {said}")


@telegram.command(name="webhook-info")
def webhook_info() -> None:
    """Show the webhook Telegram has for the bot."""
    settings = load_settings()
    _needs(settings, "ALERTS_TELEGRAM_BOT_TOKEN")
    try:
        info = telegram_bot.webhook_info(settings)
    except telegram_bot.BotApiError as exc:
        raise Fatal(str(exc), EXIT_REFUSED) from None
    click.echo(f"url: {info.get('url') or '(none)'}")
    click.echo(f"pending updates: {info.get('pending_update_count', 0)}")
    click.echo(f"allowed updates: {', '.join(info.get('allowed_updates') or ['(all but chat_member)'])}")
    if info.get("last_error_message"):
        click.echo(f"last error: {info['last_error_message']} (at {info.get('last_error_date')})")
