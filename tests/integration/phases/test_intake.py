"""Phase A — intake: the validation rules as a table, then the phase on both databases."""
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from alerts.core import tables as m
from alerts.core.db import Database, make_engine
from alerts.core.settings import Settings
from alerts.phases import intake
from alerts.phases.intake import normalise, run_phase_a, validate_event
from tests.support.factories import add_event
from tests.support.clock import NO_CHANNELS, clock_at

GOOD = {"title": "TTF day-ahead +18%", "severity": 3, "alert_type": "price_spike",
        "url": "https://energyriskiq.com/e/1", "summary": "Cold snap"}


@pytest.mark.parametrize("changes", [
    {},
    {"severity": 1}, {"severity": 5},
    {"alert_type": "gas.supply-risk_2"},
    {"alert_type": "  price_spike \n"},            # surrounding whitespace is stripped, not judged
    {"url": None}, {"url": ""}, {"url": "   "},    # no url at all is fine
    {"url": "http://example.com"}, {"url": "HTTPS://Example.com:8443/a?b=c#d"},
    {"url": "https://[2001:db8::1]/x"},
    {"url": " https://example.com/x\n"},
    {"summary": None}, {"summary": ""},
    {"title": "<script>alert('x') & \"quotes\"</script>"},  # escaping is the renderer's job
    {"title": "x" * 500}, {"summary": "x" * 2000}, {"url": "https://e.com/" + "x" * 2034},
    {"alert_type": "a" * 64}, {"alert_type": " " + "a" * 64 + " "},
    {"region": None}, {"region": ""}, {"region": "r" * 64}, {"region": "Île-de-France · 🇫🇷"},
    {"region": "NL\u2028"},  # a line separator is Zl, not a control character (Cc)
    {"created_at": datetime(2000, 1, 1, tzinfo=timezone.utc)},
    {"created_at": datetime(2099, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)},
    {"created_at": datetime(2000, 1, 1, 1, 0, tzinfo=timezone(timedelta(hours=1)))},  # 00:00 UTC
    {"created_at_in_range": True, "created_at_text": "2026-05-12 09:00:00+00"},
])
def test_a_good_event_has_no_reject_reason(changes):
    assert validate_event({**GOOD, **changes}) is None


@pytest.mark.parametrize("changes,reason", [
    ({"title": ""}, "title: empty"),
    ({"title": "   \t\n"}, "title: empty"),
    ({"title": "\u200b\u200b"}, "title: empty"),    # zero-width only: nothing a reader sees
    ({"title": None}, "title: empty"),
    ({"title": "x" * 501}, "title: longer than 500 characters"),
    ({"severity": 0}, "severity: must be from 1 to 5 (got 0)"),
    ({"severity": 6}, "severity: must be from 1 to 5 (got 6)"),
    ({"severity": -3}, "severity: must be from 1 to 5 (got -3)"),
    ({"severity": None}, "severity: must be a whole number from 1 to 5"),
    ({"alert_type": ""}, "alert_type: empty"),
    ({"alert_type": "  "}, "alert_type: empty"),
    ({"alert_type": "Price_Spike"}, "alert_type: must match [a-z0-9_.-]+ (got 'Price_Spike')"),
    ({"alert_type": "price spike"}, "alert_type: must match [a-z0-9_.-]+ (got 'price spike')"),
    ({"alert_type": "price/spike"}, "alert_type: must match [a-z0-9_.-]+ (got 'price/spike')"),
    ({"alert_type": "prïce"}, "alert_type: must match [a-z0-9_.-]+ (got 'prïce')"),
    ({"alert_type": "*"}, "alert_type: must match [a-z0-9_.-]+ (got '*')"),
    ({"url": "javascript:alert(1)"}, "url: must be an absolute http(s) URL (scheme 'javascript')"),
    ({"url": "JavaScript:alert(1)"}, "url: must be an absolute http(s) URL (scheme 'javascript')"),
    ({"url": "data:text/html,<script>x</script>"}, "url: must be an absolute http(s) URL (scheme 'data')"),
    ({"url": "ftp://example.com/f"}, "url: must be an absolute http(s) URL (scheme 'ftp')"),
    ({"url": "/e/1"}, "url: must be an absolute http(s) URL (scheme none)"),
    ({"url": "//example.com/e/1"}, "url: must be an absolute http(s) URL (scheme none)"),
    ({"url": "example.com/e/1"}, "url: must be an absolute http(s) URL (scheme none)"),
    ({"url": "http://"}, "url: must be an absolute http(s) URL with a host"),
    ({"url": "http:///path"}, "url: must be an absolute http(s) URL with a host"),
    ({"url": "https:example.com"}, "url: must be an absolute http(s) URL with a host"),
    ({"url": "http://:80/"}, "url: must be an absolute http(s) URL with a host"),
    ({"url": "https://energyriskiq.com@evil.example/"}, "url: must not contain user info (user@host)"),
    ({"url": "https://exa mple.com"}, "url: contains whitespace or control characters"),
    ({"url": "https://example.com/\tjavascript:x"}, "url: contains whitespace or control characters"),
    ({"url": "https://example.com/\x00"}, "url: contains whitespace or control characters"),
    ({"url": "https://example.com/\u202egnp.exe"}, "url: contains whitespace or control characters"),
    ({"url": "http://[::1"}, "url: not a valid URL"),
    ({"url": "http://example.com:99999/"}, "url: not a valid URL"),
    ({"url": "https://e.com/" + "x" * 2035}, "url: longer than 2048 characters"),
    ({"summary": "x" * 2001}, "summary: longer than 2000 characters"),
    ({"collapse_key": "k" * 201}, "collapse_key: longer than 200 characters"),
    ({"alert_type": "a" * 65}, "alert_type: longer than 64 characters"),
    ({"alert_type": "A" * 5000}, "alert_type: longer than 64 characters"),
    ({"region": "r" * 65}, "region: longer than 64 characters"),
    ({"region": "North\nSea"}, "region: contains control characters (line breaks, tabs or others)"),
    ({"region": "North\tSea"}, "region: contains control characters (line breaks, tabs or others)"),
    ({"region": "NL\x1b[2J"}, "region: contains control characters (line breaks, tabs or others)"),
    ({"region": "NL\x85"}, "region: contains control characters (line breaks, tabs or others)"),
    ({"region": "NL\x7f"}, "region: contains control characters (line breaks, tabs or others)"),
    ({"region": 7}, "region: must be text"),
    ({"created_at": datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)},
     "created_at: must be from 2000-01-01 up to (not including) 2100-01-01 UTC (got '1999-12-31T23:59:59.999999+00:00')"),
    ({"created_at": datetime(2100, 1, 1, tzinfo=timezone.utc)},
     "created_at: must be from 2000-01-01 up to (not including) 2100-01-01 UTC (got '2100-01-01T00:00:00+00:00')"),
    ({"created_at_in_range": False, "created_at_text": "infinity"},
     "created_at: must be from 2000-01-01 up to (not including) 2100-01-01 UTC (got 'infinity')"),
])
def test_a_bad_event_gets_a_reason_naming_the_field(changes, reason):
    assert validate_event({**GOOD, **changes}) == reason


def test_every_problem_of_an_event_is_named():
    reason = validate_event({"title": " ", "severity": 9, "alert_type": "X", "url": "javascript:x"})
    assert [part.split(":")[0] for part in reason.split("; ")] == ["title", "severity", "alert_type", "url"]


def test_a_long_bad_value_is_quoted_briefly():
    reason = validate_event({**GOOD, "alert_type": "A" * 64})
    assert len(reason) < 100 and reason.endswith("…')")


@pytest.mark.parametrize("row,expected", [
    ({**GOOD, "title": "  T  ", "summary": " s\n", "alert_type": " price_spike ", "url": " https://e.com "},
     {"title": "T", "summary": "s", "alert_type": "price_spike", "url": "https://e.com"}),
    ({**GOOD, "summary": "   ", "url": ""}, {"summary": None, "url": None}),
    ({**GOOD, "summary": None, "url": None}, {"summary": None, "url": None}),
])
def test_normalise_strips_whitespace_and_blanks_become_null(row, expected):
    assert normalise(row).items() >= expected.items()


# --- the phase ----------------------------------------------------------------------------

def events(engine):
    with engine.connect() as conn:
        return {r.event_key: r for r in conn.execute(sa.select(m.alert_events))}


def test_good_events_become_ready_and_bad_ones_rejected_with_a_reason(db, engine, now, settings):
    bad = {
        "no-title": {"title": "  "},
        "severity": {"severity": 9},
        "type": {"alert_type": "Price Spike"},
        "empty-type": {"alert_type": ""},
        "script-url": {"url": "javascript:alert(document.cookie)"},
        "relative-url": {"url": "/e/1"},
        "no-host": {"url": "http://"},
        "long-title": {"title": "t" * 501},
        "long-summary": {"summary": "s" * 2001},
        "long-url": {"url": "https://e.com/" + "u" * 2100},
    }
    with engine.begin() as conn:
        add_event(conn, event_key="good")
        add_event(conn, event_key="no-url", url=None)
        for key, cols in bad.items():
            add_event(conn, event_key=key, **cols)

    assert run_phase_a(db, clock_at(now), settings, NO_CHANNELS) == {"accepted": 2, "rejected": len(bad)}

    rows = events(engine)
    assert rows["good"].status == rows["no-url"].status == "ready"
    assert rows["good"].reject_reason is None
    expected_field = {"no-title": "title", "severity": "severity", "type": "alert_type", "empty-type": "alert_type",
                      "script-url": "url", "relative-url": "url", "no-host": "url", "long-title": "title",
                      "long-summary": "summary", "long-url": "url"}
    for key, field in expected_field.items():
        assert rows[key].status == "rejected"
        assert rows[key].reject_reason.startswith(f"{field}: "), (key, rows[key].reject_reason)


def test_a_rejected_event_keeps_what_the_producer_sent(db, engine, now, settings):
    with engine.begin() as conn:
        add_event(conn, event_key="bad", title="  Spaced  ", severity=7)

    run_phase_a(db, clock_at(now), settings, NO_CHANNELS)

    row = events(engine)["bad"]
    assert (row.status, row.title, row.severity) == ("rejected", "  Spaced  ", 7)


def test_an_accepted_event_is_stored_normalised(db, engine, now, settings):
    with engine.begin() as conn:
        add_event(conn, event_key="e", title="  TTF +18%\n", summary="  cold snap ", alert_type=" price_spike",
                  url="   ")

    run_phase_a(db, clock_at(now), settings, NO_CHANNELS)

    row = events(engine)["e"]
    assert (row.status, row.title, row.summary, row.alert_type, row.url) == (
        "ready", "TTF +18%", "cold snap", "price_spike", None)


def test_hostile_text_is_accepted_verbatim_for_the_renderer_to_escape(db, engine, now, settings):
    title = "<script>alert('x')</script> & \"quotes\""
    with engine.begin() as conn:
        add_event(conn, event_key="e", title=title, summary="<b>bold</b>")

    assert run_phase_a(db, clock_at(now), settings, NO_CHANNELS) == {"accepted": 1, "rejected": 0}
    assert (events(engine)["e"].title, events(engine)["e"].summary) == (title, "<b>bold</b>")


def test_only_new_events_are_judged(db, engine, now, settings):
    with engine.begin() as conn:
        for status in ("ready", "fanned_out", "rejected"):
            add_event(conn, event_key=status, status=status, severity=9)

    assert run_phase_a(db, clock_at(now), settings, NO_CHANNELS) == {"accepted": 0, "rejected": 0}
    assert {k: r.status for k, r in events(engine).items()} == {
        "ready": "ready", "fanned_out": "fanned_out", "rejected": "rejected"}


def test_no_new_events_is_a_clean_no_op(db, now, settings):
    assert run_phase_a(db, clock_at(now), settings, NO_CHANNELS) == {"accepted": 0, "rejected": 0}


def test_a_backlog_larger_than_one_batch_is_judged_completely(db, engine, now, settings, monkeypatch):
    monkeypatch.setattr(intake, "BATCH_SIZE", 7)
    with engine.begin() as conn:
        conn.execute(sa.insert(m.alert_events), [
            {"event_key": f"e{i}", "alert_type": "price_spike", "severity": 9 if i % 3 == 0 else 2,
             "title": f"  Event {i} "} for i in range(50)
        ])

    assert run_phase_a(db, clock_at(now), settings, NO_CHANNELS) == {"accepted": 33, "rejected": 17}
    rows = events(engine)
    assert {r.status for r in rows.values()} == {"ready", "rejected"}
    assert rows["e1"].title == "Event 1"
    assert run_phase_a(db, clock_at(now), settings, NO_CHANNELS) == {"accepted": 0, "rejected": 0}


def test_a_collapse_key_over_200_characters_is_rejected_naming_it_and_one_of_200_is_kept(db, engine, now, settings):
    with engine.begin() as conn:
        add_event(conn, event_key="long-key", collapse_key="k" * 201)
        add_event(conn, event_key="max-key", collapse_key=" " + "k" * 200 + " ")
        add_event(conn, event_key="blank-key", collapse_key="   ")

    assert run_phase_a(db, clock_at(now), settings, NO_CHANNELS) == {"accepted": 2, "rejected": 1}

    rows = events(engine)
    assert (rows["long-key"].status, rows["long-key"].reject_reason) == (
        "rejected", "collapse_key: longer than 200 characters")
    assert rows["long-key"].collapse_key == "k" * 201, "a rejected event keeps what the producer sent"
    assert (rows["max-key"].status, rows["max-key"].collapse_key) == ("ready", "k" * 200)
    assert (rows["blank-key"].status, rows["blank-key"].collapse_key) == ("ready", None)


# --- created_at, region and alert_type: judged without ever stopping the batch --------------

UTC = timezone.utc
RANGE_REASON = "created_at: must be from 2000-01-01 up to (not including) 2100-01-01 UTC"


def test_created_at_outside_2000_to_2100_is_rejected_and_inside_accepted(db, engine, now, settings):
    times = {
        "go-zero-time": datetime(1, 1, 1, tzinfo=UTC),
        "just-before": datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        "first": datetime(2000, 1, 1, tzinfo=UTC),
        "last": datetime(2099, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        "just-after": datetime(2100, 1, 1, tzinfo=UTC),
        "year-9999": datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),
    }
    with engine.begin() as conn:
        for key, at in times.items():
            add_event(conn, event_key=key, created_at=at)

    assert run_phase_a(db, clock_at(now), settings, NO_CHANNELS) == {"accepted": 2, "rejected": 4}

    rows = events(engine)
    assert {k for k, r in rows.items() if r.status == "ready"} == {"first", "last"}
    for key in ("go-zero-time", "just-before", "just-after", "year-9999"):
        assert rows[key].reject_reason.startswith(RANGE_REASON + " (got '"), rows[key].reject_reason
    assert "9999-12-31" in rows["year-9999"].reject_reason


@pytest.mark.parametrize("value", ["infinity", "-infinity", "10000-01-01 04:00:00+00", "0044-03-15 12:00:00+00 BC"])
def test_a_time_the_driver_cannot_read_is_rejected_and_the_rest_of_the_batch_judged(pg_url, value, now):
    """psycopg fails to read these (year 10K, before year 1), so the range is judged in SQL."""
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        before = add_event(conn, event_key="before")
        bad = add_event(conn, event_key="bad")
        conn.execute(sa.text("UPDATE alert_events SET created_at = CAST(:v AS timestamptz) WHERE id = :id"),
                     {"v": value, "id": bad})
        add_event(conn, event_key="after", severity=9)
    settings = Settings.from_env({"DATABASE_URL": pg_url})

    assert run_phase_a(Database(engine), clock_at(now), settings, NO_CHANNELS) == {"accepted": 1, "rejected": 2}

    with engine.connect() as conn:
        found = {r.event_key: r for r in conn.execute(sa.select(
            m.alert_events.c.id, m.alert_events.c.event_key, m.alert_events.c.status, m.alert_events.c.reject_reason))}
    engine.dispose()
    assert (found["before"].status, found["after"].status) == ("ready", "rejected")
    assert found["bad"].status == "rejected"
    assert found["bad"].reject_reason.startswith(RANGE_REASON), found["bad"].reject_reason
    assert before < bad


def test_sqlite_text_that_is_no_time_is_rejected_naming_created_at(sqlite_url, now):
    engine = make_engine(sqlite_url)
    with engine.begin() as conn:
        add_event(conn, event_key="good")
        bad = add_event(conn, event_key="bad")
        conn.execute(sa.text("UPDATE alert_events SET created_at = 'yesterday' WHERE id = :id"), {"id": bad})
    settings = Settings.from_env({"DATABASE_URL": sqlite_url})

    assert run_phase_a(Database(engine), clock_at(now), settings, NO_CHANNELS) == {"accepted": 1, "rejected": 1}
    with engine.connect() as conn:
        reason = conn.execute(sa.select(m.alert_events.c.reject_reason).where(m.alert_events.c.id == bad)).scalar()
    engine.dispose()
    assert reason == RANGE_REASON + " (got 'yesterday')"


def test_long_or_controlled_regions_and_long_alert_types_are_rejected_naming_the_field(db, engine, now, settings):
    with engine.begin() as conn:
        add_event(conn, event_key="long-region", region="R" * 5000)
        add_event(conn, event_key="tab-region", region="North\tSea")
        add_event(conn, event_key="long-type", alert_type="t" * 65)
        add_event(conn, event_key="ok", region="R" * 64, alert_type="t" * 64)

    assert run_phase_a(db, clock_at(now), settings, NO_CHANNELS) == {"accepted": 1, "rejected": 3}

    rows = events(engine)
    assert rows["long-region"].reject_reason == "region: longer than 64 characters"
    assert rows["tab-region"].reject_reason == "region: contains control characters (line breaks, tabs or others)"
    assert rows["long-type"].reject_reason == "alert_type: longer than 64 characters"
    assert rows["long-region"].region == "R" * 5000, "a rejected event keeps what the producer sent"


def test_the_event_driven_path_judges_created_at_in_sql_too(pg_url, now):
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        bad = add_event(conn, event_key="bad")
        conn.execute(sa.text("UPDATE alert_events SET created_at = 'infinity' WHERE id = :id"), {"id": bad})
        assert intake.intake_event(conn, bad) == "rejected"
        reason = conn.execute(sa.select(m.alert_events.c.reject_reason).where(m.alert_events.c.id == bad)).scalar()
    engine.dispose()
    assert reason == RANGE_REASON + " (got 'infinity')"
