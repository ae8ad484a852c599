"""The subscriber-facing web app (docs/web-and-security.md), through Flask's test client on PostgreSQL
and SQLite: what each request changes, what it shows, and what it refuses."""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import replace
from datetime import timedelta
from html.parser import HTMLParser

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from alerts.core import tables as m
from alerts.core import tokens
from alerts.subscribers import unsubscribe as unsub
from alerts.cli import cli
from alerts.core.settings import ConfigError, Settings
from alerts.core.db import make_engine
from alerts.web import MAX_BODY_BYTES, create_app
from tests.support.factories import add_delivery, add_digest, add_event, add_pref, add_user

KEY = "k" * 16 + "0123456789abcdef"
ONE_CLICK = {"List-Unsubscribe": "One-Click"}
ADDRESS = "jane.doe@example.com"


@pytest.fixture
def web_settings(settings) -> Settings:
    return replace(settings, secret_key=KEY, public_url="https://alerts.example.com")


@pytest.fixture
def client(web_settings, engine):
    app = create_app(web_settings, engine=engine)
    app.testing = True
    return app.test_client()


@pytest.fixture
def user(engine, now):
    """A user with email and telegram preferences and rows in every state."""
    with engine.begin() as conn:
        uid = add_user(conn, email=ADDRESS, telegram_chat_id="123456789")
        add_pref(conn, uid, channel="email")
        add_pref(conn, uid, channel="email", alert_type="price_spike", delivery_kind="digest")
        add_pref(conn, uid, channel="telegram")
    return uid


def token(user_id: int, channel: str = "email", key: str = KEY) -> str:
    return tokens.make_token(key, user_id, channel)


def dump(engine) -> dict:
    with engine.connect() as conn:
        return {t.name: [dict(r._mapping) for r in conn.execute(sa.select(t).order_by(*t.primary_key.columns or t.c))]
                for t in m.metadata.sorted_tables}


def prefs(engine, user_id: int) -> dict[tuple[str, str], bool]:
    p = m.user_alert_prefs
    with engine.connect() as conn:
        return {(r.channel, r.alert_type): r.enabled
                for r in conn.execute(sa.select(p).where(p.c.user_id == user_id))}


def state(engine, table, row_id) -> tuple:
    with engine.connect() as conn:
        return tuple(conn.execute(sa.select(table.c.status, table.c.last_error).where(table.c.id == row_id)).one())


class Page(HTMLParser):
    """What a person (or a screen reader) gets from a page: its text, forms and buttons."""

    def __init__(self, html: str):
        super().__init__()
        self.text, self.forms, self.buttons, self.scripts, self.external = [], [], [], 0, []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form":
            self.forms.append(attrs)
        elif tag == "button":
            self.buttons.append(attrs)
        elif tag == "script":
            self.scripts += 1
        for name in ("src", "href", "action"):
            if attrs.get(name):
                self.external.append(attrs[name])

    def handle_data(self, data):
        self.text.append(data)

    @property
    def words(self) -> str:
        return " ".join(" ".join(self.text).split())


# --- GET: a page, and nothing changed -------------------------------------------------------

def test_the_page_names_the_channel_and_a_masked_address_and_changes_nothing(client, engine, user):
    before = dump(engine)
    response = client.get(f"/unsubscribe/{token(user)}")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    page = Page(html)
    assert "email" in page.words and "j***@example.com" in page.words
    assert ADDRESS not in html and token(user) not in html
    assert page.forms == [{"method": "post"}], "one form, posting back to this page's own address"
    assert [b.get("type") for b in page.buttons] == ["submit"]
    assert "Unsubscribe" in page.words and page.scripts == 0 and page.external == []
    assert dump(engine) == before


def test_a_telegram_token_shows_the_telegram_page(client, user):
    page = Page(client.get(f"/unsubscribe/{token(user, 'telegram')}").get_data(as_text=True))
    assert "Telegram" in page.words and "***89" in page.words and "123456789" not in page.words


def test_an_address_that_holds_markup_is_escaped(client, engine):
    with engine.begin() as conn:
        uid = add_user(conn, email="a@<script>alert(1)</script>.example")
    html = client.get(f"/unsubscribe/{token(uid)}").get_data(as_text=True)
    assert "<script>" not in html and "a***@&lt;script&gt;alert(1)&lt;/script&gt;.example" in html


def test_pages_send_headers_that_keep_the_token_in(client, user):
    response = client.get(f"/unsubscribe/{token(user)}")
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["Cache-Control"] == "no-store"


# --- POST: one click ------------------------------------------------------------------------

def test_one_click_disables_the_channel_and_skips_what_is_queued_on_it(client, engine, user, now):
    with engine.begin() as conn:
        other = add_user(conn)
        add_pref(conn, other, channel="email")
        queued = add_delivery(conn, user, add_event(conn, status="fanned_out"))
        retried = add_delivery(conn, user, add_event(conn, status="fanned_out"), attempts=2,
                               next_retry_at=now + timedelta(minutes=5), last_error="451 try later")
        pending_item = add_delivery(conn, user, add_event(conn, status="fanned_out"), delivery_kind="digest")
        sent = add_delivery(conn, user, add_event(conn, status="fanned_out"), status="sent")
        telegram = add_delivery(conn, user, add_event(conn, status="fanned_out"), channel="telegram")
        others = add_delivery(conn, other, add_event(conn, status="fanned_out"))
        digest = add_digest(conn, user)
        retried_digest = add_digest(conn, user, digest_key="retried", sequence=1, attempts=1, last_error="timeout")
        telegram_digest = add_digest(conn, user, channel="telegram")
    response = client.post(f"/unsubscribe/{token(user)}", data=ONE_CLICK)
    assert response.status_code == 200
    assert "You are unsubscribed" in Page(response.get_data(as_text=True)).words
    assert prefs(engine, user) == {("email", "*"): False, ("email", "price_spike"): False, ("telegram", "*"): True}
    assert prefs(engine, other) == {("email", "*"): True}
    d, g = m.user_alert_deliveries, m.user_alert_digests
    for row in (queued, retried, pending_item):
        assert state(engine, d, row) == ("skipped", "unsubscribed")
    for row in (digest, retried_digest):
        assert state(engine, g, row) == ("skipped", "unsubscribed")
    assert state(engine, d, sent) == ("sent", None)
    assert state(engine, d, telegram) == ("queued", None)
    assert state(engine, d, others) == ("queued", None)
    assert state(engine, g, telegram_digest) == ("queued", None)


def test_one_click_again_is_a_harmless_200(client, engine, user):
    assert client.post(f"/unsubscribe/{token(user)}", data=ONE_CLICK).status_code == 200
    before = dump(engine)
    again = client.post(f"/unsubscribe/{token(user)}", data=ONE_CLICK)
    assert again.status_code == 200 and dump(engine) == before
    assert "already unsubscribed" in Page(client.get(f"/unsubscribe/{token(user)}").get_data(as_text=True)).words


def test_the_page_offers_resubscribe_which_turns_preferences_on_and_leaves_skipped_rows(client, engine, user):
    with engine.begin() as conn:
        queued = add_delivery(conn, user, add_event(conn, status="fanned_out"))
    html = client.post(f"/unsubscribe/{token(user)}", data=ONE_CLICK).get_data(as_text=True)
    confirmed = Page(html)
    assert confirmed.forms == [{"method": "post"}]
    (button,) = confirmed.buttons
    assert "Resubscribe" in confirmed.words
    (anti_forgery,) = re.findall(r'<input type="hidden" name="form_token" value="([^"]+)">', html)
    response = client.post(f"/unsubscribe/{token(user)}", data={button["name"]: button["value"],
                                                               "form_token": anti_forgery})
    assert response.status_code == 200
    assert "subscribed again" in Page(response.get_data(as_text=True)).words
    assert set(prefs(engine, user).values()) == {True}
    assert state(engine, m.user_alert_deliveries, queued) == ("skipped", "unsubscribed")


def test_a_post_without_the_one_click_field_changes_nothing(client, engine, user):
    before = dump(engine)
    for body in ({}, {"List-Unsubscribe": "yes"}, {"action": "delete"}):
        assert client.post(f"/unsubscribe/{token(user)}", data=body).status_code == 400
    assert dump(engine) == before


def test_a_send_still_in_flight_makes_it_503_until_nothing_can_arrive_after_the_200(client, engine, user,
                                                                                  monkeypatch, caplog):
    monkeypatch.setattr(unsub, "IN_FLIGHT_WAIT_SECONDS", 0.3)
    with engine.begin() as conn:
        stuck = add_delivery(conn, user, add_event(conn, status="fanned_out"), status="sending", attempts=1)
        queued = add_delivery(conn, user, add_event(conn, status="fanned_out"))
    response = client.post(f"/unsubscribe/{token(user)}", data=ONE_CLICK)
    assert response.status_code == 503 and response.headers["Retry-After"] == "60"
    assert "unsubscribe is recorded" in Page(response.get_data(as_text=True)).words
    assert set(prefs(engine, user).values()) == {False, True}, "email off, telegram untouched"
    assert not any(enabled for (channel, _), enabled in prefs(engine, user).items() if channel == "email")
    assert state(engine, m.user_alert_deliveries, queued) == ("skipped", "unsubscribed")
    assert state(engine, m.user_alert_deliveries, stuck) == ("sending", None), "a send in flight is left to its sender"
    assert "still in flight" in caplog.text
    with engine.begin() as conn:  # the sender records its outcome
        conn.execute(sa.update(m.user_alert_deliveries).where(m.user_alert_deliveries.c.id == stuck)
                     .values(status="sent"))
    assert client.post(f"/unsubscribe/{token(user)}", data=ONE_CLICK).status_code == 200


def test_a_send_that_fails_while_the_post_waits_is_skipped_before_the_200(client, engine, user):
    """The in-flight row comes back to queued (a transient failure) while the POST waits:
    it is skipped before the POST answers, never retried."""
    with engine.begin() as conn:
        stuck = add_delivery(conn, user, add_event(conn, status="fanned_out"), status="sending", attempts=1)

    def sender_gives_up():
        with engine.begin() as conn:
            conn.execute(sa.update(m.user_alert_deliveries).where(m.user_alert_deliveries.c.id == stuck)
                         .values(status="queued"))

    sender = threading.Timer(0.3, sender_gives_up)
    sender.start()
    try:
        assert client.post(f"/unsubscribe/{token(user)}", data=ONE_CLICK).status_code == 200
    finally:
        sender.join(10)
    assert state(engine, m.user_alert_deliveries, stuck) == ("skipped", "unsubscribed")


# --- security -------------------------------------------------------------------------------

def _flipped(text: str, position: int) -> str:
    chars = list(text)
    chars[position] = "A" if chars[position] != "A" else "B"
    return "".join(chars)


@pytest.mark.parametrize("forge", [
    lambda uid: _flipped(token(uid), 3),
    lambda uid: _flipped(token(uid), -2),
    lambda uid: token(uid, key="another key of more than 32 characters!"),
    lambda uid: token(uid)[:-1],
    lambda uid: "not-a-token",
])
@pytest.mark.parametrize("method", ["get", "post"])
def test_an_altered_or_forged_token_gets_400_and_changes_nothing(client, engine, user, forge, method):
    bad = forge(user)
    before = dump(engine)
    response = getattr(client, method)(f"/unsubscribe/{bad}", data=ONE_CLICK)
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    assert "not valid" in html and bad not in html
    assert dump(engine) == before


def test_a_token_of_a_deleted_user_gets_400(client, engine, user):
    link = token(user)
    with engine.begin() as conn:
        conn.execute(sa.delete(m.users).where(m.users.c.id == user))
    before = dump(engine)
    assert client.get(f"/unsubscribe/{link}").status_code == 400
    assert client.post(f"/unsubscribe/{link}", data=ONE_CLICK).status_code == 400
    assert dump(engine) == before


def test_an_oversized_body_gets_413_and_changes_nothing(client, engine, user):
    before = dump(engine)
    body = {"List-Unsubscribe": "One-Click", "padding": "x" * (MAX_BODY_BYTES + 1)}
    assert client.post(f"/unsubscribe/{token(user)}", data=body).status_code == 413
    assert client.post(f"/unsubscribe/{token(user)}", data=b"x" * (10 * MAX_BODY_BYTES),
                       content_type="application/x-www-form-urlencoded").status_code == 413
    assert dump(engine) == before


def test_there_is_no_redirect_to_follow(client, user):
    for path in (f"/unsubscribe/{token(user)}?next=https://evil.example", "/unsubscribe/?next=//evil.example",
                 "//evil.example/", "/healthz?url=https://evil.example"):
        response = client.get(path)
        assert "Location" not in response.headers and not 300 <= response.status_code < 400


def test_other_methods_are_refused(client, engine, user):
    before = dump(engine)
    for method in ("put", "delete", "patch"):
        assert getattr(client, method)(f"/unsubscribe/{token(user)}", data=ONE_CLICK).status_code == 405
    assert dump(engine) == before


def test_nothing_logged_holds_a_token_or_an_address(web_settings, engine, user, caplog):
    app = create_app(web_settings, engine=engine)  # not testing mode: errors are logged, not raised
    client = app.test_client()
    link = token(user)
    with caplog.at_level(logging.DEBUG):
        client.get(f"/unsubscribe/{link}")
        client.post(f"/unsubscribe/{link}", data=ONE_CLICK)
        client.post(f"/unsubscribe/{_flipped(link, 4)}", data=ONE_CLICK)
        engine.dispose()
        broken = create_app(replace(web_settings, database_url="postgresql://nobody@127.0.0.1:1/none"))
        assert broken.test_client().post(f"/unsubscribe/{link}", data=ONE_CLICK).status_code == 503
    logged = caplog.text
    assert "unsubscribed on email" in logged and "database unreachable on /unsubscribe/***" in logged
    assert link not in logged and link[:12] not in logged and ADDRESS not in logged


# --- healthz and start-up -------------------------------------------------------------------

def test_healthz_says_the_database_is_ok(client):
    response = client.get("/healthz")
    assert (response.status_code, response.get_json()) == (200, {"database": "ok"})


def test_healthz_is_503_when_the_database_is_unreachable(web_settings):
    app = create_app(replace(web_settings, database_url="postgresql://nobody@127.0.0.1:1/none"))
    response = app.test_client().get("/healthz")
    assert (response.status_code, response.get_json()) == (503, {"database": "unreachable"})


@pytest.mark.parametrize("key", [None, "x" * 31])
def test_the_app_needs_a_secret_key_of_32_characters(settings, key):
    with pytest.raises(ConfigError) as info:
        create_app(replace(settings, secret_key=key))
    assert info.value.variable == "ALERTS_SECRET_KEY"


@pytest.mark.parametrize("key", [None, "x" * 31])
def test_alerts_web_exits_2_naming_the_secret_key(sqlite_url, key):
    env = {"DATABASE_URL": sqlite_url, "ALERTS_SECRET_KEY": key or ""}
    result = CliRunner().invoke(cli, ["web", "--port", "1"], env=env)
    assert result.exit_code == 2 and "ALERTS_SECRET_KEY" in result.output


def test_alerts_web_exits_2_on_an_unmigrated_database(tmp_path):
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}", "ALERTS_SECRET_KEY": KEY}
    result = CliRunner().invoke(cli, ["web", "--port", "1"], env=env)
    assert result.exit_code == 2 and "alerts migrate" in result.output


def test_the_wsgi_app_is_built_from_the_environment_on_first_use(monkeypatch, sqlite_url):
    import alerts.web

    monkeypatch.setattr(alerts.web, "_app", None)
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    monkeypatch.delenv("ALERTS_SECRET_KEY", raising=False)
    monkeypatch.delenv("ALERTS_PUBLIC_URL", raising=False)
    with pytest.raises(ConfigError) as info:
        alerts.web.app  # what gunicorn alerts.web:app does
    assert info.value.variable == "ALERTS_SECRET_KEY"
    monkeypatch.setenv("ALERTS_SECRET_KEY", KEY)
    assert alerts.web.app.test_client().get("/healthz").get_json() == {"database": "ok"}
