"""Digest messages: many events of one window as one email or one Telegram message (docs/policy.md)."""
from __future__ import annotations

import random
import re
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from alerts.core.settings import Settings
from alerts.messages import EmailMessage, TextMessage, render_digest, window_label
from tests.support.telegram_html import parse_telegram_html, telegram_units

UTC = timezone.utc
AMS = ZoneInfo("Europe/Amsterdam")
SETTINGS = Settings.from_env({})
APP_SETTINGS = Settings.from_env({"ALERTS_APP_BASE_URL": "https://app.energyriskiq.com"})
HOSTILE_TITLE = '<script>alert(1)</script> Tom & "Jerry" </b>'
HOSTILE_SUMMARY = "Flows <down> 30% & 'falling' </i>"
DAY_START = datetime(2026, 5, 11, 22, tzinfo=UTC)  # Tuesday 12 May 2026 00:00 in Amsterdam


def digest(**cols) -> dict:
    return {"id": 1, "digest_key": "digest:u1:email:daily:2026-05-11T22:00:00+00:00", "user_id": 1,
            "channel": "email", "period": "daily", "window_start": DAY_START,
            "window_end": DAY_START + timedelta(hours=24), "timezone": "Europe/Amsterdam", **cols}


def events(n: int, **cols) -> list[dict]:
    """n events spread over the day, severities cycling 1..5, given in shuffled order."""
    out = [{"id": i, "event_key": f"evt-{i}", "alert_type": "price_spike", "region": "NL",
            "severity": 1 + i % 5, "title": f"Event {i}", "summary": f"Reason {i}",
            "url": f"https://energyriskiq.com/e/{i}", "created_at": DAY_START + timedelta(minutes=i), **cols}
           for i in range(1, n + 1)]
    random.Random(n).shuffle(out)
    return out


def ids_in(text: str) -> list[int]:
    return [int(i) for i in re.findall(r"#(\d+) ·", text)]


# --- order and fields ---------------------------------------------------------------------

def test_items_are_sorted_by_severity_then_newest_then_id():
    t = DAY_START + timedelta(hours=3)
    items = [
        {"id": 1, "severity": 3, "created_at": t},
        {"id": 2, "severity": 5, "created_at": t - timedelta(hours=1)},
        {"id": 3, "severity": 3, "created_at": t + timedelta(minutes=5)},
        {"id": 4, "severity": 3, "created_at": t + timedelta(minutes=5)},  # same time as 3: higher id first
        {"id": 5, "severity": 1, "created_at": t + timedelta(hours=5)},
    ]
    items = [{"event_key": f"e{e['id']}", "alert_type": "x", "region": None, "title": f"T{e['id']}",
              "summary": None, "url": None, **e} for e in items]
    for channel in ("email", "telegram"):
        for order in (items, items[::-1]):
            message = render_digest(channel, digest(), order, settings=SETTINGS)
            assert ids_in(message.text) == [2, 4, 3, 1, 5]


def test_every_item_shows_title_label_reason_id_and_url():
    items = events(2)
    email = render_digest("email", digest(), items, settings=SETTINGS)
    telegram = render_digest("telegram", digest(), items, settings=SETTINGS)
    for body in (email.text, email.html, parse_telegram_html(telegram.text)):
        assert "Event 2" in body and "ELEVATED" in body and "Reason 2" in body and "#2" in body
        assert "Event 1" in body and "MODERATE" in body and "Reason 1" in body and "#1" in body
    assert "https://energyriskiq.com/e/2" in email.text
    assert '<a href="https://energyriskiq.com/e/2">' in email.html
    assert '<a href="https://energyriskiq.com/e/2">' in telegram.text


def test_hostile_event_text_is_escaped_in_html_and_telegram_and_raw_in_plain_text():
    items = events(3, title=HOSTILE_TITLE, summary=HOSTILE_SUMMARY)
    email = render_digest("email", digest(), items, settings=SETTINGS)
    telegram = render_digest("telegram", digest(), items, settings=SETTINGS)
    assert email.text.count(HOSTILE_TITLE) == 3 and email.text.count(HOSTILE_SUMMARY) == 3
    assert "<script>" not in email.html and "<script>" not in telegram.text
    assert email.html.count("&lt;script&gt;alert(1)&lt;/script&gt; Tom &amp; &#34;Jerry&#34; &lt;/b&gt;") == 3
    shown = parse_telegram_html(telegram.text)
    assert shown.count(HOSTILE_TITLE) == 3 and shown.count(HOSTILE_SUMMARY) == 3


@pytest.mark.parametrize("url", ["javascript:alert(1)", "ftp://example.com/x", "not a url"])
def test_a_non_http_url_is_never_linked(url):
    items = events(1, url=url)
    email = render_digest("email", digest(), items, settings=SETTINGS)
    telegram = render_digest("telegram", digest(), items, settings=SETTINGS)
    assert url not in email.text and url not in email.html and url not in telegram.text
    assert "href" not in telegram.text
    parse_telegram_html(telegram.text)


# --- email --------------------------------------------------------------------------------

@pytest.mark.parametrize("cols,n,subject", [
    ({}, 3, "EnergyRiskIQ daily digest — 2026-05-12 (3 alerts)"),
    ({}, 1, "EnergyRiskIQ daily digest — 2026-05-12 (1 alert)"),
    ({"period": "hourly", "window_start": datetime(2026, 5, 12, 12, tzinfo=UTC),
      "window_end": datetime(2026, 5, 12, 13, tzinfo=UTC)}, 2,
     "EnergyRiskIQ hourly digest — 2026-05-12 14:00 (2 alerts)"),
    ({"timezone": "America/New_York", "window_start": datetime(2026, 5, 12, 4, tzinfo=UTC),
      "window_end": datetime(2026, 5, 13, 4, tzinfo=UTC)}, 2,
     "EnergyRiskIQ daily digest — 2026-05-12 (2 alerts)"),
    ({"window_start": datetime(2026, 3, 28, 23, tzinfo=UTC), "window_end": datetime(2026, 3, 29, 22, tzinfo=UTC)},
     5, "EnergyRiskIQ daily digest — 2026-03-29 (5 alerts)"),
])
def test_email_subject_names_period_local_date_and_count(cols, n, subject):
    message = render_digest("email", digest(**cols), events(n), settings=SETTINGS)
    assert isinstance(message, EmailMessage)
    assert message.subject == subject


def test_email_shows_at_most_50_items_then_how_many_more():
    message = render_digest("email", digest(), events(100), settings=SETTINGS)
    assert len(ids_in(message.text)) == 50 and len(ids_in(message.html)) == 50
    assert "…and 50 more" in message.text and "…and 50 more" in message.html
    assert "100 alerts" in message.subject


def test_email_with_50_items_or_fewer_has_no_more_line():
    message = render_digest("email", digest(), events(50), settings=SETTINGS)
    assert len(ids_in(message.text)) == 50 and "more" not in message.text


def test_email_body_names_the_window_in_local_time():
    message = render_digest("email", digest(), events(2), settings=SETTINGS)
    window = "Tuesday 12 May 2026, 00:00–24:00 Europe/Amsterdam"
    assert window in message.text and window in message.html


def test_email_message_id_is_stable_per_digest_key_and_carries_the_key():
    first = render_digest("email", digest(), events(3), settings=SETTINGS)
    retry = render_digest("email", digest(), events(4), settings=SETTINGS)
    other = render_digest("email", digest(digest_key="digest:u1:email:daily:2026-05-12T22:00:00+00:00"),
                          events(3), settings=SETTINGS)
    assert re.fullmatch(r"<digest-[0-9a-f]{32}@energyriskiq\.com>", first.message_id)  # ALERTS_EMAIL_FROM's domain
    installed = render_digest("email", digest(), events(3), settings=SETTINGS, installation_id="3f9a0c1d2b4e")
    assert installed.message_id == first.message_id.replace("@", ".3f9a0c1d2b4e@")
    assert first.message_id == retry.message_id != other.message_id
    assert first.headers == {"X-Alerts-Digest-Key": "digest:u1:email:daily:2026-05-11T22:00:00+00:00"}


@pytest.mark.parametrize("channel", ["email", "telegram"])
def test_view_in_app_link_only_when_the_app_url_is_set(channel):
    without = render_digest(channel, digest(), events(3), settings=SETTINGS)
    with_app = render_digest(channel, digest(), events(3), settings=APP_SETTINGS)
    bodies = (without.text, without.html) if channel == "email" else (without.text,)
    assert all("View in app" not in body for body in bodies)
    assert '<a href="https://app.energyriskiq.com/alerts">View in app</a>' in (
        with_app.html if channel == "email" else with_app.text)
    if channel == "email":
        assert "View in app: https://app.energyriskiq.com/alerts" in with_app.text


# --- window header ------------------------------------------------------------------------

@pytest.mark.parametrize("start,end,label", [
    (DAY_START, DAY_START + timedelta(hours=24), "Tuesday 12 May 2026, 00:00–24:00 Europe/Amsterdam"),
    # Clocks go forward at 02:00: a 23 h day.
    (datetime(2026, 3, 28, 23, tzinfo=UTC), datetime(2026, 3, 29, 22, tzinfo=UTC),
     "Sunday 29 March 2026, 00:00 (UTC+01:00)–24:00 (UTC+02:00) Europe/Amsterdam, 23 h"),
    # Clocks go back at 03:00: a 25 h day.
    (datetime(2026, 10, 24, 22, tzinfo=UTC), datetime(2026, 10, 25, 23, tzinfo=UTC),
     "Sunday 25 October 2026, 00:00 (UTC+02:00)–24:00 (UTC+01:00) Europe/Amsterdam, 25 h"),
    (datetime(2026, 5, 12, 12, tzinfo=UTC), datetime(2026, 5, 12, 13, tzinfo=UTC),
     "Tuesday 12 May 2026, 14:00–15:00 Europe/Amsterdam"),
    (datetime(2026, 5, 12, 21, tzinfo=UTC), datetime(2026, 5, 12, 22, tzinfo=UTC),
     "Tuesday 12 May 2026, 23:00–24:00 Europe/Amsterdam"),
    # The hour that is skipped on the spring day: 01:00 is followed by 03:00.
    (datetime(2026, 3, 29, 0, tzinfo=UTC), datetime(2026, 3, 29, 1, tzinfo=UTC),
     "Sunday 29 March 2026, 01:00 (UTC+01:00)–03:00 (UTC+02:00) Europe/Amsterdam"),
    # The hour that happens twice on the autumn day: two windows, told apart by offset.
    (datetime(2026, 10, 25, 0, tzinfo=UTC), datetime(2026, 10, 25, 1, tzinfo=UTC),
     "Sunday 25 October 2026, 02:00 (UTC+02:00)–02:00 (UTC+01:00) Europe/Amsterdam"),
    (datetime(2026, 10, 25, 1, tzinfo=UTC), datetime(2026, 10, 25, 2, tzinfo=UTC),
     "Sunday 25 October 2026, 02:00 (UTC+01:00)–03:00 (UTC+01:00) Europe/Amsterdam"),
])
def test_window_label_shows_local_start_and_end_also_on_dst_days(start, end, label):
    assert window_label(start, end, AMS) == label


@pytest.mark.parametrize("start,end,expected", [
    (datetime(2026, 3, 28, 23, tzinfo=UTC), datetime(2026, 3, 29, 22, tzinfo=UTC), "23 h"),
    (datetime(2026, 10, 24, 22, tzinfo=UTC), datetime(2026, 10, 25, 23, tzinfo=UTC), "25 h"),
])
def test_dst_day_digests_name_their_real_length(start, end, expected):
    d = digest(window_start=start, window_end=end)
    email = render_digest("email", d, events(2), settings=SETTINGS)
    telegram = render_digest("telegram", d, events(2), settings=SETTINGS)
    assert f"Europe/Amsterdam, {expected}" in email.text and f"Europe/Amsterdam, {expected}" in telegram.text


def test_an_unknown_user_timezone_falls_back_to_the_app_zone():
    message = render_digest("email", digest(timezone="Mars/Olympus"), events(1), settings=SETTINGS)
    assert "Tuesday 12 May 2026, 00:00–24:00 Europe/Amsterdam" in message.text


# --- telegram -----------------------------------------------------------------------------

def test_telegram_digest_of_300_events_fits_4096_units_and_counts_the_rest():
    items = events(300, title=HOSTILE_TITLE + " 😀🔥", summary=HOSTILE_SUMMARY * 3)
    message = render_digest("telegram", digest(channel="telegram"), items, settings=APP_SETTINGS)
    assert isinstance(message, TextMessage)
    units = telegram_units(message.text)  # also proves Telegram's parser would accept it
    assert 4096 - 300 < units <= 4096  # full, not just short
    shown = parse_telegram_html(message.text)
    assert shown.endswith("View in app")
    left_out = int(re.search(r"…and (\d+) more\nView in app$", shown).group(1))
    kept = ids_in(message.text)
    assert len(kept) + left_out == 300
    # The kept ones are the most severe, in the sorted order.
    ranked = sorted(items, key=lambda e: (e["severity"], e["created_at"], e["id"]), reverse=True)
    assert kept == [e["id"] for e in ranked[:len(kept)]]
    assert all(e["severity"] == 5 for e in ranked[:len(kept)])


def test_telegram_digest_counts_emoji_as_two_units():
    items = events(60, title="🔥" * 150, summary="⚡" * 10 + "😀" * 150)
    text = render_digest("telegram", digest(), items, settings=SETTINGS).text
    shown = parse_telegram_html(text)
    assert len(shown) < telegram_units(text) <= 4096  # by code points it would look far shorter
    assert telegram_units(text) > 4096 - 700


def test_telegram_digest_ends_with_more_line_without_app_link_when_unset():
    text = render_digest("telegram", digest(), events(300), settings=SETTINGS).text
    left_out = int(re.search(r"…and (\d+) more$", text).group(1))
    assert len(ids_in(text)) + left_out == 300 and telegram_units(text) <= 4096


def test_telegram_digest_that_fits_shows_everything_and_no_more_line():
    text = render_digest("telegram", digest(), events(5), settings=APP_SETTINGS).text
    assert sorted(ids_in(text)) == [1, 2, 3, 4, 5] and "more" not in text
    assert text.startswith("<b>EnergyRiskIQ daily digest</b>\nTuesday 12 May 2026, 00:00–24:00 Europe/Amsterdam\n5 alerts")


def test_one_huge_event_cannot_crowd_out_the_others_in_telegram():
    items = events(3)
    items[0] = {**items[0], "severity": 5, "title": "T" * 5000, "summary": "S" * 20000}
    text = render_digest("telegram", digest(), items, settings=SETTINGS).text
    assert len(ids_in(text)) == 3 and telegram_units(text) <= 4096


def test_telegram_digest_of_thousands_of_events_stays_within_the_limit():
    text = render_digest("telegram", digest(), events(5000), settings=APP_SETTINGS).text
    left_out = int(re.search(r"…and (\d+) more\n", text).group(1))
    assert len(ids_in(text)) + left_out == 5000 and telegram_units(text) <= 4096
