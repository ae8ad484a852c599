"""Digest items collapsed per collapse_key (docs/policy.md), in email and Telegram: one item
per story with the newest event's fields, "N updates" and every event id; ordering, the
50-item cap, Telegram fitting and the subject count work on items."""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from alerts.core.settings import Settings
from alerts.messages import render_digest
from alerts.messages.collapse import collapse
from tests.support.telegram_html import parse_telegram_html, telegram_units

UTC = timezone.utc
SETTINGS = Settings.from_env({})
APP_SETTINGS = Settings.from_env({"ALERTS_APP_BASE_URL": "https://app.energyriskiq.com"})
DAY_START = datetime(2026, 5, 11, 22, tzinfo=UTC)  # Tuesday 12 May 2026 00:00 in Amsterdam
HOSTILE = '<script>x</script> Tom & "Jerry" </b>'


def digest(channel="email") -> dict:
    return {"id": 1, "digest_key": "1:email:daily:2026-05-11T22:00:00Z", "user_id": 1, "channel": channel,
            "period": "daily", "window_start": DAY_START, "window_end": DAY_START + timedelta(hours=24),
            "timezone": "Europe/Amsterdam"}


def ev(id_, minute, severity=3, key=None, **cols) -> dict:
    return {"id": id_, "event_key": f"e{id_}", "alert_type": "pipeline_outage", "region": "NL",
            "severity": severity, "title": f"Event {id_}", "summary": f"Reason {id_}",
            "url": f"https://energyriskiq.com/e/{id_}", "created_at": DAY_START + timedelta(minutes=minute),
            "collapse_key": key, **cols}


def story(key: str, first_id: int, n: int, severity: int, **cols) -> list[dict]:
    return [ev(first_id + i, first_id + i, severity, key, **cols) for i in range(n)]


def item_ids(text: str) -> list[list[int]]:
    """The ids each item lists, in item order ("#7 ·" alone, or "3 updates · #1 #2 #3 ·")."""
    found = re.findall(r"(?:(\d+) updates · )?((?:#\d+ )*#\d+) ·", text)
    return [[int(i) for i in re.findall(r"#(\d+)", ids)] for _, ids in found]


# The story "emden": three events, given out of order; the newest by created_at (id 11,
# minute 30) is not the highest id. The newest has severity 2, the oldest was 5.
EMDEN = [ev(12, 10, 5, "emden", title="Compressor trip at Emden", summary="Flows down 40%"),
         ev(11, 30, 2, "emden", title="Flows restored", summary="Back to normal",
            url="https://energyriskiq.com/emden"),
         ev(10, 20, 4, "emden", title="Flows down 60%")]
ALONE = [ev(20, 5, 3), ev(21, 6, 3, title="Compressor trip at Emden")]  # no key: items of their own


def test_a_story_is_one_item_with_the_newest_events_fields_and_every_id():
    [item] = collapse(EMDEN)
    assert (item["id"], item["title"], item["severity"], item["updates"], item["ids"]) == (
        11, "Flows restored", 2, 3, (12, 10, 11))


def test_a_tie_on_created_at_makes_the_higher_id_the_newest():
    [item] = collapse([ev(5, 0, 3, "k", title="second"), ev(4, 0, 3, "k", title="first")])
    assert (item["title"], item["ids"]) == ("second", (4, 5))


def test_email_digest_shows_one_item_per_story_and_counts_items():
    message = render_digest("email", digest(), EMDEN + ALONE, settings=SETTINGS)

    assert message.subject == "EnergyRiskIQ daily digest — 2026-05-12 (3 alerts)"
    for body in (message.text, message.html):
        assert "3 updates · #12 #10 #11 ·" in body
        assert "Flows restored" in body and "Back to normal" in body and "https://energyriskiq.com/emden" in body
        assert "Flows down 60%" not in body and "Flows down 40%" not in body, "older updates are not items"
        assert body.count("Compressor trip at Emden") == 1, "the key-less event with the same title stays"
    # Ordered by the item's own (the newest event's) severity: the story is severity 2 now.
    assert item_ids(message.text) == [[21], [20], [12, 10, 11]]


def test_email_caps_at_50_items_not_events():
    events = [e for n in range(60) for e in story(f"s{n}", 1 + 3 * n, 3, severity=1 + n % 5)]
    message = render_digest("email", digest(), events, settings=SETTINGS)

    shown = item_ids(message.text)
    assert len(shown) == 50 and all(len(ids) == 3 for ids in shown)
    assert "…and 10 more" in message.text and "…and 10 more" in message.html
    assert message.subject.endswith("(60 alerts)")
    assert len(item_ids(message.html)) == 50


def test_telegram_digest_collapses_and_passes_the_strict_checker():
    message = render_digest("telegram", digest("telegram"), EMDEN + ALONE, settings=APP_SETTINGS)

    shown = parse_telegram_html(message.text)
    assert "3 alerts" in shown and "3 updates · #12 #10 #11 ·" in shown and "Flows restored" in shown
    assert "Flows down 60%" not in shown
    assert item_ids(message.text) == [[21], [20], [12, 10, 11]]


def test_telegram_fits_4096_units_counting_items_with_all_their_ids():
    # 300 stories of 4 hostile, emoji-laden events each: far more than fits.
    events = [e for n in range(300) for e in story(f"s{n}", 1 + 4 * n, 4, severity=1 + n % 5,
                                                  title=HOSTILE + " 😀🔥", summary=HOSTILE * 3)]
    message = render_digest("telegram", digest("telegram"), events, settings=APP_SETTINGS)

    units = telegram_units(message.text)  # raises where Telegram would refuse the HTML
    assert 4096 - 400 < units <= 4096
    shown = parse_telegram_html(message.text)
    assert shown.startswith("EnergyRiskIQ daily digest\n") and "300 alerts" in shown
    left_out = int(re.search(r"…and (\d+) more\nView in app$", shown).group(1))
    kept = item_ids(message.text)
    assert len(kept) + left_out == 300
    assert all(len(ids) == 4 and ids == list(range(ids[0], ids[0] + 4)) for ids in kept)
    by_first_id = {e["id"]: e for e in events}
    assert all(by_first_id[ids[-1]]["severity"] == 5 for ids in kept), "the most severe items are kept"


def test_a_single_event_item_shows_no_update_count():
    message = render_digest("email", digest(), [ev(7, 0, 3, "k")], settings=SETTINGS)
    assert "updates" not in message.text and item_ids(message.text) == [[7]]
