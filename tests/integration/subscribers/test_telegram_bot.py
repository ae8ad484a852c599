"""The Telegram bot through its webhook (POST /telegram/webhook), on PostgreSQL and SQLite,
replying through the fake Bot API: the secret, each update once, /start CODE, /stop,
/settings, my_chat_member, chat migration, and everything it must ignore. Updates are
shaped as the Bot API documentation shows them (Update, Message, ChatMemberUpdated,
MessageEntity); connect codes, the settings, and `alerts telegram set-webhook`."""
from __future__ import annotations

import itertools
import json
import re
import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from alerts.cli import cli
from alerts.core import tables as m
from alerts.core import tokens
from alerts.core.db import make_engine
from alerts.core.settings import ConfigError, Settings
from alerts.phases.pipeline import run_phases, session
from alerts.subscribers import telegram_bot as bot
from alerts.web import create_app
from tests.support.clock import clock_at
from tests.support.factories import add_delivery, add_digest, add_event, add_pref, add_user
from tests.support.fakes.provider_api import BLOCKED

UTC = timezone.utc
KEY = "k" * 16 + "0123456789abcdef"
OTHER_KEY = "o" * 40
SECRET = "s3cret_Token-42"
BOT = "energy_alerts_bot"
PUBLIC_URL = "https://alerts.example.com"
JANE_CHAT = 1111111  # a private chat's id is the user's id
GROUP = -1001234567890
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
_update_ids = itertools.count(864_000_001)


@pytest.fixture
def bot_settings(live_settings) -> Settings:
    return replace(live_settings, public_url=PUBLIC_URL, secret_key=KEY, telegram_bot_username=BOT,
                   telegram_webhook_secret=SECRET)


@pytest.fixture
def client(bot_settings, engine):
    app = create_app(bot_settings, engine=engine)
    return app.test_client()


@pytest.fixture
def jane(engine):
    """A user with Telegram preferences whose chat is not connected yet."""
    with engine.begin() as conn:
        uid = add_user(conn, email="jane@example.com")
        add_pref(conn, uid, channel="telegram")
        add_pref(conn, uid, channel="telegram", alert_type="price_spike", delivery_kind="digest", enabled=False)
    return uid


def connected(engine, user_id, chat=JANE_CHAT) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(m.users).where(m.users.c.id == user_id).values(telegram_chat_id=str(chat)))


def code_for(user_id, *, chat=None, now=None, key=KEY) -> str:
    return bot.make_connect_code(key, user_id, chat, now or datetime.now(UTC))


# --- Bot API shapes ------------------------------------------------------------------------

JANE = {"id": JANE_CHAT, "is_bot": False, "first_name": "Jane", "last_name": "Doe", "username": "janedoe",
        "language_code": "en"}
THE_BOT = {"id": 7000000001, "is_bot": True, "first_name": "EnergyRiskIQ Alerts", "username": BOT}
PRIVATE = {"id": JANE_CHAT, "first_name": "Jane", "last_name": "Doe", "username": "janedoe", "type": "private"}
SUPERGROUP = {"id": GROUP, "title": "Energy desk", "type": "supergroup"}
CHANNEL = {"id": -1009876543210, "title": "Energy news", "type": "channel"}


def utf16(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def message(text: str, chat: dict = PRIVATE, *, command: bool = True, **extra) -> dict:
    """A Message as the Bot API sends it; a leading /command carries its bot_command entity."""
    body = {"message_id": next(_update_ids) % 100_000, "from": JANE, "chat": chat, "date": int(time.time()),
            "text": text, **extra}
    if command and text.startswith("/"):
        body["entities"] = [{"offset": 0, "length": utf16(text.split(" ", 1)[0]), "type": "bot_command"}]
    return body


def update(kind: str = "message", body: dict | None = None, update_id: int | None = None) -> dict:
    return {"update_id": next(_update_ids) if update_id is None else update_id, kind: body}


def command(text: str, chat: dict = PRIVATE, **extra) -> dict:
    return update("message", message(text, chat, **extra))


def member(status: str, chat: dict = PRIVATE, old: str = "member") -> dict:
    """A my_chat_member update: the bot's own status in the chat changed."""
    return update("my_chat_member", {
        "chat": chat, "from": JANE, "date": int(time.time()),
        "old_chat_member": {"user": THE_BOT, "status": old},
        "new_chat_member": {"user": THE_BOT, "status": status, **({"until_date": 0} if status == "kicked" else {})}})


def post(client, body, *, secret: str | None = SECRET, raw: bytes | None = None, **headers):
    if secret is not None:
        headers[SECRET_HEADER] = secret
    data = raw if raw is not None else json.dumps(body).encode()
    return client.post("/telegram/webhook", data=data, headers=headers, content_type="application/json")


def replies(provider_api) -> list[tuple[str, str]]:
    return [(msg.chat_id, msg.text) for msg in provider_api.telegram_messages]


def dump(engine) -> dict:
    with engine.connect() as conn:
        return {t.name: [dict(r._mapping) for r in conn.execute(sa.select(t).order_by(*t.primary_key.columns or t.c))]
                for t in m.metadata.sorted_tables if t.name != "telegram_updates"}


def handled(engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(m.telegram_updates.c.update_id).order_by(m.telegram_updates.c.update_id))
                    .scalars())


def user_of(engine, user_id) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(m.users).where(m.users.c.id == user_id)).one()._mapping)


def prefs_of(engine, user_id) -> list[tuple[str, bool, bool]]:
    p = m.user_alert_prefs
    with engine.connect() as conn:
        return [(r.alert_type, r.enabled, r.unsubscribed_at is not None) for r in conn.execute(
            sa.select(p).where(p.c.user_id == user_id, p.c.channel == "telegram").order_by(p.c.id))]


def blocks_of(engine) -> list[tuple]:
    b = m.user_channel_blocks
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(b.c.user_id, b.c.channel, b.c.address, b.c.reason))]


# --- the secret ----------------------------------------------------------------------------

def test_without_a_webhook_secret_there_is_no_webhook(live_settings, engine, jane):
    app = create_app(replace(live_settings, secret_key=KEY), engine=engine)
    assert post(app.test_client(), command(f"/start {code_for(jane)}")).status_code == 404
    assert handled(engine) == []


@pytest.mark.parametrize("secret", [None, "", "wrong", SECRET + "x", SECRET[:-1], SECRET.upper(), "é" + SECRET])
def test_a_request_without_the_right_secret_gets_403_and_changes_nothing(client, engine, provider_api, jane, secret):
    before = dump(engine)
    assert post(client, command(f"/start {code_for(jane)}"), secret=secret).status_code == 403
    assert dump(engine) == before and handled(engine) == [] and replies(provider_api) == []


def test_the_secret_is_compared_in_constant_time(monkeypatch, client, jane):
    import hmac

    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    post(client, update("poll", {"id": "1"}), secret="guess")
    assert (b"guess", SECRET.encode()) in compared


# --- whatever the body: 200 -------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"", b"not json", b"{", b"null", b"[]", b"42", b'"update"', b"\xff\xfe\x00garbage", b'{"update_id": "7"}',
    b'{"update_id": true, "message": {}}', b'{"update_id": 1.5}', b'{"message": {"text": "/stop"}}',
    b'{"update_id": 5, "message": "hello"}', b'{"update_id": 6, "message": {"chat": "x", "text": "/stop"}}',
    b'{"update_id": 8, "message": {"chat": {"id": "1111111", "type": "private"}, "text": "/stop", '
    b'"entities": [{"offset": 0, "length": 5, "type": "bot_command"}]}}',
    b'{"update_id": 9, "message": {"chat": {"id": 1111111, "type": "private"}, "text": "/stop", '
    b'"entities": "bot_command"}}',
    b'{"update_id": 10, "message": {"chat": {"id": 1111111, "type": "private"}, "text": ["/stop"], '
    b'"entities": [{"offset": 0, "length": 5, "type": "bot_command"}]}}',
    b'{"update_id": 11, "my_chat_member": {"chat": {"id": 1111111}, "new_chat_member": "kicked"}}',
    b'{"update_id": 12, "message": {"chat": {"id": -5, "type": "group"}, "migrate_to_chat_id": "-1009"}}',
])
def test_garbage_gets_200_and_changes_nothing(client, engine, provider_api, jane, raw):
    connected(engine, jane)
    before = dump(engine)
    response = post(client, None, raw=raw)
    assert response.status_code == 200
    assert dump(engine) == before and replies(provider_api) == []


def test_a_body_too_large_for_any_update_gets_200_and_is_ignored(client, engine, provider_api, jane):
    connected(engine, jane)
    before = dump(engine)
    huge = json.dumps(command("/stop", text_padding="x" * (2 * 1024 * 1024))).encode()
    assert post(client, None, raw=huge).status_code == 200
    assert dump(engine) == before and replies(provider_api) == [] and handled(engine) == []


def test_a_long_real_update_is_not_refused_for_its_size(client, engine, provider_api, jane):
    """Larger than the app's form cap: a 4096-character message that replies to another."""
    connected(engine, jane)
    quoted = message("é" * 4096, command=False)
    assert post(client, command("/stop", reply_to_message=quoted)).status_code == 200
    assert prefs_of(engine, jane) == [("*", False, True), ("price_spike", False, False)]


@pytest.mark.parametrize("kind,body", [
    ("edited_message", {**message("/stop"), "edit_date": int(time.time())}),
    ("channel_post", {**message("/stop", CHANNEL), "sender_chat": CHANNEL}),
    ("edited_channel_post", {**message("/stop", CHANNEL), "edit_date": int(time.time())}),
    ("callback_query", {"id": "4382bfdwdsb323b2d9", "from": JANE, "message": message("Alerts", command=False),
                        "chat_instance": "-2873645634", "data": "/stop"}),
    ("inline_query", {"id": "994738", "from": JANE, "query": "/stop", "offset": ""}),
    ("chat_member", {"chat": PRIVATE, "from": JANE, "date": 1, "old_chat_member": {"user": JANE, "status": "member"},
                     "new_chat_member": {"user": JANE, "status": "kicked", "until_date": 0}}),
    ("message_reaction", {"chat": PRIVATE, "message_id": 3, "date": 1, "old_reaction": [], "new_reaction": []}),
    ("business_message", message("/stop")),
    ("some_future_kind", {"anything": [1, 2, 3]}),
])
def test_other_kinds_of_update_get_200_and_change_nothing(client, engine, provider_api, jane, kind, body):
    connected(engine, jane)
    before = dump(engine)
    sent = update(kind, body)
    assert post(client, sent).status_code == 200
    assert dump(engine) == before and replies(provider_api) == []
    assert handled(engine) == [sent["update_id"]], "recorded as handled all the same"


@pytest.mark.parametrize("sent", [
    lambda: command("/stop", SUPERGROUP),
    lambda: command("/stop@" + BOT, SUPERGROUP),
    lambda: command("/stop", {"id": -4000000001, "title": "Team", "type": "group"}),
    lambda: update("message", message("please /stop", command=False,
                                      entities=[{"offset": 7, "length": 5, "type": "bot_command"}])),
    lambda: update("message", message("/stop", command=False)),  # text only, no entity
    lambda: update("message", message("/stop", command=False, entities=[{"offset": 0, "length": 5, "type": "code"}])),
    lambda: command("/stop@some_other_bot"),
])
def test_commands_outside_a_private_chat_or_without_their_entity_change_nothing(client, engine, provider_api, jane,
                                                                                 sent):
    connected(engine, jane)
    before = dump(engine)
    assert post(client, sent()).status_code == 200
    assert dump(engine) == before and replies(provider_api) == []


# --- each update once -----------------------------------------------------------------------

def test_a_repeated_update_does_nothing_and_gets_no_second_reply(client, engine, provider_api, jane):
    connected(engine, jane)
    stop = command("/stop")
    assert post(client, stop).status_code == 200
    assert len(replies(provider_api)) == 1
    with engine.begin() as conn:  # she turns it back on meanwhile
        conn.execute(sa.update(m.user_alert_prefs).values(enabled=True, unsubscribed_at=None))
    before = dump(engine)
    assert post(client, stop).status_code == 200
    assert dump(engine) == before and len(replies(provider_api)) == 1


def test_a_second_delivery_running_at_once_waits_for_the_first_and_then_does_nothing(
        pg_url, live_settings, provider_api):
    engine = make_engine(pg_url)
    settings = replace(live_settings, database_url=pg_url, public_url=PUBLIC_URL, secret_key=KEY,
                       telegram_bot_username=BOT, telegram_webhook_secret=SECRET)
    client = create_app(settings, engine=engine).test_client()
    with engine.begin() as conn:
        uid = add_user(conn, telegram_chat_id=str(JANE_CHAT))
        add_pref(conn, uid, channel="telegram")
    stop = command("/stop")
    answers = []
    with engine.connect() as first:  # the first delivery, holding its update_id uncommitted
        tx = first.begin()
        first.execute(sa.insert(m.telegram_updates).values(update_id=stop["update_id"]))
        second = threading.Thread(target=lambda: answers.append(post(client, stop).status_code))
        second.start()
        second.join(1.0)
        assert second.is_alive(), "the second delivery waits on the first one's row"
        tx.commit()
    second.join(30)
    assert answers == [200]
    assert replies(provider_api) == [] and prefs_of(engine, uid) == [("*", True, False)]
    engine.dispose()


# --- /start CODE -------------------------------------------------------------------------------

@pytest.mark.parametrize("written", ["/start {code}", "/start@" + BOT + " {code}", "/start@ENERGY_ALERTS_BOT {code}",
                                     "/START {code}", "/start   {code}  "])
def test_start_with_a_code_connects_the_chat_lifts_a_block_and_says_so(client, engine, provider_api, jane, written):
    with engine.begin() as conn:
        conn.execute(sa.update(m.users).where(m.users.c.id == jane).values(telegram_chat_id="999"))
        conn.execute(sa.insert(m.user_channel_blocks).values(user_id=jane, channel="telegram", address="999",
                                                             reason="bot blocked by the user"))
    code = code_for(jane, chat="999")
    assert post(client, command(written.format(code=code))).status_code == 200
    assert user_of(engine, jane)["telegram_chat_id"] == str(JANE_CHAT)
    assert blocks_of(engine) == []
    ((chat, text),) = replies(provider_api)
    assert chat == str(JANE_CHAT) and "This chat is connected" in text
    link = re.search(r'<a href="([^"]+)">Manage alerts</a>', text).group(1)
    assert tokens.read_preferences_token(KEY, link.rsplit("/", 1)[1], datetime.now(UTC)) == jane


def test_connecting_turns_back_on_what_an_unsubscribe_turned_off(client, engine, provider_api, jane):
    with engine.begin() as conn:
        from alerts.subscribers import unsubscribe as unsub
        unsub.unsubscribe(conn, jane, "telegram")
    post(client, command(f"/start {code_for(jane)}"))
    assert prefs_of(engine, jane) == [("*", True, False), ("price_spike", False, False)]


def test_a_user_without_telegram_subscriptions_is_told_where_to_add_them(client, engine, provider_api):
    with engine.begin() as conn:
        uid = add_user(conn)
    post(client, command(f"/start {code_for(uid)}"))
    ((_, text),) = replies(provider_api)
    assert "no Telegram subscriptions yet" in text


@pytest.mark.parametrize("make,says", [
    (lambda uid: code_for(uid, key=OTHER_KEY), "not valid"),
    (lambda uid: code_for(uid)[:-1], "not valid"),
    (lambda uid: code_for(uid)[:-1] + ("A" if code_for(uid)[-1] != "A" else "B"), "not valid"),
    (lambda uid: code_for(uid, chat="555"), "not valid"),  # made for her old chat: she connected another since
    (lambda uid: code_for(uid + 1000), "not valid"),  # a user that does not exist
    (lambda uid: "hello", "not valid"),
    (lambda uid: "x" * 64, "not valid"),
    (lambda uid: code_for(uid, now=datetime.now(UTC) - timedelta(hours=24, minutes=1)), "expired"),
    (lambda uid: code_for(uid, now=datetime.now(UTC) + timedelta(hours=1)), "expired"),  # from the future
])
def test_an_invalid_or_expired_code_changes_nothing_and_the_reply_says_so(client, engine, provider_api, jane,
                                                                           make, says):
    before = dump(engine)
    assert post(client, command(f"/start {make(jane)}")).status_code == 200
    assert dump(engine) == before
    ((chat, text),) = replies(provider_api)
    assert chat == str(JANE_CHAT) and says in text


def test_a_code_connects_one_chat_only(client, engine, provider_api, jane):
    code = code_for(jane)
    post(client, command(f"/start {code}"))
    other = {**PRIVATE, "id": 2222222, "first_name": "Mallory"}
    post(client, command(f"/start {code}", other))
    assert user_of(engine, jane)["telegram_chat_id"] == str(JANE_CHAT)
    assert "not valid" in replies(provider_api)[-1][1]
    post(client, command(f"/start {code}"))  # the same chat again: harmless
    assert "already connected" in replies(provider_api)[-1][1]


def test_start_in_a_group_connects_nothing(client, engine, provider_api, jane):
    before = dump(engine)
    post(client, command(f"/start {code_for(jane)}", SUPERGROUP))
    assert dump(engine) == before and replies(provider_api) == []


def test_start_without_a_code_in_an_unknown_chat_says_how_to_connect(client, engine, provider_api, jane):
    before = dump(engine)
    post(client, command("/start"))
    assert dump(engine) == before
    assert "Connect Telegram" in replies(provider_api)[0][1]


# --- /stop, /start again, /settings ----------------------------------------------------------

def test_stop_unsubscribes_the_chat_from_telegram_as_the_one_click_post_does(client, engine, provider_api, jane,
                                                                           now):
    connected(engine, jane)
    with engine.begin() as conn:
        queued = add_delivery(conn, jane, add_event(conn, status="fanned_out"), channel="telegram")
        by_email = add_delivery(conn, jane, add_event(conn, status="fanned_out"), channel="email")
        digest = add_digest(conn, jane, channel="telegram")
    assert post(client, command("/stop")).status_code == 200
    assert prefs_of(engine, jane) == [("*", False, True), ("price_spike", False, False)]
    with engine.connect() as conn:
        d, g = m.user_alert_deliveries, m.user_alert_digests
        state = lambda t, i: tuple(conn.execute(sa.select(t.c.status, t.c.last_error).where(t.c.id == i)).one())  # noqa
        assert state(d, queued) == ("skipped", "unsubscribed")
        assert state(g, digest) == ("skipped", "unsubscribed")
        assert state(d, by_email) == ("queued", None)
    ((chat, text),) = replies(provider_api)
    assert chat == str(JANE_CHAT) and "Send /start to get them again" in text

    post(client, command("/start"))
    assert prefs_of(engine, jane) == [("*", True, False), ("price_spike", False, False)], \
        "only what /stop turned off comes back"
    assert "on in this chat" in replies(provider_api)[-1][1]


def test_stop_waits_for_a_send_in_flight_and_says_one_may_still_arrive(client, engine, provider_api, jane,
                                                                       monkeypatch):
    monkeypatch.setattr(bot, "STOP_WAIT_SECONDS", 0.2)
    connected(engine, jane)
    with engine.begin() as conn:
        add_delivery(conn, jane, add_event(conn, status="fanned_out"), channel="telegram", status="sending",
                     attempts=1)
    post(client, command("/stop"))
    assert "may still arrive" in replies(provider_api)[0][1]


def test_settings_replies_with_the_preferences_link(client, engine, provider_api, jane):
    connected(engine, jane)
    post(client, command("/settings"))
    ((chat, text),) = replies(provider_api)
    link = re.search(r'<a href="([^"]+)">', text).group(1)
    assert link.startswith(f"{PUBLIC_URL}/preferences/")
    assert tokens.read_preferences_token(KEY, link.rsplit("/", 1)[1], datetime.now(UTC)) == jane


def test_settings_without_a_public_url_says_the_page_is_not_available(bot_settings, engine, provider_api, jane):
    connected(engine, jane)
    client = create_app(replace(bot_settings, public_url=None), engine=engine).test_client()
    post(client, command("/settings"))
    assert "not available" in replies(provider_api)[0][1]


@pytest.mark.parametrize("text", ["/stop", "/settings"])
def test_commands_from_a_chat_of_nobody_say_it_is_not_connected(client, engine, provider_api, jane, text):
    before = dump(engine)
    post(client, command(text))
    assert dump(engine) == before and "not connected" in replies(provider_api)[0][1]


@pytest.mark.parametrize("text", ["/help", "/whatever"])
def test_other_commands_get_the_list_of_commands(client, provider_api, text):
    post(client, command(text))
    assert "/stop" in replies(provider_api)[0][1] and "/settings" in replies(provider_api)[0][1]


def test_a_reply_to_a_chat_that_blocked_the_bot_meanwhile_records_the_block(client, engine, provider_api, jane):
    connected(engine, jane)
    provider_api.telegram_error(*BLOCKED, chat_id=JANE_CHAT)
    assert post(client, command("/settings")).status_code == 200
    assert blocks_of(engine) == [(jane, "telegram", str(JANE_CHAT), "telegram 403: Forbidden: bot was blocked by the user")]


def test_a_reply_that_fails_for_a_while_still_gets_200(client, engine, provider_api, jane):
    connected(engine, jane)
    provider_api.telegram_raw(502, "<html>Bad Gateway</html>")
    assert post(client, command("/settings")).status_code == 200
    assert blocks_of(engine) == [] and handled(engine)


# --- my_chat_member and migration ---------------------------------------------------------------

def test_a_blocked_bot_blocks_the_chat_and_skips_what_is_queued_and_unblocking_lifts_it(
        client, engine, provider_api, jane, live_settings):
    connected(engine, jane)
    with engine.begin() as conn:
        queued = add_delivery(conn, jane, add_event(conn, status="fanned_out"), channel="telegram")
        digest = add_digest(conn, jane, channel="telegram")
    assert post(client, member("kicked")).status_code == 200
    assert blocks_of(engine) == [(jane, "telegram", str(JANE_CHAT), "bot blocked by the user")]
    reason = "destination_disabled: bot blocked by the user"
    with engine.connect() as conn:
        d, g = m.user_alert_deliveries, m.user_alert_digests
        assert conn.execute(sa.select(d.c.status, d.c.last_error).where(d.c.id == queued)).one() == ("skipped", reason)
        assert conn.execute(sa.select(g.c.status, g.c.last_error).where(g.c.id == digest)).one() == ("skipped", reason)
    assert replies(provider_api) == [], "no reply to a chat that blocked the bot"

    with engine.begin() as conn:  # a later alert: the send path skips it without calling Telegram
        later = add_delivery(conn, jane, add_event(conn, status="fanned_out"), channel="telegram")
    with session(engine, live_settings) as (db, channels):
        assert run_phases(db, ("c",), clock_at(datetime.now(UTC)), live_settings, channels)["c"]["instant"][
            "skipped"] == 1
    assert provider_api.requests_to("telegram") == 0
    with engine.connect() as conn:
        assert conn.execute(sa.select(m.user_alert_deliveries.c.last_error)
                            .where(m.user_alert_deliveries.c.id == later)).scalar_one() == reason

    assert post(client, member("member", old="kicked")).status_code == 200
    assert blocks_of(engine) == []


def test_the_log_names_updates_and_users_never_chats_codes_or_what_was_written(client, engine, jane, caplog):
    connected(engine, jane)
    code = code_for(jane)
    with caplog.at_level("INFO"):
        for sent in (command(f"/start {code}"), command("/settings"), command("/stop please"), member("kicked"),
                     member("member"), update("weird\nkind\x1b[31m", {}),
                     update("message", {"message_id": 1, "chat": {"id": JANE_CHAT, "type": "group"},
                                        "date": 1, "migrate_to_chat_id": GROUP})):
            assert post(client, sent).status_code == 200
    logged = caplog.text
    assert f"user {jane}" in logged and "blocked by its chat" in logged
    for secret in (str(JANE_CHAT), str(GROUP), code, "please", "\x1b", KEY):
        assert secret not in logged


def test_kicked_from_a_chat_nobody_has_changes_nothing(client, engine, jane):
    before = dump(engine)
    assert post(client, member("kicked")).status_code == 200
    assert dump(engine) == before


def test_unblocking_lifts_only_the_block_of_that_chat(client, engine, jane):
    connected(engine, jane)
    with engine.begin() as conn:
        other = add_user(conn, telegram_chat_id="333")
        for uid, chat in ((jane, str(JANE_CHAT)), (other, "333")):
            conn.execute(sa.insert(m.user_channel_blocks).values(user_id=uid, channel="telegram", address=chat,
                                                                 reason="bot blocked by the user"))
    post(client, member("member", old="kicked"))
    assert blocks_of(engine) == [(other, "telegram", "333", "bot blocked by the user")]


def test_a_group_that_became_a_supergroup_moves_its_users_to_the_new_chat(client, engine, provider_api):
    old_group = {"id": -4012345678, "title": "Energy desk", "type": "group"}
    with engine.begin() as conn:
        members = [add_user(conn, telegram_chat_id=str(old_group["id"])) for _ in range(2)]
        stranger = add_user(conn, telegram_chat_id="42")
    migrate = update("message", {"message_id": 9, "from": JANE, "chat": old_group, "date": int(time.time()),
                                 "migrate_to_chat_id": GROUP})
    assert post(client, migrate).status_code == 200
    assert [user_of(engine, uid)["telegram_chat_id"] for uid in members] == [str(GROUP)] * 2
    assert user_of(engine, stranger)["telegram_chat_id"] == "42"
    before = dump(engine)
    migrated_from = update("message", {"message_id": 1, "from": JANE, "chat": SUPERGROUP, "date": int(time.time()),
                                       "migrate_from_chat_id": old_group["id"]})
    assert post(client, migrated_from).status_code == 200
    assert dump(engine) == before and replies(provider_api) == []


# --- connect codes ---------------------------------------------------------------------------

def test_a_connect_code_fits_telegrams_start_parameter():
    for user_id in (1, 42, 2**31, 2**63 - 1):
        code = bot.make_connect_code(KEY, user_id, None, datetime.now(UTC))
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", code) and len(code) == bot.CONNECT_CODE_CHARS
        assert bot.connect_code_user(code) == user_id


def test_a_connect_code_holds_for_24_hours_from_when_it_was_made():
    made = datetime(2026, 5, 12, 12, 0, tzinfo=UTC)
    code = bot.make_connect_code(KEY, 7, None, made)
    assert bot.connect_code_problem(KEY, code, None, made) is None
    assert bot.connect_code_problem(KEY, code, None, made + timedelta(hours=24)) is None
    assert bot.connect_code_problem(KEY, code, None, made + timedelta(hours=24, seconds=1)) == "expired"
    assert bot.connect_code_problem(KEY, code, "123", made) == "invalid", "bound to the chat the user had"
    assert bot.connect_code_problem(OTHER_KEY, code, None, made) == "invalid"


def test_a_connect_code_has_one_spelling():
    code = bot.make_connect_code(KEY, 7, None, datetime.now(UTC))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    others = [code[:-1] + c for c in alphabet if c != code[-1]]
    assert [bot.connect_code_problem(KEY, other, None, datetime.now(UTC)) for other in others] == ["invalid"] * 63


# --- settings and `alerts telegram set-webhook` ------------------------------------------------

@pytest.mark.parametrize("value", ["has space", "semi;colon", "x" * 257, "ünïcode", "a/b", "a.b"])
def test_a_webhook_secret_outside_telegrams_rule_is_refused_by_name(value):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"ALERTS_TELEGRAM_WEBHOOK_SECRET": value, "ALERTS_TELEGRAM_BOT_TOKEN": "1:x",
                           "ALERTS_RATELIMIT_REDIS_URL": "redis://localhost"})
    assert info.value.variable == "ALERTS_TELEGRAM_WEBHOOK_SECRET"
    assert value not in str(info.value), "a secret is never echoed"


def test_a_webhook_secret_of_256_allowed_characters_is_taken():
    value = ("Az09_-" * 43)[:256]
    settings = Settings.from_env({"ALERTS_TELEGRAM_WEBHOOK_SECRET": value, "ALERTS_TELEGRAM_BOT_TOKEN": "1:x"})
    assert settings.telegram_webhook_secret == value and value not in repr(settings)


def test_a_webhook_secret_needs_the_bot_token():
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"ALERTS_TELEGRAM_WEBHOOK_SECRET": SECRET})
    assert info.value.variable == "ALERTS_TELEGRAM_BOT_TOKEN"


@pytest.mark.parametrize("value,taken", [("@energy_alerts_bot", "energy_alerts_bot"), ("EnergyBot", "EnergyBot")])
def test_a_bot_username_is_taken_with_or_without_its_at(value, taken):
    assert Settings.from_env({"ALERTS_TELEGRAM_BOT_USERNAME": value}).telegram_bot_username == taken


@pytest.mark.parametrize("value", ["bot", "1energy_bot", "energy-bot", "x" * 33, "t.me/energy_bot"])
def test_a_bot_username_telegram_would_not_allow_is_refused_by_name(value):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"ALERTS_TELEGRAM_BOT_USERNAME": value})
    assert info.value.variable == "ALERTS_TELEGRAM_BOT_USERNAME"


@pytest.mark.parametrize("env,named", [
    ({"ALERTS_TELEGRAM_WEBHOOK_SECRET": "no spaces please", "ALERTS_TELEGRAM_BOT_TOKEN": "1:x"},
     "ALERTS_TELEGRAM_WEBHOOK_SECRET"),
    ({"ALERTS_TELEGRAM_BOT_USERNAME": "-"}, "ALERTS_TELEGRAM_BOT_USERNAME"),
])
def test_the_command_line_exits_2_naming_the_variable(sqlite_url, env, named):
    result = CliRunner().invoke(cli, ["status"], env={"DATABASE_URL": sqlite_url, **env})
    assert result.exit_code == 2 and named in result.output


def _webhook_env(sqlite_url, provider_api, **extra) -> dict:
    return {"DATABASE_URL": sqlite_url, "ALERTS_TELEGRAM_BOT_TOKEN": provider_api.bot_token,
            "ALERTS_TELEGRAM_API_BASE": provider_api.telegram_api_base, "ALERTS_PUBLIC_URL": PUBLIC_URL,
            "ALERTS_SECRET_KEY": KEY, "ALERTS_TELEGRAM_WEBHOOK_SECRET": SECRET,
            "ALERTS_RATELIMIT_REDIS_URL": "redis://127.0.0.1:1", **extra}


def test_set_webhook_registers_the_url_the_secret_and_the_update_kinds(sqlite_url, provider_api):
    result = CliRunner().invoke(cli, ["telegram", "set-webhook"], env=_webhook_env(sqlite_url, provider_api))
    assert result.exit_code == 0, result.output
    assert provider_api.webhooks == [{"url": f"{PUBLIC_URL}/telegram/webhook", "secret_token": SECRET,
                                      "allowed_updates": ["message", "my_chat_member"],
                                      "drop_pending_updates": False}]
    assert SECRET not in result.output and provider_api.bot_token not in result.output
    info = CliRunner().invoke(cli, ["telegram", "webhook-info"], env=_webhook_env(sqlite_url, provider_api))
    assert info.exit_code == 0 and f"url: {PUBLIC_URL}/telegram/webhook" in info.output


@pytest.mark.parametrize("unset", ["ALERTS_PUBLIC_URL", "ALERTS_TELEGRAM_WEBHOOK_SECRET", "ALERTS_TELEGRAM_BOT_TOKEN"])
def test_set_webhook_without_a_setting_exits_2_naming_it(sqlite_url, provider_api, unset):
    env = _webhook_env(sqlite_url, provider_api, **{unset: ""})
    if unset == "ALERTS_TELEGRAM_BOT_TOKEN":
        env["ALERTS_TELEGRAM_WEBHOOK_SECRET"] = ""
    result = CliRunner().invoke(cli, ["telegram", "set-webhook"], env=env)
    assert result.exit_code == 2 and unset in result.output
    assert provider_api.webhooks == []


def test_set_webhook_refused_by_telegram_exits_1_with_its_words(sqlite_url, provider_api):
    env = _webhook_env(sqlite_url, provider_api, ALERTS_PUBLIC_URL="http://alerts.example.com")
    result = CliRunner().invoke(cli, ["telegram", "set-webhook"], env=env)
    assert result.exit_code == 1 and "HTTPS URL must be provided" in result.output
    assert provider_api.bot_token not in result.output


# --- replies and the rate limit -------------------------------------------------------------

class _Recording:
    def __init__(self):
        self.sent = []

    def send(self, recipient, message):
        self.sent.append(recipient)


def _limiter_and_clock():
    from alerts.sending.ratelimit import LocalLimiter

    ms = [0]
    slept: list[float] = []

    def sleep(seconds):
        slept.append(seconds)
        ms[0] += round(seconds * 1000)

    return LocalLimiter(clock_ms=lambda: ms[0]), sleep, slept


def test_a_second_reply_to_a_chat_within_its_second_waits_for_the_next_one():
    limiter, sleep, slept = _limiter_and_clock()
    channel = _Recording()
    now = datetime(2026, 5, 12, tzinfo=timezone.utc)

    outcomes = [bot.deliver(None, channel, bot.Reply("42", "hi"), now, limiter=limiter, sleep=sleep) for _ in range(2)]

    assert outcomes == ["sent", "sent"] and channel.sent == ["42", "42"]
    assert slept == [1.0]


def test_a_reply_whose_slot_lies_beyond_the_longest_wait_is_not_sent():
    limiter, sleep, slept = _limiter_and_clock()
    for _ in range(int(bot.REPLY_MAX_WAIT_SECONDS) + 2):  # the workers booked the chat's next seconds
        limiter.acquire("42", max_reserve=60)
    channel = _Recording()

    outcome = bot.deliver(None, channel, bot.Reply("42", "hi"), datetime.now(timezone.utc), limiter=limiter,
                          sleep=sleep)

    assert outcome == "rate limited" and channel.sent == [] and slept == []
