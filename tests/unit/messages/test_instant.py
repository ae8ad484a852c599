"""Instant messages: one event as email, Telegram HTML or SMS (docs/policy.md)."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from alerts.core.settings import Settings
from alerts.messages import EmailMessage, TextMessage, render_instant, severity_label
from alerts.messages.render import safe_url
from tests.support.telegram_html import parse_telegram_html, telegram_units

HOSTILE_TITLE = '<script>alert(1)</script> Tom & "Jerry" </b>'
HOSTILE_SUMMARY = "Flows <down> 30% & 'falling' </i>"
SETTINGS = Settings.from_env({})
APP_SETTINGS = Settings.from_env({"ALERTS_APP_BASE_URL": "https://app.energyriskiq.com"})


def event(**cols) -> dict:
    return {"id": 7, "event_key": "evt-7", "alert_type": "pipeline_outage", "region": "NL", "severity": 4,
            "title": "Gas pipeline outage", "summary": "Flow reduced by 30%",
            "url": "https://energyriskiq.com/e/7?src=alert&lang=en",
            "created_at": datetime(2026, 5, 12, 9, 30, tzinfo=timezone.utc), **cols}


def render(channel, settings=SETTINGS, delivery_id=42, **cols):
    return render_instant(channel, event(**cols), delivery_id=delivery_id, settings=settings)


@pytest.mark.parametrize("n,label", [(1, "low"), (2, "moderate"), (3, "elevated"), (4, "high"), (5, "critical")])
def test_severity_labels_follow_the_spec(n, label):
    assert severity_label(n) == label


@pytest.mark.parametrize("url,safe", [
    ("https://energyriskiq.com/e/1", "https://energyriskiq.com/e/1"),
    ("HTTP://example.com/x", "HTTP://example.com/x"),
    ("javascript:alert(1)", None),
    ("ftp://example.com/file", None),
    ("data:text/html,<b>x</b>", None),
    ("https://", None),
    ("/relative/path", None),
    ("https://exa mple.com/", None),
    (None, None),
    (42, None),
])
def test_only_absolute_http_urls_become_links(url, safe):
    assert safe_url(url) == safe


# --- email --------------------------------------------------------------------------------

def test_email_subject_names_severity_and_title():
    message = render("email")
    assert isinstance(message, EmailMessage)
    assert message.subject == "[EnergyRiskIQ] HIGH: Gas pipeline outage"


def test_email_subject_cannot_carry_injected_header_lines():
    message = render("email", title="Outage\r\nBcc: victim@example.com\nX-Evil: 1")
    assert "\r" not in message.subject and "\n" not in message.subject
    assert message.subject == "[EnergyRiskIQ] HIGH: Outage Bcc: victim@example.com X-Evil: 1"


def test_email_subject_is_plain_text_not_html_escaped():
    assert render("email", title=HOSTILE_TITLE).subject == f"[EnergyRiskIQ] HIGH: {HOSTILE_TITLE}"


def test_email_html_escapes_hostile_event_text():
    html = render("email", title=HOSTILE_TITLE, summary=HOSTILE_SUMMARY).html
    assert "<script>" not in html and "</b>" not in html.replace("</body>", "")
    assert "&lt;script&gt;alert(1)&lt;/script&gt; Tom &amp; &#34;Jerry&#34; &lt;/b&gt;" in html
    assert "Flows &lt;down&gt; 30% &amp; &#39;falling&#39; &lt;/i&gt;" in html
    assert 'href="https://energyriskiq.com/e/7?src=alert&amp;lang=en"' in html


def test_email_text_shows_hostile_text_as_it_came():
    text = render("email", title=HOSTILE_TITLE, summary=HOSTILE_SUMMARY).text
    assert HOSTILE_TITLE in text and HOSTILE_SUMMARY in text and "&amp;" not in text


def test_email_shows_every_field_of_the_event():
    message = render("email")
    for body in (message.text, message.html):
        assert "HIGH" in body and "Gas pipeline outage" in body and "Flow reduced by 30%" in body
        assert "#7" in body and "NL" in body
    assert "https://energyriskiq.com/e/7?src=alert&lang=en" in message.text
    assert "2026-05-12 11:30 CEST" in message.text  # the app zone, Europe/Amsterdam


def test_email_message_id_is_derived_from_the_delivery_and_stable():
    assert render("email").message_id == "<alert-delivery-42@energyriskiq.com>"  # ALERTS_EMAIL_FROM's domain
    assert render("email").message_id == render("email", title="other").message_id
    assert render("email", delivery_id=43).message_id == "<alert-delivery-43@energyriskiq.com>"


def test_email_message_id_carries_the_installation_and_the_from_domain():
    settings = Settings.from_env({"ALERTS_EMAIL_FROM": "Alerts <alerts@Staging.Example.ORG>"})
    message = render_instant("email", event(), delivery_id=42, settings=settings, installation_id="3f9a0c1d2b4e")
    assert message.message_id == "<alert-delivery-42.3f9a0c1d2b4e@staging.example.org>"


def test_email_links_to_the_app_only_when_configured():
    assert "View in app" not in render("email").text and "View in app" not in render("email").html
    message = render("email", settings=APP_SETTINGS)
    assert "View in app: https://app.energyriskiq.com/alerts" in message.text
    assert '<a href="https://app.energyriskiq.com/alerts">View in app</a>' in message.html


def test_email_without_summary_or_url_renders_without_them():
    message = render("email", summary=None, url=None, region=None)
    assert "None" not in message.text and "None" not in message.html
    assert "<a " not in message.html


def test_email_never_links_a_non_http_url():
    message = render("email", url="javascript:alert(1)")
    assert "javascript" not in message.html and "javascript" not in message.text


# --- telegram -----------------------------------------------------------------------------

def test_telegram_escapes_hostile_text_and_telegram_accepts_it():
    message = render("telegram", settings=APP_SETTINGS, title=HOSTILE_TITLE, summary=HOSTILE_SUMMARY)
    assert isinstance(message, TextMessage)
    shown = parse_telegram_html(message.text)
    assert HOSTILE_TITLE in shown and HOSTILE_SUMMARY in shown
    assert "HIGH" in shown and "#7" in shown and "View in app" in shown
    assert 'href="https://energyriskiq.com/e/7?src=alert&amp;lang=en"' in message.text


def test_telegram_never_links_a_non_http_url():
    message = render("telegram", url='javascript:alert("x")')
    parse_telegram_html(message.text)
    assert "href" not in message.text and "javascript" not in message.text


def test_telegram_cuts_a_huge_summary_to_fit_4096_units():
    message = render("telegram", settings=APP_SETTINGS, title="🔥" * 100, summary="Gas & <oil> 😀 " * 2000)
    units = telegram_units(message.text)
    assert 4000 < units <= 4096
    shown = parse_telegram_html(message.text)
    assert "…" in shown and "#7" in shown and "View in app" in shown


def test_telegram_keeps_a_summary_that_fits_whole():
    summary = "x" * 3000
    assert summary in parse_telegram_html(render("telegram", summary=summary).text)


# --- sms ----------------------------------------------------------------------------------

def test_sms_is_short_plain_text_with_label_title_and_url():
    message = render("sms", title=HOSTILE_TITLE)
    assert isinstance(message, TextMessage)
    assert message.text == (f"EnergyRiskIQ HIGH: {HOSTILE_TITLE} #7 "
                            "https://energyriskiq.com/e/7?src=alert&lang=en")


@pytest.mark.parametrize("title,url,keeps_url", [
    ("T" * 1000, "https://energyriskiq.com/e/7", True),
    ("Outage " * 100, "https://energyriskiq.com/" + "p" * 290, False),  # the title matters more
    ("Line one\nline two", None, False),
])
def test_sms_never_exceeds_320_characters(title, url, keeps_url):
    text = render("sms", title=title, url=url).text
    assert len(text) <= 320 and "\n" not in text
    assert text.startswith("EnergyRiskIQ HIGH: ") and "#7" in text
    assert (url in text) if keeps_url else ("https://" not in text)


def test_an_unknown_channel_is_a_programming_error():
    with pytest.raises(ValueError):
        render("pigeon")
