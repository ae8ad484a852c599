"""The preferences page over HTTP (Flask's test client, PostgreSQL and SQLite): what a GET
shows and never changes, what a POST saves or refuses, the same-origin rules on it and on
resubscribe, the one-click unsubscribe that stays open to every site, and what reaches
the page's HTML and the logs."""
from __future__ import annotations

import logging
import re
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser

import pytest
import sqlalchemy as sa

from alerts.core import tables as m
from alerts.core import tokens
from alerts.subscribers import preferences as prefs
from alerts.web import create_app, redact_path, same_origin
from tests.support.factories import add_delivery, add_event, add_pref, add_user

UTC = timezone.utc
KEY = "k" * 16 + "0123456789abcdef"
PUBLIC_URL = "https://alerts.example.com"
ADDRESS = "jane.doe@example.com"
ONE_CLICK = {"List-Unsubscribe": "One-Click"}


@pytest.fixture
def web_settings(settings):
    return replace(settings, secret_key=KEY, public_url=PUBLIC_URL, telegram_bot_username="energy_alerts_bot")


@pytest.fixture
def client(web_settings, engine):
    return create_app(web_settings, engine=engine).test_client()


@pytest.fixture
def jane(engine):
    with engine.begin() as conn:
        uid = add_user(conn, email=ADDRESS)
        add_pref(conn, uid, alert_type="price_spike", delivery_kind="digest")
        add_pref(conn, uid, channel="email", min_severity=4)
        add_event(conn, alert_type="price_spike", region="NL", created_at=datetime.now(UTC))
    return uid


NOW = datetime.now(UTC)  # one instant for the whole module: a page's link is the same on every call


def link(user_id: int, when: datetime | None = None) -> str:
    return f"/preferences/{tokens.make_preferences_token(KEY, user_id, when or NOW)}"


def dump(engine) -> dict:
    with engine.connect() as conn:
        return {t.name: [dict(r._mapping) for r in conn.execute(sa.select(t).order_by(*t.primary_key.columns or t.c))]
                for t in m.metadata.sorted_tables}


class Form(HTMLParser):
    """The page as a browser sees it: its controls, their labels, and what it submits."""

    def __init__(self, html: str):
        super().__init__()
        self.controls: list[dict] = []
        self.labels: dict[str, str] = {}
        self.ids: set[str] = set()
        self.scripts = 0
        self.forms: list[dict] = []
        self._select: dict | None = None
        self._label: str | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "script":
            self.scripts += 1
        elif tag == "form":
            self.forms.append(attrs)
        elif tag in ("input", "select", "textarea", "button"):
            control = {"tag": tag, **attrs, "options": []}
            self.controls.append(control)
            if tag == "select":
                self._select = control
        elif tag == "option" and self._select is not None:
            self._select["options"].append(attrs)
        elif tag == "label":
            self._label = attrs.get("for")
            self.labels.setdefault(self._label, "")

    def handle_endtag(self, tag):
        if tag == "select":
            self._select = None
        elif tag == "label":
            self._label = None

    def handle_data(self, data):
        if self._label is not None:
            self.labels[self._label] += data

    def values(self) -> dict[str, str]:
        """What submitting the form untouched sends."""
        out = {}
        for c in self.controls:
            if c["tag"] == "input" and c.get("type") == "checkbox":
                if "checked" in c:
                    out[c["name"]] = c.get("value", "on")
            elif c["tag"] == "input":
                out[c["name"]] = c.get("value", "")
            elif c["tag"] == "select":
                chosen = [o for o in c["options"] if "selected" in o] or c["options"][:1]
                out[c["name"]] = chosen[0]["value"] if chosen else ""
        return out

    def control(self, name: str) -> dict:
        return next(c for c in self.controls if c.get("name") == name)


def page(client, user_id) -> tuple[str, Form]:
    response = client.get(link(user_id))
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    return html, Form(html)


def sub_ids(engine, user_id) -> dict[str, int]:
    p = m.user_alert_prefs
    with engine.connect() as conn:
        return {r.alert_type: r.id for r in conn.execute(sa.select(p.c.id, p.c.alert_type).where(p.c.user_id == user_id))}


# --- GET ----------------------------------------------------------------------------------

def test_the_page_shows_every_setting_with_a_label_on_every_control_and_changes_nothing(client, engine, jane):
    before = dump(engine)
    html, form = page(client, jane)
    assert dump(engine) == before
    visible = [c for c in form.controls if c.get("type") not in ("hidden", "submit") and c["tag"] != "button"]
    assert {c["name"] for c in visible} >= {
        "channel-email", "new-type", "new-region", "new-channel", "new-severity", "new-kind", "send-time", "timezone",
        "quiet-start", "quiet-end", *(f"sub-{i}-{f}" for i in sub_ids(engine, jane).values()
                                     for f in ("severity", "kind", "enabled", "remove"))}
    for control in visible:
        assert form.labels.get(control["id"], "").strip(), f"{control['name']} has no label"
    assert form.scripts == 0 and form.forms == [{"method": "post"}]
    assert "j***@example.com" in html and ADDRESS not in html
    assert [o["value"] for o in form.control(f"sub-{sub_ids(engine, jane)['*']}-severity")["options"]] == \
        ["1", "2", "3", "4", "5"]
    assert "4 — high" in html, "severity shown by its label"
    assert [o["value"] for o in form.control("new-type")["options"]] == ["", "*", "price_spike"]
    assert "Europe/Amsterdam" in [o["value"] for o in form.control("timezone")["options"]]
    assert re.search(r'href="https://t\.me/energy_alerts_bot\?start=[A-Za-z0-9_-]{1,64}"', html)


def test_the_page_sends_the_security_headers_of_the_unsubscribe_page(client, jane):
    response = client.get(link(jane))
    unsubscribe = client.get(f"/unsubscribe/{tokens.make_token(KEY, jane, 'email')}")
    for header in ("Content-Security-Policy", "Referrer-Policy", "X-Content-Type-Options", "Cache-Control"):
        assert response.headers[header] == unsubscribe.headers[header]
    assert "script-src" not in response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


def test_the_link_itself_is_nowhere_in_the_page(client, jane):
    path = link(jane)
    html = client.get(path).get_data(as_text=True)
    assert path.rsplit("/", 1)[1] not in html


@pytest.mark.parametrize("bad", [
    lambda uid: link(uid)[:-1],
    lambda uid: link(uid)[:-3] + "abc",
    lambda uid: f"/preferences/{tokens.make_preferences_token('another key of more than 32 characters', uid, datetime.now(UTC))}",
    lambda uid: f"/preferences/{tokens.make_token(KEY, uid, 'email')}",
    lambda uid: "/preferences/nonsense",
])
@pytest.mark.parametrize("method", ["get", "post"])
def test_a_bad_token_gets_400_and_changes_nothing(client, engine, jane, bad, method):
    before = dump(engine)
    path = bad(jane)
    response = getattr(client, method)(path, data={prefs.TIMEZONE: "UTC"})
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    assert "not valid" in html and path.rsplit("/", 1)[1] not in html
    assert dump(engine) == before


def test_an_expired_link_says_where_to_find_a_fresh_one(client, engine, jane):
    response = client.get(link(jane, datetime.now(UTC) - timedelta(days=366)))
    assert response.status_code == 400 and "has expired" in response.get_data(as_text=True)


def test_a_link_of_a_deleted_user_gets_400(client, engine, jane):
    path = link(jane)
    with engine.begin() as conn:
        conn.execute(sa.delete(m.users).where(m.users.c.id == jane))
    assert client.get(path).status_code == 400


# --- POST ---------------------------------------------------------------------------------

def test_a_post_saves_and_shows_the_page_again_with_a_status(client, engine, jane):
    _, form = page(client, jane)
    spike = sub_ids(engine, jane)["price_spike"]
    values = {**form.values(), f"sub-{spike}-kind": "instant", "quiet-start": "22:00", "quiet-end": "07:00",
              "timezone": "Europe/Lisbon"}
    response = client.post(link(jane), data=values)
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert "Your changes are saved" in html and 'role="status"' in html
    with engine.connect() as conn:
        user = conn.execute(sa.select(m.users).where(m.users.c.id == jane)).one()
        kind = conn.execute(sa.select(m.user_alert_prefs.c.delivery_kind)
                            .where(m.user_alert_prefs.c.id == spike)).scalar_one()
    assert (user.quiet_hours, user.timezone, kind) == ("22:00-07:00", "Europe/Lisbon", "instant")
    shown = Form(html)
    assert shown.control("quiet-start")["value"] == "22:00"
    assert [o["value"] for o in shown.control(f"sub-{spike}-kind")["options"] if "selected" in o] == ["instant"]


def test_invalid_input_is_shown_next_to_its_field_tied_to_it_and_nothing_is_saved(client, engine, jane):
    _, form = page(client, jane)
    spike = sub_ids(engine, jane)["price_spike"]
    values = {**form.values(), f"sub-{spike}-kind": "instant", "timezone": "Atlantis/Capital", "send-time": "25:99",
              "quiet-start": "22:00", "quiet-end": ""}
    before = dump(engine)
    response = client.post(link(jane), data=values)
    assert response.status_code == 400
    assert dump(engine) == before
    html = response.get_data(as_text=True)
    shown = Form(html)
    for name in ("timezone", "send-time", "quiet-end"):
        control = shown.control(name)
        assert control["aria-invalid"] == "true"
        assert f"{name}-error" in control["aria-describedby"].split()
        assert f"{name}-error" in shown.ids
        error = re.search(rf'<p class="error" id="{name}-error">([^<]+)</p>', html).group(1)
        assert error in html[html.index(f'<label for="{name}"'):html.index(f'id="{name}"', html.index(f'<label for="{name}"'))]
    assert "aria-invalid" not in shown.control("quiet-start"), "only the fields in error are marked"
    assert "Nothing was saved" in html and 'role="alert"' in html
    assert [o["value"] for o in shown.control(f"sub-{spike}-kind")["options"] if "selected" in o] == ["instant"], \
        "what was submitted is shown again, to be corrected"
    assert shown.control("send-time")["value"] == "25:99"


def test_a_duplicate_subscription_is_an_error_on_the_new_one(client, engine, jane):
    _, form = page(client, jane)
    values = {**form.values(), "new-type": "price_spike", "new-region": "*", "new-channel": "email"}
    before = dump(engine)
    response = client.post(link(jane), data=values)
    assert response.status_code == 400 and dump(engine) == before
    assert "already have a subscription" in response.get_data(as_text=True)


def test_a_form_with_hundreds_of_subscriptions_is_accepted(client, engine, jane):
    with engine.begin() as conn:
        for n in range(150):
            add_pref(conn, jane, alert_type=f"type_{n:03d}")
    _, form = page(client, jane)
    values = form.values()
    assert len("&".join(f"{k}={v}" for k, v in values.items())) > 4096
    assert client.post(link(jane), data=values).status_code == 200


# --- same-origin writes ----------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
    {"Sec-Fetch-Site": "cross-site", "Origin": PUBLIC_URL},  # Sec-Fetch-Site decides when present
    {"Origin": "https://evil.example"},
    {"Origin": "https://alerts.example.com.evil.example"},
    {"Origin": "http://alerts.example.com"},  # another scheme: another origin
])
def test_a_post_from_another_site_is_refused_with_403_and_changes_nothing(client, engine, jane, headers):
    _, form = page(client, jane)
    before = dump(engine)
    response = client.post(link(jane), data={**form.values(), "timezone": "UTC"}, headers=headers)
    assert response.status_code == 403
    assert "Nothing was changed" in response.get_data(as_text=True)
    assert dump(engine) == before


@pytest.mark.parametrize("headers", [
    {"Sec-Fetch-Site": "same-origin"},
    {"Sec-Fetch-Site": "none"},
    {"Sec-Fetch-Site": "same-origin", "Origin": "null"},
    {"Origin": "null"},  # Chromium from a no-referrer page, without Sec-Fetch-Site (a proxy dropped it)
    {"Origin": PUBLIC_URL},
    {"Origin": "HTTPS://Alerts.Example.com"},
    {},
])
def test_a_post_from_our_own_page_is_taken(client, engine, jane, headers):
    _, form = page(client, jane)
    response = client.post(link(jane), data={**form.values(), "timezone": "UTC"}, headers=headers)
    assert response.status_code == 200
    with engine.connect() as conn:
        assert conn.execute(sa.select(m.users.c.timezone).where(m.users.c.id == jane)).scalar_one() == "UTC"


def test_the_origin_of_a_public_url_with_a_port_and_a_path(settings, engine, jane):
    client = create_app(replace(settings, secret_key=KEY, public_url="https://example.com:8443/alerts"),
                        engine=engine).test_client()
    _, form = page(client, jane)
    assert client.post(link(jane), data=form.values(), headers={"Origin": "https://example.com:8443"}).status_code == 200
    assert client.post(link(jane), data=form.values(), headers={"Origin": "https://example.com"}).status_code == 403


@pytest.mark.parametrize("forge", [
    lambda values, uid: {k: v for k, v in values.items() if k != same_origin.FIELD},
    lambda values, uid: {**values, same_origin.FIELD: "forged"},
    lambda values, uid: {**values, same_origin.FIELD: values[same_origin.FIELD][:-2] + "xx"},
    lambda values, uid: {**values, same_origin.FIELD: same_origin.make_form_token(
        KEY, tokens.make_preferences_token(KEY, uid + 1, datetime.now(UTC)), datetime.now(UTC))},  # another page's
    lambda values, uid: {**values, same_origin.FIELD: same_origin.make_form_token(
        "another key of more than 32 characters", link(uid).rsplit("/", 1)[1], datetime.now(UTC))},
])
def test_a_post_without_a_genuine_anti_forgery_field_is_refused(client, engine, jane, forge):
    _, form = page(client, jane)
    before = dump(engine)
    response = client.post(link(jane), data=forge({**form.values(), "timezone": "UTC"}, jane),
                           headers={"Sec-Fetch-Site": "same-origin"})
    assert response.status_code == 403 and dump(engine) == before


def test_a_form_left_open_for_more_than_a_day_is_refused_with_a_reason(client, engine, jane):
    path = link(jane)
    stale = same_origin.make_form_token(KEY, path.rsplit("/", 1)[1], datetime.now(UTC) - timedelta(hours=25))
    _, form = page(client, jane)
    response = client.post(path, data={**form.values(), same_origin.FIELD: stale})
    assert response.status_code == 403 and "open too long" in response.get_data(as_text=True)


def test_resubscribe_from_another_site_is_refused_but_the_one_click_unsubscribe_is_not(client, engine, jane):
    unsubscribe = f"/unsubscribe/{tokens.make_token(KEY, jane, 'email')}"
    cross = {"Sec-Fetch-Site": "cross-site", "Origin": "https://mail.example"}
    assert client.post(unsubscribe, data=ONE_CLICK, headers=cross).status_code == 200
    html = client.post(unsubscribe, data=ONE_CLICK).get_data(as_text=True)
    anti_forgery = re.search(r'name="form_token" value="([^"]+)"', html).group(1)
    before = dump(engine)
    for headers, data in ((cross, {"action": "resubscribe", "form_token": anti_forgery}),
                          ({}, {"action": "resubscribe"}),
                          ({}, {"action": "resubscribe", "form_token": "forged"})):
        assert client.post(unsubscribe, data=data, headers=headers).status_code == 403
    assert dump(engine) == before
    response = client.post(unsubscribe, data={"action": "resubscribe", "form_token": anti_forgery},
                           headers={"Sec-Fetch-Site": "same-origin", "Origin": "null"})
    assert response.status_code == 200


def test_resubscribe_restores_only_what_the_unsubscribe_turned_off(client, engine, jane):
    spike = sub_ids(engine, jane)["price_spike"]
    with engine.begin() as conn:
        conn.execute(sa.update(m.user_alert_prefs).where(m.user_alert_prefs.c.id == spike).values(enabled=False))
    unsubscribe = f"/unsubscribe/{tokens.make_token(KEY, jane, 'email')}"
    html = client.post(unsubscribe, data=ONE_CLICK).get_data(as_text=True)
    anti_forgery = re.search(r'name="form_token" value="([^"]+)"', html).group(1)
    assert client.post(unsubscribe, data={"action": "resubscribe", "form_token": anti_forgery}).status_code == 200
    p = m.user_alert_prefs
    with engine.connect() as conn:
        enabled = dict(conn.execute(sa.select(p.c.alert_type, p.c.enabled).where(p.c.user_id == jane)).all())
    assert enabled == {"price_spike": False, "*": True}


def test_switching_a_channel_off_on_the_page_skips_what_is_queued(client, engine, jane):
    with engine.begin() as conn:
        queued = add_delivery(conn, jane, add_event(conn, status="fanned_out"))
    _, form = page(client, jane)
    values = {k: v for k, v in form.values().items() if k != "channel-email"}
    assert client.post(link(jane), data=values).status_code == 200
    d = m.user_alert_deliveries
    with engine.connect() as conn:
        assert tuple(conn.execute(sa.select(d.c.status, d.c.last_error).where(d.c.id == queued)).one()) == (
            "skipped", "unsubscribed")
    _, again = page(client, jane)
    assert "checked" not in again.control("channel-email")


# --- logs -------------------------------------------------------------------------------------

def test_the_token_is_cut_out_of_logged_paths():
    assert redact_path("/preferences/abc.def-ghi?x=1") == "/preferences/***?x=1"
    assert redact_path("POST /preferences/abc.def HTTP/1.1") == "POST /preferences/*** HTTP/1.1"


def test_nothing_logged_holds_the_token_or_the_address(web_settings, engine, jane, caplog):
    app = create_app(web_settings, engine=engine)
    client = app.test_client()
    path = link(jane)
    with caplog.at_level(logging.DEBUG):
        _, form = page(client, jane)
        client.post(path, data={**form.values(), "timezone": "UTC"})
        broken = create_app(replace(web_settings, database_url="postgresql://nobody@127.0.0.1:1/none"))
        assert broken.test_client().get(path).status_code == 503
    logged = caplog.text
    assert "saved their preferences" in logged and "database unreachable on /preferences/***" in logged
    assert path.rsplit("/", 1)[1] not in logged and ADDRESS not in logged
