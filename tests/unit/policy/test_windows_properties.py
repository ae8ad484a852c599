"""Window math over the whole accepted range of created_at — [2000-01-01, 2100-01-01) UTC,
what intake lets through — in every IANA zone (property-based, Hypothesis).

Whatever the instant, zone, period and send time: the window holds the instant, windows
tile time without gap or overlap, a daily window is a day start to the next, an hourly
one is at most an hour, and nothing overflows at either end of the range."""
from __future__ import annotations

from datetime import datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo, available_timezones

import pytest
from hypothesis import given, strategies as st

from alerts.policy.windows import day_start, digest_key, digest_window
from tests.support.properties import properties

UTC = timezone.utc
FIRST = datetime(2000, 1, 1, tzinfo=UTC)
LAST = datetime(2100, 1, 1, tzinfo=UTC) - timedelta(microseconds=1)
ZONES = sorted(available_timezones())
TICK = timedelta(microseconds=1)

instants = st.datetimes(min_value=FIRST.replace(tzinfo=None), max_value=LAST.replace(tzinfo=None),
                        timezones=st.just(UTC))
zones = st.sampled_from(ZONES).map(ZoneInfo)
send_times = st.builds(time, st.integers(0, 23), st.integers(0, 59))
periods = st.sampled_from(["daily", "hourly"])


def check_window(t: datetime, period: str, tz: ZoneInfo, send_time: time) -> tuple[datetime, datetime]:
    start, end = digest_window(t, period, tz, send_time)
    assert start.utcoffset() == end.utcoffset() == timedelta(0)
    assert start <= t < end, (t, start, end)
    # Windows tile time: the window's own bounds lead to it and to its neighbours.
    assert digest_window(start, period, tz, send_time) == (start, end)
    assert digest_window(end - TICK, period, tz, send_time) == (start, end)
    assert digest_window(start - TICK, period, tz, send_time)[1] == start
    assert digest_window(end, period, tz, send_time)[0] == end
    if period == "hourly":
        assert timedelta(0) < end - start <= timedelta(hours=1)
        assert start.astimezone(tz).utcoffset() == (end - TICK).astimezone(tz).utcoffset()
    else:
        # 23 or 25 h on DST days; a zone that skips a whole date (Samoa, 2011) has one
        # window spanning two dates, still 24 h.
        assert timedelta(hours=12) <= end - start <= timedelta(hours=48)
        # A day start: of the start's local date, or of the date before when that date
        # had no time as late as the send time (clocks jumped past it and past midnight).
        day = start.astimezone(tz).date()
        assert start in (day_start(day, send_time, tz), day_start(day - timedelta(days=1), send_time, tz))
    assert digest_key(1, "email", period, start) != digest_key(1, "email", period, end)
    return start, end


@properties(300)
@given(t=instants, period=periods, tz=zones, send_time=send_times)
def test_any_accepted_instant_in_any_zone_gets_a_window_that_holds_it(t, period, tz, send_time):
    check_window(t, period, tz, send_time)


@pytest.mark.parametrize("name", ZONES)
def test_every_zone_has_windows_at_both_ends_of_the_accepted_range(name):
    tz = ZoneInfo(name)
    for t in (FIRST, FIRST + timedelta(hours=13), LAST - timedelta(hours=13), LAST):
        for period, send_time in (("daily", time(0)), ("daily", time(23, 59)), ("hourly", time(0))):
            check_window(t, period, tz, send_time)


def transitions(tz: ZoneInfo, year: int) -> list[datetime]:
    """The UTC instants in ``year`` when ``tz``'s offset changes (to the second)."""
    found = []
    step = timedelta(hours=3)
    at = datetime(year, 1, 1, tzinfo=UTC)
    end = min(datetime(year + 1, 1, 1, tzinfo=UTC), LAST)
    while at < end:
        nxt = min(at + step, end)
        if at.astimezone(tz).utcoffset() != nxt.astimezone(tz).utcoffset():
            lo, hi = at, nxt
            while hi - lo > timedelta(seconds=1):
                mid = lo + (hi - lo) / 2
                if mid.astimezone(tz).utcoffset() == lo.astimezone(tz).utcoffset():
                    lo = mid
                else:
                    hi = mid
            found.append(hi.replace(microsecond=0))
        at = nxt
    return found


def changes_offset(name: str) -> bool:
    """Whether the zone's offset differs between seasons of some years, or over the range."""
    tz = ZoneInfo(name)
    seen = {datetime(year, month, 1, tzinfo=UTC).astimezone(tz).utcoffset()
            for year in (2000, 2005, 2010, 2015, 2020, 2040, 2099) for month in (1, 7)}
    return len(seen) > 1


CHANGING_ZONES = [name for name in ZONES if changes_offset(name)]


@properties(120)
@given(tz=st.sampled_from(CHANGING_ZONES).map(ZoneInfo), year=st.integers(2000, 2099), send_time=send_times,
       offset=st.sampled_from([timedelta(0), -TICK, timedelta(seconds=1), timedelta(minutes=-30),
                               timedelta(minutes=30), timedelta(hours=-1), timedelta(hours=1),
                               timedelta(hours=-25), timedelta(hours=25)]))
def test_windows_around_every_offset_change_of_a_zone_and_year_tile_time(tz, year, send_time, offset):
    for change in transitions(tz, year):
        t = change + offset
        if FIRST <= t <= LAST:
            for period in ("daily", "hourly"):
                check_window(t, period, tz, send_time)
