"""Telegram channel against a local server that answers like the Bot API."""
from __future__ import annotations

import logging
import socket
import time
import traceback
from dataclasses import replace

import pytest

from alerts.channels import DeliveryError
from alerts.channels.telegram import TelegramChannel, classify
from alerts.messages import TextMessage
from tests.support.fakes.provider_api import BLOCKED, CHAT_NOT_FOUND, EntityError, parse_html, utf16_length

TEXT = TextMessage('<b>Pipeline outage</b> — severity <i>high</i>\nFlow &lt; 50% <a href="https://e.com/1">#7</a>')


@pytest.fixture
def channel(channel_settings):
    telegram = TelegramChannel(channel_settings)
    yield telegram
    telegram.close()


def failure(channel, chat_id="100", message=TEXT) -> DeliveryError:
    with pytest.raises(DeliveryError) as err:
        channel.send(chat_id, message)
    return err.value


def everything_said(error: DeliveryError) -> str:
    """The reason, repr and the full printed traceback, as a log would show them."""
    return error.reason + repr(error) + "".join(traceback.format_exception(error))


def test_it_sends_html_with_link_previews_disabled(channel, provider_api):
    channel.send("100", TEXT)

    (sent,) = provider_api.telegram_messages
    assert (sent.chat_id, sent.text, sent.parse_mode) == ("100", TEXT.text, "HTML")
    assert sent.link_preview_options == {"is_disabled": True}
    assert sent.disable_web_page_preview is True


def test_it_fails_permanently_when_the_bot_was_blocked(channel, provider_api):
    provider_api.telegram_error(*BLOCKED, chat_id="100")

    error = failure(channel, "100")
    channel.send("200", TEXT)  # other chats are unaffected

    assert error.permanent
    assert error.reason == "telegram 403: Forbidden: bot was blocked by the user"


def test_it_fails_permanently_when_the_chat_does_not_exist(channel, provider_api):
    provider_api.telegram_error(*CHAT_NOT_FOUND)

    error = failure(channel)

    assert error.permanent
    assert error.reason == "telegram 400: Bad Request: chat not found"


def test_it_fails_permanently_on_text_telegram_cannot_parse(channel, provider_api):
    error = failure(channel, message=TextMessage("Flow < 50% & falling"))

    assert error.permanent
    assert error.reason.startswith("telegram 400: Bad Request: can't parse entities: ")
    assert provider_api.telegram_messages == []


def test_it_fails_permanently_on_a_message_over_4096_utf16_units(channel, provider_api):
    error = failure(channel, message=TextMessage("⚡" * 4096 + "🔥"))  # 4096 + 2 units

    assert error.permanent
    assert error.reason == "telegram 400: Bad Request: message is too long"


def test_it_waits_as_long_as_a_429_asks(channel, provider_api):
    provider_api.telegram_error(429, "Too Many Requests: retry after 7", retry_after=7, times=1)

    error = failure(channel)
    channel.send("100", TEXT)

    assert not error.permanent
    assert error.retry_after == 7
    assert error.reason == "telegram 429: Too Many Requests: retry after 7"


@pytest.mark.parametrize("script", [
    lambda api: api.telegram_error(500, "Internal Server Error"),
    lambda api: api.telegram_raw(502, "<html><body>502 Bad Gateway</body></html>"),
], ids=["json-500", "html-502"])
def test_it_retries_server_errors(channel, provider_api, script):
    script(provider_api)
    error = failure(channel)
    assert not error.permanent
    assert error.reason.startswith(("telegram 500", "telegram 502"))


def test_a_wrong_token_is_a_transient_failure_that_never_names_it(channel_settings, provider_api):
    """A bad bot token is ours to fix, not the recipients' fault: rows wait and retry."""
    channel = TelegramChannel(replace(channel_settings, telegram_bot_token="999:WRONG-SECRET"))
    error = failure(channel)
    assert not error.permanent and not error.gone
    assert error.reason == "credentials refused: telegram 401: Unauthorized"
    assert "WRONG-SECRET" not in everything_said(error)


def test_it_retries_a_timeout_without_naming_the_token(channel_settings, provider_api):
    provider_api.delay(2.0, service="telegram", times=1)
    channel = TelegramChannel(replace(channel_settings, http_timeout_seconds=0.3))

    error = failure(channel)

    assert not error.permanent
    assert error.reason == "telegram: no answer within 0.3s (timeout)"
    assert provider_api.bot_token not in everything_said(error)


def test_it_retries_a_refused_connection_without_naming_the_token(channel_settings):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    channel = TelegramChannel(replace(channel_settings, telegram_api_base=f"http://127.0.0.1:{port}"))

    error = failure(channel)

    assert not error.permanent
    assert error.reason == "telegram: connection refused"
    assert channel_settings.telegram_bot_token not in everything_said(error)


def test_it_keeps_the_token_out_of_debug_logs(channel, provider_api, caplog):
    with caplog.at_level(logging.DEBUG, logger="urllib3"):
        channel.send("100", TEXT)
    assert "sendMessage" in caplog.text
    assert provider_api.bot_token not in caplog.text


# --- classification table ---------------------------------------------------------------

def api_error(code, description, **parameters):
    body = {"ok": False, "error_code": code, "description": description}
    if parameters:
        body["parameters"] = parameters
    return body


CLASSIFY_TABLE = [
    # status, body, Retry-After header  ⇒  permanent, retry_after, reason   (None ⇒ success)
    (200, {"ok": True, "result": {"message_id": 1}}, None, None),
    (403, api_error(403, "Forbidden: bot was blocked by the user"), None,
     (True, None, "telegram 403: Forbidden: bot was blocked by the user")),
    (403, api_error(403, "Forbidden: user is deactivated"), None,
     (True, None, "telegram 403: Forbidden: user is deactivated")),
    (400, api_error(400, "Bad Request: chat not found"), None,
     (True, None, "telegram 400: Bad Request: chat not found")),
    (400, api_error(400, "Bad Request: can't parse entities: Unsupported start tag \"br\" at byte offset 3"), None,
     (True, None, "telegram 400: Bad Request: can't parse entities: Unsupported start tag \"br\" at byte offset 3")),
    (400, api_error(400, "Bad Request: group chat was upgraded to a supergroup chat", migrate_to_chat_id=-1001), None,
     (True, None, "telegram 400: Bad Request: group chat was upgraded to a supergroup chat (group moved to chat -1001)")),
    (429, api_error(429, "Too Many Requests: retry after 35", retry_after=35), None,
     (False, 35.0, "telegram 429: Too Many Requests: retry after 35")),
    (429, api_error(429, "Too Many Requests"), "12", (False, 12.0, "telegram 429: Too Many Requests")),
    (500, api_error(500, "Internal Server Error"), None, (False, None, "telegram 500: Internal Server Error")),
    (502, None, None, (False, None, "telegram 502: unexpected answer (HTTP 502, no JSON)")),
    (404, None, None, (True, None, "telegram 404: unexpected answer (HTTP 404, no JSON)")),
    (200, None, None, (False, None, "telegram 200: unexpected answer (HTTP 200, no JSON)")),
    (401, api_error(401, "Unauthorized"), None, (False, None, "credentials refused: telegram 401: Unauthorized")),
    (403, api_error(403, "Forbidden: bot can't initiate conversation with a user"), None,
     (True, None, "telegram 403: Forbidden: bot can't initiate conversation with a user")),
]


@pytest.mark.parametrize("status, body, header, expected", CLASSIFY_TABLE)
def test_it_classifies_bot_api_answers(status, body, header, expected):
    error = classify(status, body, header)
    assert (None if error is None else (error.permanent, error.retry_after, error.reason)) == expected


@pytest.mark.parametrize("status, description", [
    (403, "Forbidden: bot was blocked by the user"),
    (403, "Forbidden: user is deactivated"),
    (403, "Forbidden: bot was kicked from the group chat"),
    (403, "Forbidden: bot was kicked from the supergroup chat"),
    (403, "Forbidden: the group chat was deleted"),
    (400, "Bad Request: chat not found"),
])
def test_it_says_the_destination_is_gone_only_for_the_allow_listed_errors(status, description):
    error = classify(status, api_error(status, description))
    assert error.permanent and error.gone and error.migrate_to is None


@pytest.mark.parametrize("status, description", [
    (400, "Bad Request: can't parse entities: Unsupported start tag \"br\" at byte offset 3"),
    (400, "Bad Request: message is too long"),
    (403, "Forbidden: bot can't initiate conversation with a user"),
    (404, "Not Found"),
])
def test_other_client_errors_fail_the_message_but_leave_the_destination_alone(status, description):
    error = classify(status, api_error(status, description))
    assert error.permanent and not error.gone


def test_a_group_that_became_a_supergroup_names_its_new_chat():
    error = classify(400, api_error(400, "Bad Request: group chat was upgraded to a supergroup chat",
                                    migrate_to_chat_id=-1001234567890))
    assert error.migrate_to == "-1001234567890" and not error.gone


# --- the fake parses HTML as Telegram does ---------------------------------------------

@pytest.mark.parametrize("html, plain", [
    ("plain text", "plain text"),
    ("<b>bold</b> <strong>s</strong> <i>i</i> <em>e</em> <u>u</u> <ins>n</ins> <s>s</s> <strike>k</strike> <del>d</del>",
     "bold s i e u n s k d"),
    ('<a href="https://e.com/?a=1&amp;b=2">link</a>', "link"),
    ('<span class="tg-spoiler">x</span><tg-spoiler>y</tg-spoiler>', "xy"),
    ('<pre><code class="language-python">a &lt; b</code></pre>', "a < b"),
    ("<blockquote>q</blockquote><blockquote expandable>r</blockquote>", "qr"),
    ('<tg-emoji emoji-id="5368324170671202286">👍</tg-emoji>', "👍"),
    ("&lt;&gt;&amp;&quot;&#65;&#x42;", '<>&"AB'),
    ("a > b", "a > b"),
])
def test_the_fake_accepts_what_telegram_accepts(html, plain):
    assert parse_html(html) == plain


@pytest.mark.parametrize("html, error", [
    ("a < b", 'Unsupported start tag "" at byte offset 2'),
    ("<br>", 'Unsupported start tag "br"'),
    ("<p>x</p>", 'Unsupported start tag "p"'),
    ("Tom & Jerry", "Unsupported HTML entity"),
    ("&nbsp;", "Unsupported HTML entity"),
    ("<b>x", 'Can\'t find end tag corresponding to start tag "b"'),
    ("<b><i>x</b></i>", 'Unmatched end tag at byte offset 7, expected "</i>", found "</b>"'),
    ("x</b>", "Unexpected end tag"),
    ('<span class="other">x</span>', 'Tag "span" must have class "tg-spoiler"'),
])
def test_the_fake_refuses_what_telegram_refuses(html, error):
    with pytest.raises(EntityError, match=error.replace("(", r"\(")):
        parse_html(html)


def test_the_fake_counts_length_in_utf16_units():
    assert utf16_length("a⚡🔥") == 1 + 1 + 2


def wait_for(predicate, seconds=3.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_the_fake_still_accepts_a_message_whose_sender_gave_up_waiting(channel_settings, provider_api):
    provider_api.delay(0.6, service="telegram", times=1)
    error = failure(TelegramChannel(replace(channel_settings, http_timeout_seconds=0.2)))

    assert not error.permanent
    assert wait_for(lambda: len(provider_api.telegram_messages) == 1)  # as a real provider may


def test_the_fake_forgets_slow_requests_on_reset(channel_settings, provider_api):
    provider_api.delay(30, service="telegram", times=1)
    failure(TelegramChannel(replace(channel_settings, http_timeout_seconds=0.2)))

    provider_api.reset()

    time.sleep(0.1)
    assert provider_api.telegram_messages == [] and provider_api.requests == []
