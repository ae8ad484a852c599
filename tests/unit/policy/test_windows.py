"""Digest windows (alerts/policy/windows.py): local days and hours as UTC bounds, DST included."""
from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from alerts.core.settings import Settings
from alerts.core.db import make_engine
from alerts.policy.windows import (day_start, digest_key, digest_window, format_window_start, parse_time_of_day,
                            resolve_period, resolve_send_time, resolve_timezone, windows_between)

UTC = timezone.utc
AMS, NYC, KOLKATA, LORD_HOWE = (ZoneInfo(z) for z in
                                ("Europe/Amsterdam", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"))
H = timedelta(hours=1)


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


WINDOWS = [
    # instant (UTC), period, zone, expected start (UTC), expected length
    (utc(2026, 5, 12, 12), "daily", AMS, utc(2026, 5, 11, 22), 24 * H),
    (utc(2026, 5, 11, 22), "daily", AMS, utc(2026, 5, 11, 22), 24 * H),  # start is inside
    (utc(2026, 5, 12, 21, 59, 59, 999999), "daily", AMS, utc(2026, 5, 11, 22), 24 * H),
    (utc(2026, 5, 12, 22), "daily", AMS, utc(2026, 5, 12, 22), 24 * H),  # end is not
    (utc(2026, 3, 29, 12), "daily", AMS, utc(2026, 3, 28, 23), 23 * H),  # spring forward
    (utc(2026, 10, 25, 12), "daily", AMS, utc(2026, 10, 24, 22), 25 * H),  # fall back
    (utc(2026, 10, 25, 0, 30), "daily", AMS, utc(2026, 10, 24, 22), 25 * H),
    (utc(2026, 10, 25, 1, 30), "daily", AMS, utc(2026, 10, 24, 22), 25 * H),
    (utc(2026, 5, 12, 9, 41), "hourly", AMS, utc(2026, 5, 12, 9), H),
    (utc(2026, 3, 29, 0, 59), "hourly", AMS, utc(2026, 3, 29, 0), H),  # 01:59 CET
    (utc(2026, 3, 29, 1, 0), "hourly", AMS, utc(2026, 3, 29, 1), H),  # 03:00 CEST, right after the gap
    (utc(2026, 10, 25, 0, 30), "hourly", AMS, utc(2026, 10, 25, 0), H),  # 02:30 CEST
    (utc(2026, 10, 25, 1, 30), "hourly", AMS, utc(2026, 10, 25, 1), H),  # 02:30 CET, the repeated hour
    (utc(2026, 5, 12, 3), "daily", NYC, utc(2026, 5, 11, 4), 24 * H),  # 23:00 on the 11th in New York
    (utc(2026, 3, 8, 12), "daily", NYC, utc(2026, 3, 8, 5), 23 * H),
    (utc(2026, 11, 1, 12), "daily", NYC, utc(2026, 11, 1, 4), 25 * H),
    (utc(2026, 11, 1, 5, 30), "hourly", NYC, utc(2026, 11, 1, 5), H),  # 01:30 EDT
    (utc(2026, 11, 1, 6, 30), "hourly", NYC, utc(2026, 11, 1, 6), H),  # 01:30 EST
    (utc(2026, 5, 12, 4, 45), "hourly", KOLKATA, utc(2026, 5, 12, 4, 30), H),  # 10:15 IST
    (utc(2026, 5, 12, 4, 45), "daily", KOLKATA, utc(2026, 5, 11, 18, 30), 24 * H),
    # Lord Howe shifts by 30 minutes: the hours around the change are shorter than 60.
    (utc(2026, 4, 4, 14, 45), "hourly", LORD_HOWE, utc(2026, 4, 4, 14), H),  # 01:45 +11
    (utc(2026, 4, 4, 15, 15), "hourly", LORD_HOWE, utc(2026, 4, 4, 15), H / 2),  # 01:45 +10:30, repeated
    (utc(2026, 10, 3, 15, 15), "hourly", LORD_HOWE, utc(2026, 10, 3, 14, 30), H),  # 01:45 +10:30
    (utc(2026, 10, 3, 15, 45), "hourly", LORD_HOWE, utc(2026, 10, 3, 15, 30), H / 2),  # 02:45 +11
]


@pytest.mark.parametrize("instant, period, tz, start, length", WINDOWS)
def test_digest_window_returns_the_utc_bounds_of_the_local_day_or_hour(instant, period, tz, start, length):
    assert digest_window(instant, period, tz) == (start, start + length)


def test_the_repeated_fall_back_hour_is_two_windows_with_two_keys():
    first = digest_window(utc(2026, 10, 25, 0, 30), "hourly", AMS)
    second = digest_window(utc(2026, 10, 25, 1, 30), "hourly", AMS)
    assert first[0].astimezone(AMS).hour == second[0].astimezone(AMS).hour == 2
    assert first[1] == second[0]
    assert digest_key(7, "email", "hourly", first[0]) != digest_key(7, "email", "hourly", second[0])


def test_the_instant_may_be_given_in_any_zone():
    local = datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=AMS)
    assert digest_window(local, "hourly", AMS) == (utc(2026, 10, 25, 1), utc(2026, 10, 25, 2))


@pytest.mark.parametrize("day, period, count", [
    ("2026-03-29", "daily", 1), ("2026-03-29", "hourly", 23),
    ("2026-10-25", "daily", 1), ("2026-10-25", "hourly", 25),
    ("2026-05-12", "hourly", 24),
])
def test_windows_between_covers_a_local_day_without_gaps_or_overlaps(day, period, count):
    start, end = digest_window(datetime.fromisoformat(f"{day}T12:00:00+00:00"), "daily", AMS)
    windows = list(windows_between(start, end, period, AMS))
    assert len(windows) == count
    assert windows[0][0] == start and windows[-1][1] == end
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))


@pytest.mark.parametrize("zone", ["Europe/Amsterdam", "America/New_York", "Asia/Kolkata", "Asia/Kathmandu",
                                  "Australia/Lord_Howe", "America/Santiago", "Pacific/Chatham", "America/St_Johns"])
def test_a_year_of_days_in_many_zones_tiles_time(zone):
    tz = ZoneInfo(zone)
    days = list(windows_between(utc(2026, 1, 1), utc(2027, 1, 1), "daily", tz))
    assert all(a[1] == b[0] for a, b in zip(days, days[1:]))
    assert all(s.astimezone(tz).date() == (e - timedelta(microseconds=1)).astimezone(tz).date() for s, e in days)
    assert {e - s for s, e in days} <= {22 * H, 22.5 * H, 23 * H, 23.5 * H, 24 * H, 24.5 * H, 25 * H}


def test_windows_between_an_empty_range_yields_nothing():
    assert list(windows_between(utc(2026, 5, 12, 9), utc(2026, 5, 12, 9), "hourly", AMS)) == []


def test_a_naive_instant_or_an_unknown_period_is_refused():
    with pytest.raises(ValueError, match="timezone-aware"):
        digest_window(datetime(2026, 5, 12, 9), "daily", AMS)
    with pytest.raises(ValueError, match="weekly"):
        digest_window(utc(2026, 5, 12, 9), "weekly", AMS)


# --- period, zone and key -------------------------------------------------------------------

@pytest.mark.parametrize("user_period, plan, plans, default, expected", [
    ("hourly", "pro", "pro", "daily", "hourly"),
    ("hourly", "free", "pro", "daily", "daily"),  # the plan does not allow it
    ("hourly", "pro", "", "daily", "daily"),  # no plan does
    ("daily", "pro", "pro", "daily", "daily"),
    (None, "pro", "pro,team", "daily", "daily"),
    (None, "free", "", "hourly", "hourly"),  # the app default applies to everyone else
    ("daily", "pro", "pro", "hourly", "hourly"),
    ("hourly", "team", "pro, team", "daily", "hourly"),
])
def test_resolve_period(user_period, plan, plans, default, expected):
    settings = Settings.from_env({"ALERTS_HOURLY_DIGEST_PLANS": plans, "ALERTS_DIGEST_PERIOD": default})
    assert resolve_period(user_period, plan, settings) == expected


@pytest.mark.parametrize("name, expected", [
    ("America/New_York", "America/New_York"),
    (" Asia/Kolkata ", "Asia/Kolkata"),
    (None, "Europe/Amsterdam"),
    ("", "Europe/Amsterdam"),
    ("Mars/Olympus_Mons", "Europe/Amsterdam"),
    ("../../etc/passwd", "Europe/Amsterdam"),
    ("Europe", "Europe/Amsterdam"),
])
def test_resolve_timezone_falls_back_to_the_app_zone(name, expected):
    assert resolve_timezone(name, Settings.from_env({})).key == expected


def test_digest_keys_are_deterministic_and_name_the_window_and_follow_up():
    start = utc(2026, 5, 11, 22)
    assert digest_key(42, "email", "daily", start) == "42:email:daily:2026-05-11T22:00:00Z"
    assert digest_key(42, "email", "daily", start.astimezone(AMS)) == digest_key(42, "email", "daily", start)
    assert digest_key(42, "email", "daily", start, sequence=2) == "42:email:daily:2026-05-11T22:00:00Z#2"
    assert format_window_start(start) == "2026-05-11T22:00:00Z"


def test_digest_keys_differ_for_every_window_user_channel_and_period():
    starts = [s for s, _ in windows_between(utc(2026, 10, 24), utc(2026, 10, 27), "hourly", AMS)]
    keys = {digest_key(u, c, p, s) for u in (1, 12) for c in ("email", "telegram") for p in ("daily", "hourly")
            for s in starts}
    assert len(keys) == 2 * 2 * 2 * len(starts)
    assert digest_key(1, "email", "daily", starts[0]) != digest_key(11, "email", "daily", starts[0])


# --- the same answers as PostgreSQL's own time zone arithmetic ------------------------------

DST_DAYS = [utc(2026, 3, 28, 12), utc(2026, 10, 24, 12), utc(2026, 3, 7, 12), utc(2026, 10, 31, 12)]
PG_DAILY = """
    SELECT ts, date_trunc('day', ts AT TIME ZONE :tz) AT TIME ZONE :tz,
           (date_trunc('day', ts AT TIME ZONE :tz) + interval '1 day') AT TIME ZONE :tz
    FROM unnest(CAST(:instants AS timestamptz[])) AS ts"""
# Subtracting the local minutes and seconds keeps the two repeated hours apart.
PG_HOURLY = """
    SELECT ts, ts - ((ts AT TIME ZONE :tz) - date_trunc('hour', ts AT TIME ZONE :tz)),
           ts - ((ts AT TIME ZONE :tz) - date_trunc('hour', ts AT TIME ZONE :tz)) + interval '1 hour'
    FROM unnest(CAST(:instants AS timestamptz[])) AS ts"""


@pytest.mark.parametrize("zone", ["Europe/Amsterdam", "America/New_York", "Asia/Kolkata"])
@pytest.mark.parametrize("period, sql", [("daily", PG_DAILY), ("hourly", PG_HOURLY)])
def test_windows_agree_with_postgresql_at_time_zone(pg_url, zone, period, sql):
    # Every 7 minutes 13 seconds over three days around each DST change of both zones.
    instants = [day + timedelta(seconds=433 * i) for day in DST_DAYS for i in range(-300, 300)]
    engine = make_engine(pg_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(sql), {"tz": zone, "instants": instants}).all()
    engine.dispose()
    tz = ZoneInfo(zone)
    assert len(rows) == len(instants)
    mismatches = [(ts, (start, end), digest_window(ts, period, tz)) for ts, start, end in rows
                  if digest_window(ts, period, tz) != (start, end)]
    assert mismatches == []


# --- daily windows ending at a send time (docs/policy.md) ---------------------------------------

SYDNEY = ZoneInfo("Australia/Sydney")
M = timedelta(minutes=1)

SEND_TIME_WINDOWS = [
    # instant (UTC), zone, send time, expected start (UTC), expected length
    (utc(2026, 5, 12, 12), AMS, time(7, 30), utc(2026, 5, 12, 5, 30), 24 * H),  # 14:00 CEST
    (utc(2026, 5, 12, 5), AMS, time(7, 30), utc(2026, 5, 11, 5, 30), 24 * H),  # 07:00: yesterday's window
    (utc(2026, 5, 12, 5, 30), AMS, time(7, 30), utc(2026, 5, 12, 5, 30), 24 * H),  # the start is inside
    (utc(2026, 5, 12, 12), AMS, time(0), utc(2026, 5, 11, 22), 24 * H),  # 00:00 is the calendar day
    (utc(2026, 5, 12, 21, 58), AMS, time(23, 59), utc(2026, 5, 11, 21, 59), 24 * H),
    # Europe/Amsterdam, spring forward on 29 March (02:00 CET -> 03:00 CEST, 01:00 UTC).
    (utc(2026, 3, 29, 3), AMS, time(7, 30), utc(2026, 3, 28, 6, 30), 23 * H),
    (utc(2026, 3, 29, 0, 59), AMS, time(2, 30), utc(2026, 3, 28, 1, 30), 23.5 * H),  # 02:30 is in the gap...
    (utc(2026, 3, 29, 1), AMS, time(2, 30), utc(2026, 3, 29, 1), 23.5 * H),  # ...so the day starts at 03:00
    (utc(2026, 3, 29, 1), AMS, time(2), utc(2026, 3, 29, 1), 23 * H),
    (utc(2026, 3, 29, 0, 30), AMS, time(2), utc(2026, 3, 28, 1), 24 * H),
    (utc(2026, 3, 29, 1), AMS, time(3), utc(2026, 3, 29, 1), 24 * H),  # 03:00, right after the gap
    # Europe/Amsterdam, fall back on 25 October (03:00 CEST -> 02:00 CET, 01:00 UTC).
    (utc(2026, 10, 25, 2), AMS, time(7, 30), utc(2026, 10, 24, 5, 30), 25 * H),
    (utc(2026, 10, 25, 0, 30), AMS, time(2, 30), utc(2026, 10, 25, 0, 30), 25 * H),  # the first 02:30 counts
    (utc(2026, 10, 25, 1, 30), AMS, time(2, 30), utc(2026, 10, 25, 0, 30), 25 * H),  # the second is inside
    (utc(2026, 10, 25, 0, 29), AMS, time(2, 30), utc(2026, 10, 24, 0, 30), 24 * H),
    (utc(2026, 10, 25, 0, 30), AMS, time(0), utc(2026, 10, 24, 22), 25 * H),
    # America/New_York, spring forward on 8 March (02:00 EST -> 03:00 EDT, 07:00 UTC).
    (utc(2026, 3, 8, 6), NYC, time(7, 30), utc(2026, 3, 7, 12, 30), 23 * H),
    (utc(2026, 3, 8, 6, 59), NYC, time(2, 15), utc(2026, 3, 7, 7, 15), 23.75 * H),
    (utc(2026, 3, 8, 7), NYC, time(2, 15), utc(2026, 3, 8, 7), 23.25 * H),
    (utc(2026, 3, 8, 12), NYC, time(0), utc(2026, 3, 8, 5), 23 * H),
    # America/New_York, fall back on 1 November (02:00 EDT -> 01:00 EST, 06:00 UTC).
    (utc(2026, 11, 1, 12), NYC, time(7, 30), utc(2026, 10, 31, 11, 30), 25 * H),
    (utc(2026, 11, 1, 5, 30), NYC, time(1, 30), utc(2026, 11, 1, 5, 30), 25 * H),  # 01:30 EDT
    (utc(2026, 11, 1, 6, 30), NYC, time(1, 30), utc(2026, 11, 1, 5, 30), 25 * H),  # 01:30 EST, same window
    # Australia/Sydney, fall back on 5 April (03:00 AEDT -> 02:00 AEST, 16:00 UTC on the 4th).
    (utc(2026, 4, 4, 12), SYDNEY, time(7, 30), utc(2026, 4, 3, 20, 30), 25 * H),
    (utc(2026, 4, 4, 15, 30), SYDNEY, time(2, 30), utc(2026, 4, 4, 15, 30), 25 * H),  # 02:30 AEDT
    (utc(2026, 4, 4, 16, 30), SYDNEY, time(2, 30), utc(2026, 4, 4, 15, 30), 25 * H),  # 02:30 AEST
    # Australia/Sydney, spring forward on 4 October (02:00 AEST -> 03:00 AEDT, 16:00 UTC on the 3rd).
    (utc(2026, 10, 3, 12), SYDNEY, time(7, 30), utc(2026, 10, 2, 21, 30), 23 * H),
    (utc(2026, 10, 3, 15, 59), SYDNEY, time(2, 30), utc(2026, 10, 2, 16, 30), 23.5 * H),
    (utc(2026, 10, 3, 16), SYDNEY, time(2, 30), utc(2026, 10, 3, 16), 23.5 * H),
    (utc(2026, 10, 4, 0), SYDNEY, time(0), utc(2026, 10, 3, 14), 23 * H),
]


@pytest.mark.parametrize("instant, tz, send_time, start, length", SEND_TIME_WINDOWS)
def test_a_daily_window_runs_from_the_send_time_to_the_next_days(instant, tz, send_time, start, length):
    assert digest_window(instant, "daily", tz, send_time) == (start, start + length)


def test_hourly_windows_ignore_the_send_time():
    instant = utc(2026, 5, 12, 9, 41)
    assert digest_window(instant, "hourly", AMS, time(7, 30)) == digest_window(instant, "hourly", AMS)


TRANSITION_DAYS = [(AMS, date(2026, 3, 29)), (AMS, date(2026, 10, 25)), (NYC, date(2026, 3, 8)),
            (NYC, date(2026, 11, 1)), (SYDNEY, date(2026, 4, 5)), (SYDNEY, date(2026, 10, 4))]


@pytest.mark.parametrize("tz, day", TRANSITION_DAYS, ids=[f"{tz.key}-{day}" for tz, day in TRANSITION_DAYS])
def test_day_start_is_the_first_instant_of_the_day_showing_the_send_time_or_later(tz, day):
    """Checked against the definition itself: scan the local day minute by minute."""
    first_instant = datetime.combine(day, time(0), tzinfo=tz).astimezone(UTC) - 2 * H
    minutes = [first_instant + n * M for n in range(30 * 60)]
    for send_time in (time(h, m) for h in range(24) for m in (0, 15, 30, 45)):
        wall = datetime.combine(day, send_time)
        expected = next(x for x in minutes if x.astimezone(tz).date() == day
                        and x.astimezone(tz).replace(tzinfo=None) >= wall)
        assert day_start(day, send_time, tz) == expected, send_time


@pytest.mark.parametrize("send_time", [time(0), time(2), time(2, 30), time(3), time(7, 30), time(23, 30)])
@pytest.mark.parametrize("zone", ["Europe/Amsterdam", "America/New_York", "Australia/Sydney",
                                  "Australia/Lord_Howe", "America/Santiago"])
def test_a_year_of_send_time_windows_tiles_time(zone, send_time):
    tz = ZoneInfo(zone)
    days = list(windows_between(utc(2026, 1, 1), utc(2027, 1, 1), "daily", tz, send_time))
    assert all(a[1] == b[0] for a, b in zip(days, days[1:]))
    assert all(s == day_start(s.astimezone(tz).date(), send_time, tz) for s, _ in days)
    assert {e - s for s, e in days} <= {22 * H + k * 15 * M for k in range(4 * 4 + 1)}  # 22 h … 26 h
    assert sum(e - s == 24 * H for s, e in days) >= len(days) - 4  # only the DST days differ


@pytest.mark.parametrize("text, expected", [("07:30", time(7, 30)), ("00:00", time(0)), ("23:59", time(23, 59))])
def test_parse_time_of_day_reads_hh_mm(text, expected):
    assert parse_time_of_day(text) == expected


@pytest.mark.parametrize("text", ["7:30", "24:00", "07:60", "07-30", "0730", " 07:30", "07:3a", "", "٠٧:٣٠"])
def test_parse_time_of_day_refuses_anything_else(text):
    with pytest.raises(ValueError):
        parse_time_of_day(text)


@pytest.mark.parametrize("user_value, setting, expected", [
    ("07:30", "00:00", time(7, 30)),
    (None, "08:15", time(8, 15)),  # no send time of their own: ALERTS_DIGEST_SEND_TIME
    (None, "00:00", time(0)),
    ("7.30", "06:00", time(6)),  # a value written before the CHECK existed
])
def test_resolve_send_time_prefers_the_users_own(user_value, setting, expected):
    settings = Settings.from_env({"ALERTS_DIGEST_SEND_TIME": setting})
    assert resolve_send_time(user_value, settings) == expected


@pytest.mark.parametrize("zone, year", [("America/Goose_Bay", 2010), ("America/Havana", 2026),
                                        ("America/Santiago", 2026), ("Australia/Lord_Howe", 2026)])
@pytest.mark.parametrize("send_time", [time(0), time(0, 30), time(23, 30)])
def test_every_instant_lies_in_its_own_window_even_where_clocks_change_at_midnight(zone, year, send_time):
    tz = ZoneInfo(zone)
    instants = [utc(year, 1, 1) + n * 37 * M for n in range(365 * 24 * 60 // 37)]
    windows = [digest_window(x, "daily", tz, send_time) for x in instants]
    assert all(s <= x < e for x, (s, e) in zip(instants, windows))
