"""Every Telegram message fits, whatever the event text (property-based, Hypothesis):
instant and digest messages stay within 4096 UTF-16 units after entity parsing, are
HTML Telegram accepts, and a digest always shows at least its highest-severity item."""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from hypothesis import given, strategies as st

from alerts.core.settings import Settings
from alerts.messages import render_digest, render_instant
from alerts.messages.render import sort_items
from alerts.messages.collapse import collapse
from alerts.messages.telegram_fit import TELEGRAM_LIMIT, fit_telegram, truncate_utf16, utf16_len
from tests.support.properties import properties
from tests.support.telegram_html import parse_telegram_html, telegram_units

UTC = timezone.utc
DAY_START = datetime(2026, 5, 11, 22, tzinfo=UTC)
APP_SETTINGS = Settings.from_env({"ALERTS_APP_BASE_URL": "https://app.energyriskiq.com"})
SETTINGS = Settings.from_env({})

# Any character PostgreSQL can store (no lone surrogates), weighted towards what breaks
# naive fitting: markup, entities, emoji (2 units), combining marks, line breaks, controls.
HOSTILE_PIECES = ["<b>", "</i>", "<script>alert(1)</script>", "&amp;", "&", "<", ">", '"', "'", "😀", "🇳🇱", "👍🏽",
                  "\u0301", "\n", "\r\n", "\t", "\x1b[2J", "\u202e", "\u2028", "\x85", " ", "…", "#12"]
char = st.characters(blacklist_categories=("Cs",))
short_text = st.text(char, max_size=40)
piece = st.one_of(short_text, st.sampled_from(HOSTILE_PIECES))
# Up to 5,000 characters, often made of one piece repeated, so huge values are common.
text = st.one_of(
    short_text,
    st.lists(piece, max_size=30).map("".join),
    st.tuples(piece, st.integers(1, 5000)).map(lambda p: (p[0] * p[1])[:5000]),
)
urls = st.one_of(st.none(), st.just("https://energyriskiq.com/e/1?a=1&b=<2>"),
                 text.map(lambda t: "https://energyriskiq.com/" + t), text)
severities = st.one_of(st.integers(1, 5), st.integers(-(2**31), 2**31 - 1))


@st.composite
def events(draw, event_id=None, **fixed):
    return {"id": event_id if event_id is not None else draw(st.integers(1, 2**31 - 1)),
            "event_key": "k", "alert_type": draw(text), "region": draw(st.one_of(st.none(), text)),
            "severity": draw(severities), "title": draw(text), "summary": draw(st.one_of(st.none(), text)),
            "url": draw(urls), "created_at": DAY_START + timedelta(seconds=draw(st.integers(0, 86399))),
            "collapse_key": None, **fixed}


def digest_row() -> dict:
    return {"id": 1, "digest_key": "1:telegram:daily:2026-05-11T22:00:00Z", "user_id": 1, "channel": "telegram",
            "period": "daily", "window_start": DAY_START, "window_end": DAY_START + timedelta(days=1),
            "timezone": "Europe/Amsterdam"}


@properties(60)
@given(event=events(), app=st.booleans())
def test_an_instant_telegram_message_always_fits_and_parses(event, app):
    text = render_instant("telegram", event, delivery_id=1, settings=APP_SETTINGS if app else SETTINGS).text

    assert telegram_units(text) <= TELEGRAM_LIMIT  # also: Telegram's HTML parser accepts it
    assert f"#{event['id']}" in parse_telegram_html(text)


@st.composite
def digests(draw):
    """Up to 60 events of one window; some share a collapse_key, one story may be 700 long."""
    loose = draw(st.lists(events(), max_size=20))
    story_length = draw(st.sampled_from([0, 1, 2, 50, 700]))
    story_text = draw(events(event_id=0))
    story = [{**story_text, "id": 10_000_000 + n, "collapse_key": "story",
              "created_at": DAY_START + timedelta(seconds=n)} for n in range(story_length)]
    keyed = draw(st.lists(events(collapse_key="small-story"), max_size=5))
    events_ = loose + story + keyed
    for n, event in enumerate(events_):  # ids are unique in a digest
        event["id"] = event["id"] * 100 + n if event["collapse_key"] != "story" else event["id"]
    return events_


@properties(60)
@given(items=digests(), app=st.booleans())
def test_a_telegram_digest_always_fits_and_shows_at_least_its_first_item(items, app):
    if not items:
        return  # a digest without items is skipped before rendering
    text = render_digest("telegram", digest_row(), items, settings=APP_SETTINGS if app else SETTINGS).text

    assert telegram_units(text) <= TELEGRAM_LIMIT
    shown = parse_telegram_html(text)
    ranked = sort_items(collapse(items))
    first = ranked[0]
    newest_id = first["ids"][-1]
    assert f"#{newest_id}" in shown, "the highest-severity item is always there, with its newest id"
    if first["updates"] > 1:
        assert f"{first['updates']} updates" in shown, "and the count of a story"
    more = re.search(r"…and (\d+) more", shown.rsplit("\n\n", 1)[-1])
    left_out = int(more.group(1)) if more else 0
    assert 1 <= len(ranked) - left_out <= len(ranked)


def test_a_story_of_700_updates_is_shown_with_its_count_and_newest_ids():
    story = [{"id": 5000 + n, "event_key": f"k{n}", "alert_type": "pipeline_outage", "region": "NL",
              "severity": 4, "title": "Compressor trip", "summary": "Update", "url": None,
              "created_at": DAY_START + timedelta(minutes=n % 1400, seconds=n // 1400), "collapse_key": "story"}
             for n in range(700)]
    text = render_digest("telegram", digest_row(), story, settings=APP_SETTINGS).text

    shown = parse_telegram_html(text)
    assert telegram_units(text) <= TELEGRAM_LIMIT
    assert "700 updates · … #5690 #5691 #5692 #5693 #5694 #5695 #5696 #5697 #5698 #5699" in shown
    assert "#5000 " not in shown and "more" not in shown


# --- the pieces ------------------------------------------------------------------------------

@properties(200)
@given(value=text, limit=st.integers(-5, 6000))
def test_truncate_utf16_never_exceeds_the_limit_and_keeps_a_prefix(value, limit):
    cut = truncate_utf16(value, limit)

    assert utf16_len(cut) <= max(limit, 0)
    if cut == value:
        assert utf16_len(value) <= max(limit, 0)
    elif cut:
        assert cut.endswith("…") and value.startswith(cut[:-1])
    cut.encode("utf-8")  # never half of a surrogate pair


@properties(200)
@given(blocks=st.lists(text, max_size=30), header=short_text, limit=st.integers(100, 5000))
def test_fit_telegram_keeps_leading_blocks_within_the_limit_and_counts_the_rest(blocks, header, limit):
    escaped = [b.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") for b in blocks]
    header = header.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")[:50]

    def footer(more: int) -> str:
        return f"\n…and {more} more" if more else ""

    fitted = fit_telegram(header, escaped, footer, limit=limit)

    assert telegram_units(fitted) <= limit
    more = re.search(r"\n…and (\d+) more$", fitted)
    kept = len(blocks) - (int(more.group(1)) if more else 0)
    assert fitted == header + "".join(escaped[:kept]) + footer(len(blocks) - kept)


def test_an_instant_message_of_5000_character_fields_fits_and_keeps_id_title_and_type():
    event = {"id": 77, "event_key": "k", "alert_type": "t" * 5000, "region": "R" * 5000, "severity": 5,
             "title": "T" * 5000, "summary": "S" * 5000, "url": "https://energyriskiq.com/" + "u" * 5000,
             "created_at": DAY_START, "collapse_key": None}
    text = render_instant("telegram", event, delivery_id=1, settings=APP_SETTINGS).text

    shown = parse_telegram_html(text)
    assert telegram_units(text) == TELEGRAM_LIMIT, "the summary takes exactly the room left"
    assert "#77 · " + "t" * 63 + "… · " + "R" * 63 + "…" in shown
    assert shown.startswith("CRITICAL · " + "T" * 511 + "…")
