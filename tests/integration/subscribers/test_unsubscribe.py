"""One-click unsubscribe, the parts outside the web app (docs/web-and-security.md): tokens, the headers
and links every email carries, the settings, and the sender skipping rows of a user who
has unsubscribed."""
from __future__ import annotations

import email
import hashlib
import re
from dataclasses import replace
from datetime import timedelta
from email import policy
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from alerts.core import tables as m
from alerts.core import tokens
from alerts.subscribers import unsubscribe as unsub
from alerts.cli import cli
from alerts.core.settings import ConfigError, Settings
from alerts.phases.pipeline import run_phases, session
from tests.support.clock import clock_at
from tests.support.factories import WINDOW_END, add_delivery, add_digest, add_event, add_pref, add_user
from tests.support.fakes.fixtures import with_fakes

KEY = "k" * 16 + "0123456789abcdef"  # 32 characters
OTHER_KEY = "x" * 40
PUBLIC_URL = "https://alerts.example.com"
AFTER_WINDOW = WINDOW_END + timedelta(minutes=1)


def public(settings: Settings) -> Settings:
    return replace(settings, public_url=PUBLIC_URL, secret_key=KEY)


# --- tokens ---------------------------------------------------------------------------------

def test_a_token_names_one_user_and_one_channel_and_reads_back():
    token = tokens.make_token(KEY, 42, "email")
    assert tokens.read_token(KEY, token) == (42, "email")
    assert tokens.read_token(KEY, tokens.make_token(KEY, 42, "telegram")) == (42, "telegram")
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", token), "URL-safe: no escaping needed in a path"


def test_a_token_holds_no_address():
    token = tokens.make_token(KEY, 7, "email")
    assert "@" not in token and "example" not in token


@pytest.mark.parametrize("position", [0, 5, -1, -5])
def test_a_token_with_one_character_flipped_is_refused(position):
    token = tokens.make_token(KEY, 42, "email")
    chars = list(token)
    chars[position] = "A" if chars[position] != "A" else "B"
    with pytest.raises(tokens.BadToken):
        tokens.read_token(KEY, "".join(chars))


def test_a_token_signed_with_another_key_is_refused():
    with pytest.raises(tokens.BadToken):
        tokens.read_token(KEY, tokens.make_token(OTHER_KEY, 42, "email"))


def test_a_payload_signed_with_the_key_for_another_purpose_is_refused():
    import itsdangerous

    other_purpose = itsdangerous.URLSafeSerializer(KEY, salt="something-else",
                                                   signer_kwargs={"digest_method": hashlib.sha256}).dumps([42, "email"])
    with pytest.raises(tokens.BadToken):
        tokens.read_token(KEY, other_purpose)


@pytest.mark.parametrize("payload", [[42], ["42", "email"], [42, "pigeon"], {"user": 42}, [True, "email"]])
def test_a_signed_payload_that_is_not_a_user_and_a_channel_is_refused(payload):
    import itsdangerous

    token = itsdangerous.URLSafeSerializer(KEY, salt=tokens.SALT,
                                           signer_kwargs={"digest_method": hashlib.sha256}).dumps(payload)
    with pytest.raises(tokens.BadToken):
        tokens.read_token(KEY, token)


@pytest.mark.parametrize("garbage", ["", ".", "abc", "a" * 500, "W10.", "%00", "../../etc/passwd"])
def test_garbage_is_refused(garbage):
    with pytest.raises(tokens.BadToken):
        tokens.read_token(KEY, garbage)


@pytest.mark.parametrize("channel,address,shown", [
    ("email", "jane.doe@example.com", "j***@example.com"),
    ("email", "x@example.com", "x***@example.com"),
    ("telegram", "123456789", "***89"),
    ("sms", "+31612345678", "***78"),
    ("telegram", "1234", "***"),
    ("email", None, None),
])
def test_an_address_is_masked(channel, address, shown):
    assert unsub.mask_address(channel, address) == shown


# --- settings -------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["alerts.example.com", "ftp://alerts.example.com", "javascript:alert(1)", "https://",
                                   "https://alerts.example.com/?a=1", "https://alerts.example.com/#top"])
def test_a_public_url_that_is_not_absolute_http_is_refused_by_name(value):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"ALERTS_PUBLIC_URL": value, "ALERTS_SECRET_KEY": KEY})
    assert info.value.variable == "ALERTS_PUBLIC_URL"


@pytest.mark.parametrize("key", [None, "short", "x" * 31])
def test_a_public_url_without_a_32_character_key_is_refused_naming_the_key(key):
    env = {"ALERTS_PUBLIC_URL": PUBLIC_URL, **({"ALERTS_SECRET_KEY": key} if key else {})}
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert info.value.variable == "ALERTS_SECRET_KEY"


@pytest.mark.parametrize("env,named", [
    ({"ALERTS_PUBLIC_URL": "ftp://x"}, "ALERTS_PUBLIC_URL"),
    ({"ALERTS_PUBLIC_URL": PUBLIC_URL, "ALERTS_SECRET_KEY": "short"}, "ALERTS_SECRET_KEY"),
])
def test_the_command_line_exits_2_naming_the_variable(sqlite_url, env, named):
    result = CliRunner().invoke(cli, ["status"], env={"DATABASE_URL": sqlite_url, **env})
    assert result.exit_code == 2
    assert named in result.output


def test_a_trailing_slash_on_the_public_url_makes_no_double_slash():
    settings = Settings.from_env({"ALERTS_PUBLIC_URL": PUBLIC_URL + "/", "ALERTS_SECRET_KEY": KEY})
    assert tokens.unsubscribe_url(settings, 1, "email").startswith(PUBLIC_URL + "/unsubscribe/")


# --- headers and links, through a real send -------------------------------------------------

def _send(engine, settings, now=AFTER_WINDOW):
    with session(engine, settings) as (db, channels):
        return run_phases(db, ("c",), clock_at(now), settings, channels)["c"]


def _link(text: str) -> str:
    return re.search(r"Unsubscribe: (\S+)", text).group(1)


def _check_unsubscribe_parts(raw: bytes, stream: str, user_id: int) -> None:
    mail = email.message_from_bytes(raw, policy=policy.default)
    url = mail["List-Unsubscribe"].strip("<>")
    # As it is on one line, never folded into RFC 2047 encoded words a provider cannot read.
    assert f"\r\nList-Unsubscribe: <{url}>\r\n".encode() in raw
    assert b"\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in raw
    assert mail["List-Unsubscribe"] == f"<{url}>"
    assert url.startswith(f"{PUBLIC_URL}/unsubscribe/")
    assert tokens.read_token(KEY, url.rsplit("/", 1)[1]) == (user_id, "email")
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert mail["List-Id"].endswith(f"<{stream}.alerts.alerts.example.com>")
    text = mail.get_body(("plain",)).get_content()
    html = mail.get_body(("html",)).get_content()
    assert _link(text) == url
    assert f'<a href="{url}"' in html and ">Unsubscribe</a>" in html


def test_every_email_carries_one_click_unsubscribe_headers_and_links(engine, live_settings, smtp_server):
    settings = public(live_settings)
    with engine.begin() as conn:
        instant_user = add_user(conn, email="ann@example.com")
        digest_user = add_user(conn, email="bob@example.com")
        add_delivery(conn, instant_user, add_event(conn, status="fanned_out"))
        add_digest(conn, digest_user)
    assert _send(engine, settings)["instant"]["sent"] == 1
    mails = {mail.rcpt_tos[0]: mail.data for mail in smtp_server.messages}
    _check_unsubscribe_parts(mails["ann@example.com"], "instant", instant_user)
    _check_unsubscribe_parts(mails["bob@example.com"], "digest", digest_user)
    list_ids = {email.message_from_bytes(raw, policy=policy.default)["List-Id"] for raw in mails.values()}
    assert len(list_ids) == 2, "one List-Id per stream"


def test_the_file_outbox_writes_the_same_headers(engine, settings, tmp_path):
    settings = public(replace(settings, email_backend="file", smtp_host="unused.invalid"))
    with engine.begin() as conn:
        user = add_user(conn, email="ann@example.com")
        add_digest(conn, user)
    assert _send(engine, settings)["digests"]["sent"] == 1
    (eml,) = Path(settings.outbox_dir).glob("*.eml")
    _check_unsubscribe_parts(eml.read_bytes(), "digest", user)


def test_without_a_public_url_emails_carry_no_unsubscribe(engine, live_settings, smtp_server):
    with engine.begin() as conn:
        user = add_user(conn)
        add_delivery(conn, user, add_event(conn, status="fanned_out"))
    _send(engine, live_settings)
    (mail,) = smtp_server.messages
    for header in ("List-Unsubscribe", "List-Unsubscribe-Post", "List-Id"):
        assert mail.message[header] is None
    assert "Unsubscribe" not in mail.message.get_body(("plain",)).get_content()


# --- the unsubscribe transaction and the sender ---------------------------------------------

def _status(engine, table, row_id):
    with engine.connect() as conn:
        row = conn.execute(sa.select(table.c.status, table.c.last_error).where(table.c.id == row_id)).one()
    return tuple(row)


def test_a_row_created_after_the_unsubscribe_is_skipped_by_the_sender(engine, live_settings, smtp_server):
    """A fan-out that read the preferences just before the unsubscribe committed may add
    a queued row after it: the sender itself skips it, without a send."""
    with engine.begin() as conn:
        user = add_user(conn)
        add_pref(conn, user, channel="email")
        add_pref(conn, user, channel="email", alert_type="price_spike")
        unsub.unsubscribe(conn, user, "email")
        late = add_delivery(conn, user, add_event(conn, status="fanned_out"))
        late_digest = add_digest(conn, user)
    counts = _send(engine, live_settings)
    assert counts["instant"]["skipped"] == 1 and counts["digests"]["skipped"] == 1
    assert _status(engine, m.user_alert_deliveries, late) == ("skipped", "unsubscribed")
    assert _status(engine, m.user_alert_digests, late_digest) == ("skipped", "unsubscribed")
    assert smtp_server.messages == []


def test_rows_of_a_user_with_one_preference_still_enabled_are_sent(engine, live_settings, smtp_server):
    with engine.begin() as conn:
        user = add_user(conn)
        add_pref(conn, user, channel="email", enabled=False)
        add_pref(conn, user, channel="email", alert_type="price_spike")
        delivery = add_delivery(conn, user, add_event(conn, status="fanned_out"))
    _send(engine, live_settings)
    assert _status(engine, m.user_alert_deliveries, delivery) == ("sent", None)
    assert len(smtp_server.messages) == 1


def test_unsubscribing_one_channel_leaves_the_others_alone(engine, live_settings, provider_api):
    with engine.begin() as conn:
        user = add_user(conn, telegram_chat_id="4242")
        add_pref(conn, user, channel="email")
        add_pref(conn, user, channel="telegram")
        delivery = add_delivery(conn, user, add_event(conn, status="fanned_out"), channel="telegram")
        unsub.unsubscribe(conn, user, "email")
    _send(engine, live_settings)
    assert _status(engine, m.user_alert_deliveries, delivery) == ("sent", None)
