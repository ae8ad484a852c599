"""Hostile producer input end to end (property-based, Hypothesis): events hostile in every
field — huge, control characters, impossible dates, unicode and emoji, HTML-ish text —
go in beside good ones, through ``alerts ingest``'s parser or a plain INSERT, then
A → B → D → C run in this process with the real channels at the fake SMTP server and the
fake Bot API / Twilio, on PostgreSQL.

Whatever they hold: every good event reaches every reader (instant, or in a sent digest);
every hostile event is refused by ingest, rejected by intake with a reason naming its
fields, or delivered within the providers' limits (a digest of a window still open may
wait for it); no row fails, none is left in ``sending``."""
from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from hypothesis import example, given, strategies as st

from alerts.channels.registry import build_channels
from alerts.core import tables as m
from alerts.core.db import Database, make_engine
from alerts.core.settings import Settings
from alerts.phases.ingest import ingest_lines
from alerts.phases.intake import MAX_SUMMARY_CHARS, MAX_TITLE_CHARS, MAX_URL_CHARS
from alerts.phases.pipeline import ALL, run_phases
from tests.support.clock import clock_at
from tests.support.e2e_runner import plain_part
from tests.support.factories import add_pref, add_user
from tests.support.fakes.fixtures import with_fakes
from tests.support.fakes.provider_api import TELEGRAM_MAX_LENGTH, parse_html, utf16_length
from tests.support.properties import properties
from tests.support.telegram_html import telegram_units

UTC = timezone.utc
NOW = datetime(2026, 5, 12, 22, 1, tzinfo=UTC)  # just after 2026-05-12 closed in Amsterdam
GOOD_TIMES = ["2026-05-12T07:00:00+00:00", "2026-05-12T09:30:00+02:00"]
READERS = {  # name: (channel, kind, address column, address)
    "ivy": ("email", "instant", "email", "ivy@example.com"),
    "dan": ("email", "digest", "email", "dan@example.com"),
    "tia": ("telegram", "instant", "telegram_chat_id", "1001"),
    "taz": ("telegram", "digest", "telegram_chat_id", "1002"),
    "sam": ("sms", "instant", "phone", "+31612345678"),
}
FIELDS = ("title", "severity", "alert_type", "region", "url", "summary", "collapse_key", "created_at")
SMS_MAX_CHARS = 320

# --- what a hostile producer writes -----------------------------------------------------------

NASTY = ["<script>alert(1)</script>", "</b>", "<i>", "&amp;", "&", "<", ">", '"', "'", "😀", "🇳🇱", "👍🏽",
         "\u0301", "\u202e", "\u200b", "\ufeff", "\u2028", "\x85", "\x1b[2J", "\t", "\r\n", "\n", "\x7f",
         "#12 · 09:00", "…and 3 more", "%s%n", "'; DROP TABLE users; --", "\\", "ʕ•ᴥ•ʔ", "Ω≈ç√"]
char = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
piece = st.one_of(st.text(char, max_size=12), st.sampled_from(NASTY))
text = st.one_of(
    st.lists(piece, max_size=12).map("".join),
    st.tuples(piece, st.integers(1, 5000)).map(lambda p: (p[0] * p[1])[:5000]),
)
# Valid for intake, still nasty: markup, emoji, right-to-left marks, the longest allowed.
title_ok = st.one_of(st.lists(st.sampled_from(NASTY[:14] + ["Gas", " ", "⚡"]), min_size=1, max_size=20)
                     .map(lambda ps: "T " + "".join(ps)),
                     st.just("T" * MAX_TITLE_CHARS), st.just("🔥" * MAX_TITLE_CHARS))
alert_type_ok = st.from_regex(r"[a-z0-9_.-]{1,64}", fullmatch=True)
region_ok = st.one_of(st.none(), st.sampled_from(["NL", "🇳🇱 North Sea", "<b>DE</b> & 'AT'", "Île-de-France",
                                                  "\u202eLN", "R" * 64]))
url_ok = st.one_of(st.none(), st.sampled_from(["https://energyriskiq.com/e/1?a=1&b=<2>\"x\"",
                                              "http://[2001:db8::1]:8443/é?q=😀",
                                              "https://e.com/" + "u" * (MAX_URL_CHARS - 14)]))
summary_ok = st.one_of(st.none(), st.lists(st.sampled_from(NASTY + ["Flow cut", "\n\n"]), max_size=30).map("".join),
                       st.just("S" * MAX_SUMMARY_CHARS))
created_ok = st.sampled_from(["2026-05-12T12:00:00+00:00", "2000-01-01T00:00:00+00:00",
                              "2026-05-13T00:30:00+14:00", "2099-12-31T23:59:59.999999+00:00"])
created_bad = st.sampled_from(["0001-01-01T00:00:00Z", "9999-12-31T23:59:59+00:00", "1999-12-31T23:59:59.999999Z",
                               "2100-01-01T00:00:00Z", "yesterday", "2026-05-12T09:00:00"])
created_raw = st.sampled_from(["infinity", "-infinity", "10000-01-01 00:00:00+00", "0044-03-15 12:00:00+00 BC"])


@st.composite
def hostile_events(draw, n: int):
    """One hostile event: about half are nasty in every field yet valid, so they pass
    intake and reach the renderers; the others draw each field nasty-but-valid or plain
    wrong, so they are rejected by intake or refused by ingest."""
    def pick(valid, wrong):
        return draw(valid if passes else st.one_of(valid, wrong))

    passes = draw(st.booleans())
    raw_time = not passes and draw(st.booleans())
    event = {
        "event_key": f"hostile-{n}-" + draw(st.text(char, max_size=20)),
        "title": pick(title_ok, text),
        "severity": pick(st.integers(1, 5), st.one_of(st.integers(-(2 ** 31), 2 ** 31 - 1),
                                                     st.sampled_from(["high", 4.5, None]))),
        "alert_type": pick(alert_type_ok, text),
        "region": pick(region_ok, text),
        "url": pick(url_ok, text),
        "summary": pick(summary_ok, text),
        "collapse_key": pick(st.one_of(st.none(), st.sampled_from(["h-story", "h-other"])), text),
        "payload": draw(st.one_of(st.none(), st.dictionaries(st.text(char, max_size=5), text, max_size=2))),
        "created_at": draw(created_raw) if raw_time else pick(created_ok, created_bad),
    }
    return {k: v for k, v in event.items() if v is not None or draw(st.booleans())}


def good_event(n: int) -> dict:
    return {"event_key": f"good-{n}", "alert_type": "pipeline_outage", "region": "NL", "severity": 3 + n,
            "title": f"Gas pipeline outage {n}", "summary": "Flow reduced by 30%",
            "url": f"https://energyriskiq.com/e/{n}", "created_at": GOOD_TIMES[n]}


# --- the run ----------------------------------------------------------------------------------

@pytest.fixture
def world(pg_url, smtp_server, provider_api, tmp_path):
    engine = make_engine(pg_url)
    settings = with_fakes(Settings.from_env({"DATABASE_URL": pg_url, "ALERTS_OUTBOX_DIR": str(tmp_path),
                                             "ALERTS_APP_BASE_URL": "https://app.energyriskiq.com"}),
                          smtp_server, provider_api)
    yield engine, settings, smtp_server, provider_api
    engine.dispose()


def reset(engine, smtp_server, provider_api) -> None:
    """Each example starts from empty tables (the installation row stays) and quiet fakes."""
    with engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE alert_events, users RESTART IDENTITY CASCADE")
        for name, (channel, kind, column, address) in READERS.items():
            add_pref(conn, add_user(conn, **{"email": None, column: address}), channel=channel, delivery_kind=kind)
    smtp_server.reset()
    provider_api.reset()


def store(engine, events: list[dict]) -> dict[str, str]:
    """Good and ingestible events through ingest's parser (JSON Lines); the ones with a
    time only a plain INSERT can write, that way. The ingest errors, by event_key."""
    lines, raw = [], []
    for event in events:
        (raw if event.get("created_at") in created_raw.elements else lines).append(event)
    report = ingest_lines(Database(engine), [json.dumps(e) + "\n" for e in lines])
    refused = {lines[number - 1]["event_key"]: reason for number, reason in report.errors}
    with engine.begin() as conn:
        for event in raw:
            row = {k: v for k, v in event.items() if k != "created_at"}
            if not all(isinstance(row.get(k), str) for k in ("title", "alert_type")) or type(row.get("severity")) is not int:
                continue  # NOT NULL / integer columns: a plain INSERT of these fails at the producer
            event_id = conn.execute(sa.insert(m.alert_events).values(**row).returning(m.alert_events.c.id)).scalar_one()
            conn.execute(sa.text("UPDATE alert_events SET created_at = CAST(:v AS timestamptz) WHERE id = :id"),
                         {"v": event["created_at"], "id": event_id})
    return refused


def run_everything(engine, settings) -> dict:
    channels = build_channels(settings)
    try:
        return run_phases(Database(engine), ALL, clock_at(NOW), settings, channels)
    finally:
        channels.close()


def outcome(engine) -> tuple[dict, list, dict]:
    e, d, g, i = m.alert_events, m.user_alert_deliveries, m.user_alert_digests, m.user_alert_digest_items
    with engine.connect() as conn:
        events = {r.event_key: r for r in conn.execute(sa.select(e.c.id, e.c.event_key, e.c.status, e.c.reject_reason))}
        deliveries = conn.execute(
            sa.select(d.c.alert_event_id, d.c.channel, d.c.delivery_kind, d.c.status, d.c.last_error,
                      g.c.status.label("digest_status"), g.c.window_end)
            .select_from(d.outerjoin(i, i.c.delivery_id == d.c.id).outerjoin(g, g.c.id == i.c.digest_id))).all()
        sent = {(r.channel, "digest"): r.n for r in conn.execute(
            sa.select(g.c.channel, sa.func.count().label("n")).where(g.c.status == m.SENT).group_by(g.c.channel))}
        sent.update({(r.channel, "instant"): r.n for r in conn.execute(
            sa.select(d.c.channel, sa.func.count().label("n"))
            .where(d.c.status == m.SENT, d.c.delivery_kind == m.INSTANT).group_by(d.c.channel))})
        left_sending = sum(conn.execute(sa.select(sa.func.count()).select_from(t).where(t.c.status == m.SENDING))
                           .scalar_one() for t in (d, g))
    assert left_sending == 0, "no row is left in sending"
    return events, deliveries, sent


def check_run(engine, smtp_server, provider_api, events: list[dict], refused: dict[str, str]) -> None:
    stored, deliveries, sent = outcome(engine)
    by_event: dict[int, list] = {}
    for row in deliveries:
        by_event.setdefault(row.alert_event_id, []).append(row)

    for n in range(len(GOOD_TIMES)):
        good = stored[f"good-{n}"]
        assert good.status == "fanned_out", good
        rows = by_event[good.id]
        assert sorted((r.channel, r.delivery_kind) for r in rows) == sorted(
            (channel, kind) for channel, kind, _, _ in READERS.values())
        for row in rows:
            delivered = row.status == m.SENT if row.delivery_kind == m.INSTANT else row.digest_status == m.SENT
            assert delivered, f"good event {n} not delivered: {row}"

    for event in events:
        key = event["event_key"]
        if key in refused or key not in stored:
            continue  # refused by ingest as malformed (reported), or unstorable by a plain INSERT
        row = stored[key]
        if row.status == "rejected":
            assert {part.split(":")[0] for part in row.reject_reason.split("; ")} <= set(FIELDS), row.reject_reason
            continue
        assert row.status == "fanned_out", row
        for delivery in by_event.get(row.id, []):
            assert delivery.status not in (m.FAILED, m.QUEUED, m.SENDING), \
                f"hostile event {event!r}: {delivery.channel} {delivery.delivery_kind} {delivery.status}: " \
                f"{delivery.last_error}"
            if delivery.delivery_kind == m.DIGEST:
                assert delivery.digest_status == m.SENT or (
                    delivery.digest_status == m.QUEUED and delivery.window_end > NOW), delivery

    # What reached the providers: one message per sent row, each within its limits.
    mails = smtp_server.messages
    assert len(mails) == sent.get(("email", "instant"), 0) + sent.get(("email", "digest"), 0)
    for mail in mails:
        assert mail.message["Message-ID"] and plain_part(mail)
    digests_to_dan = [mail for mail in mails if mail.rcpt_tos == ["dan@example.com"]]
    for n in range(len(GOOD_TIMES)):
        good_id = stored[f"good-{n}"].id
        assert any(re.search(rf"^#{good_id} · ", plain_part(mail), re.MULTILINE) for mail in digests_to_dan)
    telegrams = provider_api.telegram_messages
    assert len(telegrams) == sent.get(("telegram", "instant"), 0) + sent.get(("telegram", "digest"), 0)
    for message in telegrams:
        assert utf16_length(parse_html(message.text)) <= TELEGRAM_MAX_LENGTH
        assert telegram_units(message.text) <= TELEGRAM_MAX_LENGTH  # and our strict reading of Telegram HTML
    assert len(provider_api.sms_messages) == sent.get(("sms", "instant"), 0)
    assert all(len(sms.body) <= SMS_MAX_CHARS for sms in provider_api.sms_messages)


# --- the tests --------------------------------------------------------------------------------

@properties(8)
@given(hostile=st.lists(st.integers(0, 10 ** 6), min_size=1, max_size=6).flatmap(
    lambda ns: st.tuples(*(hostile_events(n) for n in range(len(ns))))))
@example(hostile=(
    {"event_key": "five-thousand", "title": "T" * 5000, "severity": 5, "alert_type": "t" * 5000, "region": "R" * 5000,
     "url": "https://e.com/" + "u" * 5000, "summary": "S" * 5000, "collapse_key": "k" * 5000,
     "created_at": "2026-05-12T12:00:00+00:00"},
    {"event_key": "at-infinity", "title": "Infinite", "severity": 4, "alert_type": "price_spike",
     "created_at": "infinity"},
    {"event_key": "go-zero-time", "title": "Zero", "severity": 4, "alert_type": "price_spike",
     "created_at": "0001-01-01T00:00:00Z"},
    {"event_key": "nasty-but-valid", "title": "<b>Gas</b> & 'LNG' 😀\u202e", "severity": 5, "alert_type": "x.y-z_1",
     "region": "🇳🇱 <i>North</i>", "url": "https://e.com/?a=<1>&b=\"2\"", "summary": "\u2028<script>\n\n&amp;",
     "created_at": "2026-05-12T12:00:00+00:00"},
))
def test_hostile_events_never_stop_good_ones_and_what_passes_fits_every_limit(world, hostile):
    engine, settings, smtp_server, provider_api = world
    reset(engine, smtp_server, provider_api)
    events = [good_event(n) for n in range(len(GOOD_TIMES))] + list(hostile)

    refused = store(engine, events)
    assert not any(key.startswith("good-") for key in refused), refused
    run_everything(engine, settings)

    check_run(engine, smtp_server, provider_api, events, refused)


def test_a_story_of_700_updates_and_the_longest_fields_still_make_a_telegram_digest_that_fits(world):
    engine, settings, smtp_server, provider_api = world
    reset(engine, smtp_server, provider_api)
    story = [{"event_key": f"story-{n}", "alert_type": "pipeline_outage", "region": "R" * 64, "severity": 5,
              "title": "🔥" * MAX_TITLE_CHARS, "summary": "<&>" * (MAX_SUMMARY_CHARS // 3),
              "url": "https://e.com/" + "u" * (MAX_URL_CHARS - 14), "collapse_key": "nord-stream",
              "created_at": f"2026-05-12T{8 + n // 60:02d}:{n % 60:02d}:00+00:00"} for n in range(700)]
    events = [good_event(n) for n in range(len(GOOD_TIMES))] + story

    assert store(engine, events) == {}
    result = run_everything(engine, settings)

    assert result["a"] == {"accepted": 702, "rejected": 0}
    check_run(engine, smtp_server, provider_api, events, {})
    (digest,) = [msg for msg in provider_api.telegram_messages if msg.chat_id == "1002"]
    shown = parse_html(digest.text)
    newest = outcome(engine)[0]["story-699"].id
    assert "700 updates · … " in shown and f"#{newest} · " in shown
