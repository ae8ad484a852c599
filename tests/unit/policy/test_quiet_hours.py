"""Quiet hours as pure functions: inside or not, and when the period ends (docs/policy.md)."""
from datetime import datetime, time, timezone
from zoneinfo import ZoneInfo

import pytest

from alerts.policy.quiet_hours import is_quiet, parse_quiet_hours, release_at

AMS = ZoneInfo("Europe/Amsterdam")
NY = ZoneInfo("America/New_York")
SYD = ZoneInfo("Australia/Sydney")
UTC = timezone.utc


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


# (case, now (UTC), quiet_hours, zone, expected release (UTC) or None when not held)
RELEASES = [
    ("inside a wrapping period, before midnight: released next morning",
     utc(2026, 5, 12, 21, 0), "22:00-07:00", AMS, utc(2026, 5, 13, 5, 0)),  # 23:00 CEST -> 07:00 CEST
    ("inside a wrapping period, after midnight: released the same morning",
     utc(2026, 5, 13, 1, 0), "22:00-07:00", AMS, utc(2026, 5, 13, 5, 0)),  # 03:00 CEST
    ("the start is inside", utc(2026, 5, 12, 20, 0), "22:00-07:00", AMS, utc(2026, 5, 13, 5, 0)),
    ("the end is not inside", utc(2026, 5, 13, 5, 0), "22:00-07:00", AMS, None),
    ("a minute before the start is outside", utc(2026, 5, 12, 19, 59), "22:00-07:00", AMS, None),
    ("the middle of the day is outside a night period", utc(2026, 5, 12, 10, 0), "22:00-07:00", AMS, None),
    ("a period within one day", utc(2026, 5, 12, 11, 0), "12:30-14:00", AMS, utc(2026, 5, 12, 12, 0)),
    ("just before a period within one day", utc(2026, 5, 12, 10, 29), "12:30-14:00", AMS, None),
    ("a period that ends at midnight", utc(2026, 5, 12, 21, 30), "23:00-00:00", AMS, utc(2026, 5, 12, 22, 0)),
    ("a period that starts at midnight", utc(2026, 5, 12, 22, 0), "00:00-06:00", AMS, utc(2026, 5, 13, 4, 0)),
    # EU spring forward, 29 March 2026: 02:00 CET -> 03:00 CEST (01:00 UTC).
    ("spring forward: the night is an hour shorter in UTC",
     utc(2026, 3, 28, 22, 0), "22:00-07:00", AMS, utc(2026, 3, 29, 5, 0)),  # 23:00 CET -> 07:00 CEST
    ("spring forward: an end inside the gap is the first instant after it",
     utc(2026, 3, 29, 0, 10), "01:00-02:30", AMS, utc(2026, 3, 29, 1, 0)),  # 01:10 CET -> 03:00 CEST
    # EU fall back, 25 October 2026: 03:00 CEST -> 02:00 CET (01:00 UTC).
    ("fall back: the night is an hour longer in UTC",
     utc(2026, 10, 24, 21, 0), "22:00-07:00", AMS, utc(2026, 10, 25, 6, 0)),  # 23:00 CEST -> 07:00 CET
    ("fall back: a repeated end time releases at its first occurrence",
     utc(2026, 10, 24, 23, 30), "01:00-02:30", AMS, utc(2026, 10, 25, 0, 30)),  # 01:30 CEST -> 02:30 CEST
    ("fall back: inside again in the repeated hour, released at the second occurrence",
     utc(2026, 10, 25, 1, 10), "02:00-02:30", AMS, utc(2026, 10, 25, 1, 30)),  # 02:10 CET -> 02:30 CET
    # US spring forward, 8 March 2026: 02:00 EST -> 03:00 EDT (07:00 UTC).
    ("US spring forward in New York", utc(2026, 3, 8, 4, 0), "22:00-07:00", NY, utc(2026, 3, 8, 11, 0)),
    # Southern hemisphere: Sydney falls back on 5 April 2026 (03:00 AEDT -> 02:00 AEST).
    ("southern fall back in Sydney", utc(2026, 4, 4, 12, 0), "22:00-07:00", SYD, utc(2026, 4, 4, 21, 0)),
    # A quiet-hour end equal to a digest send time (07:30): released at exactly 07:30,
    # the instant the user's digest window closes; 07:30 itself is not quiet.
    ("an end equal to a digest send time", utc(2026, 5, 13, 4, 0), "22:00-07:30", AMS, utc(2026, 5, 13, 5, 30)),
    ("the send time itself is not quiet", utc(2026, 5, 13, 5, 30), "22:00-07:30", AMS, None),
]


@pytest.mark.parametrize("now, quiet, tz, expected", [r[1:] for r in RELEASES], ids=[r[0] for r in RELEASES])
def test_release_at(now, quiet, tz, expected):
    assert release_at(now, quiet, tz) == expected


@pytest.mark.parametrize("local, quiet, expected", [
    (time(22, 0), "22:00-07:00", True),
    (time(6, 59), "22:00-07:00", True),
    (time(7, 0), "22:00-07:00", False),
    (time(21, 59), "22:00-07:00", False),
    (time(0, 0), "22:00-07:00", True),
    (time(12, 0), "09:00-17:00", True),
    (time(17, 0), "09:00-17:00", False),
    (time(8, 59), "09:00-17:00", False),
])
def test_is_quiet_wraps_midnight_and_excludes_the_end(local, quiet, expected):
    assert is_quiet(local, *parse_quiet_hours(quiet)) is expected


@pytest.mark.parametrize("bad", ["22:00-22:00", "22:00", "24:00-07:00", "22:60-07:00", "2200-0700",
                                 "22:00-7:00", "", "22:00–07:00", "٢٢:٠٠-07:00"])
def test_malformed_quiet_hours_are_refused(bad):
    with pytest.raises(ValueError, match="quiet hours"):
        parse_quiet_hours(bad)


def test_release_at_refuses_a_naive_instant():
    with pytest.raises(ValueError, match="timezone-aware"):
        release_at(datetime(2026, 5, 12, 23, 0), "22:00-07:00", AMS)
