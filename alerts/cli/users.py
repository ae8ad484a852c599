"""``alerts users``: add and look at subscribers without SQL (the logic is
alerts/subscribers/users.py; docs/subscribers.md walks through it).

    alerts users add [--email E] [--telegram-chat-id C] [--phone P] [--timezone Z] [--plan NAME]
    alerts users list [--json]
    alerts users show ID [--json]
    alerts users subscribe ID --type T [--region R] --channel C [--kind K] [--min-severity N]
    alerts users link ID            the preferences URL (needs ALERTS_PUBLIC_URL)
    alerts users telegram-link ID   the t.me link that connects a chat (needs ALERTS_TELEGRAM_BOT_USERNAME)

A bad value exits 2 naming its option, an unknown user exits 2 naming the id, a missing
setting exits 2 naming the variable; each command writes in one transaction, so a
refusal leaves nothing behind.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

import click

from alerts.cli.common import Fatal, load_settings, open_engine
from alerts.core import tables as m
from alerts.core.settings import MIN_SECRET_KEY_CHARS
from alerts.core.tokens import preferences_url
from alerts.operations.status import printable
from alerts.subscribers import telegram_bot
from alerts.subscribers import users as u


@click.group()
def users() -> None:
    """Add subscribers, subscribe them, and give them their links."""


def _run(work):
    """``work(conn)`` in one transaction; refusals as exit 2 naming the option or the user."""
    engine = open_engine(load_settings())
    try:
        with engine.begin() as conn:
            return work(conn)
    except u.Invalid as exc:
        raise click.BadParameter(exc.problem, param_hint=f"'{exc.option}'") from None
    except u.NoSuchUser as exc:
        raise Fatal(str(exc)) from None
    finally:
        engine.dispose()


def _check(check, value):
    """Check a value before the database is opened (exit 2 naming the option)."""
    try:
        return check(value)
    except u.Invalid as exc:
        raise click.BadParameter(exc.problem, param_hint=f"'{exc.option}'") from None


@users.command()
@click.option("--email", help="Email address.")
@click.option("--telegram-chat-id", help="Telegram chat id (or send them `alerts users telegram-link ID`).")
@click.option("--phone", help="Phone number for SMS, international form (+31612345678).")
@click.option("--timezone", help="IANA time zone (default: ALERTS_TIMEZONE).")
@click.option("--plan", help="Plan name (default: free).")
def add(email, telegram_chat_id, phone, timezone, plan) -> None:
    """Add a user; prints the new user's id."""
    for check, value in ((u.check_email, email), (u.check_chat_id, telegram_chat_id), (u.check_phone, phone),
                         (u.check_timezone, timezone), (u.check_plan, plan)):
        _check(check, value)
    click.echo(_run(lambda conn: u.add_user(conn, email=email, telegram_chat_id=telegram_chat_id, phone=phone,
                                            timezone=timezone, plan=plan)))


@users.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(as_json: bool) -> None:
    """Every user: addresses, plan, subscriptions (on / all)."""
    rows = _run(u.list_users)
    if as_json:
        click.echo(json.dumps(rows, default=str, indent=2))
        return
    if not rows:
        click.echo("no users")
    for row in rows:
        addresses = ", ".join(f"{name} {printable(row[column])}" for name, column in
                              (("email", "email"), ("telegram", "telegram_chat_id"), ("sms", "phone")) if row[column])
        state = "" if row["is_active"] else " (inactive)"
        click.echo(f"{row['id']}{state}: {addresses or 'no address'}; plan {printable(row['plan'])}; "
                   f"subscriptions {row['subscriptions_on']}/{row['subscriptions']} on")


@users.command()
@click.argument("user_id", metavar="ID", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(user_id: int, as_json: bool) -> None:
    """One user: addresses and schedule, subscriptions, blocks, unsubscribed channels."""
    report = _run(lambda conn: u.show_user(conn, user_id))
    if as_json:
        click.echo(json.dumps(report.as_dict(), default=str, indent=2))
        return
    user = report.user
    click.echo(f"user {user['id']}{'' if user['is_active'] else ' (inactive)'}, plan {printable(user['plan'])}")
    for label, column in (("email", "email"), ("telegram chat", "telegram_chat_id"), ("phone", "phone"),
                          ("time zone", "timezone"), ("digest period", "digest_period"),
                          ("digest send time", "digest_send_time"), ("quiet hours", "quiet_hours")):
        click.echo(f"  {label}: {printable(user[column]) if user[column] else '-'}")
    click.echo("subscriptions:" if report.subscriptions else "subscriptions: none")
    for s in report.subscriptions:
        state = "on" if s["enabled"] else "off (unsubscribed)" if s["unsubscribed_at"] else "off"
        click.echo(f"  #{s['id']} {printable(s['alert_type'])} in {printable(s['region'])} by {s['channel']}, "
                   f"{s['delivery_kind']}, from severity {s['min_severity']}: {state}")
    for b in report.blocks:
        held = "in force" if b["in_force"] else "address changed since"
        click.echo(f"blocked: {b['channel']} {printable(b['address'])} since {b['since']:%Y-%m-%d %H:%M} UTC "
                   f"({held}): {printable(b['reason'])}")
    click.echo(f"unsubscribed from: {', '.join(report.unsubscribed) if report.unsubscribed else 'nothing'}")


@users.command()
@click.argument("user_id", metavar="ID", type=int)
@click.option("--type", "alert_type", required=True, help="Alert type, or '*' for any.")
@click.option("--region", default="*", show_default=True, help="Region, or '*' for any.")
@click.option("--channel", required=True, type=click.Choice(m.CHANNELS), help="Where alerts go.")
@click.option("--kind", default=m.INSTANT, show_default=True, type=click.Choice(m.DELIVERY_KINDS),
              help="At once (instant) or in the digest.")
@click.option("--min-severity", default=1, show_default=True, type=click.IntRange(1, 5),
              help="From this severity (1 low … 5 critical).")
def subscribe(user_id: int, alert_type: str, region: str, channel: str, kind: str, min_severity: int) -> None:
    """Subscribe a user; prints the new subscription's id."""
    _check(u.check_alert_type, alert_type)
    _check(u.check_region, region)
    now = datetime.now(timezone.utc)
    click.echo(_run(lambda conn: u.subscribe(conn, user_id, alert_type=alert_type, region=region, channel=channel,
                                             kind=kind, min_severity=min_severity, now=now)))


@users.command()
@click.argument("user_id", metavar="ID", type=int)
def link(user_id: int) -> None:
    """Print the user's preferences URL (their "Manage alerts" link)."""
    settings = load_settings()
    if not settings.public_url:
        raise Fatal("ALERTS_PUBLIC_URL is not set: it is where the preferences page is served")
    _run(lambda conn: u.require_user(conn, user_id))
    click.echo(preferences_url(settings, user_id))


@users.command(name="telegram-link")
@click.argument("user_id", metavar="ID", type=int)
def telegram_link(user_id: int) -> None:
    """Print a t.me link that connects a Telegram chat to the user (valid 24 hours)."""
    settings = load_settings()
    if not settings.telegram_bot_username:
        raise Fatal("ALERTS_TELEGRAM_BOT_USERNAME is not set: the link names the bot")
    if len(settings.secret_key or "") < MIN_SECRET_KEY_CHARS:
        raise Fatal(f"ALERTS_SECRET_KEY must be set, at least {MIN_SECRET_KEY_CHARS} characters: it signs the "
                    "connect code")
    user = _run(lambda conn: u.require_user(conn, user_id))
    click.echo(telegram_bot.connect_link(settings, user_id, user["telegram_chat_id"], datetime.now(timezone.utc)))
