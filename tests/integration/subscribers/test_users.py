"""`alerts users` on PostgreSQL and SQLite: add, list, show, subscribe, link and
telegram-link; a bad value exits 2 naming its option, an unknown user exits 2 naming the
id, a missing setting exits 2 naming the variable, and a refusal writes nothing."""
from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from alerts.cli import cli
from alerts.core import tables as m
from alerts.core import tokens
from alerts.subscribers import telegram_bot as bot
from alerts.subscribers import unsubscribe as unsub
from tests.support.factories import add_pref, add_user

UTC = timezone.utc
KEY = "k" * 16 + "0123456789abcdef"
PUBLIC_URL = "https://alerts.example.com"


def users(db_url, *args, **env):
    return CliRunner().invoke(cli, ["users", *args], env={"DATABASE_URL": db_url, **env})


def dump(engine) -> dict:
    with engine.connect() as conn:
        return {t.name: [dict(r._mapping) for r in conn.execute(sa.select(t).order_by(*t.primary_key.columns or t.c))]
                for t in m.metadata.sorted_tables}


def test_add_prints_the_new_id_and_stores_what_was_given(db_url, engine):
    result = users(db_url, "add", "--email", "jane@example.com", "--telegram-chat-id", "-1001234567890",
                   "--phone", "+31612345678", "--timezone", "America/New_York", "--plan", "pro")
    assert result.exit_code == 0, result.output
    user_id = int(result.output.strip())
    with engine.connect() as conn:
        row = conn.execute(sa.select(m.users).where(m.users.c.id == user_id)).one()
    assert (row.email, row.telegram_chat_id, row.phone, row.timezone, row.plan, row.is_active) == (
        "jane@example.com", "-1001234567890", "+31612345678", "America/New_York", "pro", True)
    bare = users(db_url, "add")
    assert bare.exit_code == 0 and int(bare.output) == user_id + 1, "no address yet: a Telegram link can add one"
    with engine.connect() as conn:
        assert conn.execute(sa.select(m.users.c.plan).where(m.users.c.id == user_id + 1)).scalar_one() == "free"


@pytest.mark.parametrize("args,option", [
    (["--email", "not-an-address"], "--email"),
    (["--email", "jane@example"], "--email"),
    (["--email", "two@@example.com"], "--email"),
    (["--telegram-chat-id", "@janedoe"], "--telegram-chat-id"),
    (["--telegram-chat-id", "12a"], "--telegram-chat-id"),
    (["--phone", "0612345678"], "--phone"),
    (["--phone", "+31 6 1234 5678"], "--phone"),
    (["--timezone", "Mars/Olympus_Mons"], "--timezone"),
    (["--plan", ""], "--plan"),
    (["--plan", "p" * 65], "--plan"),
    (["--email", "ok@example.com", "--phone", "bad"], "--phone"),
])
def test_add_with_a_bad_value_exits_2_naming_the_option_and_adds_nobody(db_url, engine, args, option):
    before = dump(engine)
    result = users(db_url, "add", *args)
    assert result.exit_code == 2 and option in result.output, result.output
    assert dump(engine) == before


def test_an_address_another_user_has_is_refused(db_url, engine):
    with engine.begin() as conn:
        other = add_user(conn, email="Jane@Example.com")
    before = dump(engine)
    result = users(db_url, "add", "--email", "jane@example.com")
    assert result.exit_code == 2 and "--email" in result.output and f"user {other}" in result.output
    assert dump(engine) == before


def test_list_shows_every_user_with_their_subscriptions(db_url, engine):
    with engine.begin() as conn:
        jane = add_user(conn, email="jane@example.com", telegram_chat_id="1111111")
        add_pref(conn, jane)
        add_pref(conn, jane, channel="telegram", enabled=False)
        bob = add_user(conn, email="bob@example.com", is_active=False)
    result = users(db_url, "list")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"{jane}: email jane@example.com, telegram 1111111; plan free; subscriptions 1/2 on",
        f"{bob} (inactive): email bob@example.com; plan free; subscriptions 0/0 on"]
    listed = json.loads(users(db_url, "list", "--json").output)
    assert [(u["id"], u["subscriptions"], u["subscriptions_on"]) for u in listed] == [(jane, 2, 1), (bob, 0, 0)]


def test_list_with_nobody(db_url):
    assert users(db_url, "list").output == "no users\n"


def test_show_names_subscriptions_blocks_and_unsubscribed_channels(db_url, engine):
    with engine.begin() as conn:
        jane = add_user(conn, email="jane@example.com", telegram_chat_id="1111111", quiet_hours="22:00-07:00")
        add_pref(conn, jane, alert_type="price_spike", region="NL", delivery_kind="digest", min_severity=3)
        add_pref(conn, jane, channel="telegram")
        unsub.unsubscribe(conn, jane, "telegram")
        conn.execute(sa.insert(m.user_channel_blocks).values(
            user_id=jane, channel="telegram", address="1111111", reason="bot blocked by the user",
            created_at=datetime(2026, 5, 12, 9, 30, tzinfo=UTC)))
    result = users(db_url, "show", str(jane))
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"user {jane}, plan free" in out and "email: jane@example.com" in out and "quiet hours: 22:00-07:00" in out
    assert re.search(r"#\d+ price_spike in NL by email, digest, from severity 3: on", out)
    assert re.search(r"#\d+ \* in \* by telegram, instant, from severity 1: off \(unsubscribed\)", out)
    assert "blocked: telegram 1111111 since 2026-05-12 09:30 UTC (in force): bot blocked by the user" in out
    assert "unsubscribed from: telegram" in out
    shown = json.loads(users(db_url, "show", str(jane), "--json").output)
    assert shown["unsubscribed"] == ["telegram"] and len(shown["subscriptions"]) == 2
    assert shown["blocks"][0]["in_force"] is True


@pytest.mark.parametrize("command", [["show"], ["link"], ["telegram-link"],
                                     ["subscribe", "--type", "*", "--channel", "email"]])
def test_an_unknown_user_exits_2_naming_the_id(db_url, engine, command):
    env = {"ALERTS_PUBLIC_URL": PUBLIC_URL, "ALERTS_SECRET_KEY": KEY, "ALERTS_TELEGRAM_BOT_USERNAME": "energy_bot"}
    before = dump(engine)
    result = users(db_url, command[0], "4242", *command[1:], **env)
    assert result.exit_code == 2 and "user 4242 does not exist" in result.output, result.output
    assert dump(engine) == before


def test_subscribe_adds_a_subscription_and_prints_its_id(db_url, engine):
    with engine.begin() as conn:
        jane = add_user(conn, email="jane@example.com")
    result = users(db_url, "subscribe", str(jane), "--type", "pipeline_outage", "--region", "NL", "--channel",
                   "email", "--kind", "digest", "--min-severity", "3")
    assert result.exit_code == 0, result.output
    p = m.user_alert_prefs
    with engine.connect() as conn:
        row = conn.execute(sa.select(p).where(p.c.id == int(result.output))).one()
    assert (row.user_id, row.alert_type, row.region, row.channel, row.delivery_kind, row.min_severity, row.enabled) == (
        jane, "pipeline_outage", "NL", "email", "digest", 3, True)
    defaults = users(db_url, "subscribe", str(jane), "--type", "*", "--channel", "email")
    with engine.connect() as conn:
        row = conn.execute(sa.select(p).where(p.c.id == int(defaults.output))).one()
    assert (row.region, row.delivery_kind, row.min_severity) == ("*", "instant", 1)


@pytest.mark.parametrize("args,option", [
    (["--type", "Price Spike", "--channel", "email"], "--type"),
    (["--type", "x" * 65, "--channel", "email"], "--type"),
    (["--type", "*", "--region", "", "--channel", "email"], "--region"),
    (["--type", "*", "--region", "NL\n", "--channel", "email"], "--region"),
    (["--type", "*", "--channel", "pigeon"], "--channel"),
    (["--type", "*", "--channel", "email", "--kind", "weekly"], "--kind"),
    (["--type", "*", "--channel", "sms", "--kind", "digest"], "--kind"),
    (["--type", "*", "--channel", "email", "--min-severity", "6"], "--min-severity"),
    (["--type", "*", "--channel", "email", "--min-severity", "high"], "--min-severity"),
    (["--type", "*", "--channel", "email", "--region", "NL"], "--type"),  # she has that one already
])
def test_subscribe_with_a_bad_value_exits_2_naming_the_option_and_writes_nothing(db_url, engine, args, option):
    with engine.begin() as conn:
        jane = add_user(conn, email="jane@example.com")
        add_pref(conn, jane, region="NL")
    before = dump(engine)
    result = users(db_url, "subscribe", str(jane), *args)
    assert result.exit_code == 2 and option in result.output, result.output
    assert dump(engine) == before


def test_link_prints_the_preferences_url(db_url, engine):
    with engine.begin() as conn:
        jane = add_user(conn)
    result = users(db_url, "link", str(jane), ALERTS_PUBLIC_URL=PUBLIC_URL, ALERTS_SECRET_KEY=KEY)
    assert result.exit_code == 0, result.output
    url = result.output.strip()
    assert url.startswith(f"{PUBLIC_URL}/preferences/")
    assert tokens.read_preferences_token(KEY, url.rsplit("/", 1)[1], datetime.now(UTC)) == jane


def test_telegram_link_prints_a_t_me_link_with_a_code_for_the_user(db_url, engine):
    with engine.begin() as conn:
        jane = add_user(conn, telegram_chat_id="555")
    result = users(db_url, "telegram-link", str(jane), ALERTS_TELEGRAM_BOT_USERNAME="@energy_bot",
                   ALERTS_SECRET_KEY=KEY)
    assert result.exit_code == 0, result.output
    code = re.fullmatch(r"https://t\.me/energy_bot\?start=([A-Za-z0-9_-]{1,64})\n", result.output).group(1)
    assert bot.connect_code_user(code) == jane
    now = datetime.now(UTC)
    assert bot.connect_code_problem(KEY, code, "555", now) is None
    assert bot.connect_code_problem(KEY, code, "555", now + timedelta(hours=25)) == "expired"


@pytest.mark.parametrize("command,env,variable", [
    ("link", {}, "ALERTS_PUBLIC_URL"),
    ("telegram-link", {"ALERTS_SECRET_KEY": KEY}, "ALERTS_TELEGRAM_BOT_USERNAME"),
    ("telegram-link", {"ALERTS_TELEGRAM_BOT_USERNAME": "energy_bot"}, "ALERTS_SECRET_KEY"),
    ("telegram-link", {"ALERTS_TELEGRAM_BOT_USERNAME": "energy_bot", "ALERTS_SECRET_KEY": "short"},
     "ALERTS_SECRET_KEY"),
])
def test_a_link_without_its_setting_exits_2_naming_the_variable(db_url, engine, command, env, variable):
    with engine.begin() as conn:
        jane = add_user(conn)
    result = users(db_url, command, str(jane), **env)
    assert result.exit_code == 2 and variable in result.output, result.output
