"""Digest windows: which local day or hour an instant falls in, as UTC bounds (docs/policy.md).

A daily window runs from the user's send time T on one local day to T on the next
(T = 00:00 gives the calendar day): its bounds are *day starts*, the first instant of a
local day whose wall-clock time is ≥ T — so a T inside a spring-forward gap falls on the
first instant after the gap, on a fall-back day the first of the repeated times counts,
and a DST day is 23 h or 25 h long. An hourly window is the longest stretch of time over
which the wall clock shows the same hour *at the same UTC offset*, so the repeated
fall-back hour is two windows. The usual wall-clock arithmetic gives the bounds; where
it is wrong (a gap, Lord Howe's 30-minute shift) they are found by bisection instead.
Everything returned is UTC; callers build queries and keys from these bounds only.
"""
from __future__ import annotations

import math
from datetime import date, datetime, time, timedelta, timezone
from typing import Callable, Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from alerts.core.tables import DAILY, HOURLY
from alerts.core.timeofday import parse_time_of_day  # noqa: F401 (re-exported for callers of the policy)

UTC = timezone.utc
SECOND = timedelta(seconds=1)
MIDNIGHT = time(0)
# Longer than an hourly window can be, so a bisection bracket of this size holds a boundary.
_HOUR_MAX_LENGTH = timedelta(hours=3)


def digest_window(instant: datetime, period: str, tz: ZoneInfo,
                  send_time: time = MIDNIGHT) -> tuple[datetime, datetime]:
    """UTC bounds [start, end) of the ``period`` window of ``tz`` that contains ``instant``;
    a daily window starts and ends at ``send_time`` (hourly windows ignore it)."""
    if instant.tzinfo is None:
        raise ValueError("digest_window needs a timezone-aware instant")
    if period not in (DAILY, HOURLY):
        raise ValueError(f"unknown digest period {period!r}")
    t = instant.astimezone(UTC)
    if period == DAILY:
        return _daily_window(t, tz, send_time)
    key = _hour_key(tz)
    k = key(t)
    local = t.astimezone(tz)
    start = t - timedelta(minutes=local.minute, seconds=local.second, microseconds=local.microsecond)
    end = start + timedelta(hours=1)  # in UTC, so the repeated fall-back hour gives two starts
    if not (start <= t and key(start) == k and key(start - SECOND) != k):
        start = _first(t - _HOUR_MAX_LENGTH, t, lambda x: key(x) == k)
    if not (t < end and key(end - SECOND) == k and key(end) != k):
        end = _first(t, t + _HOUR_MAX_LENGTH, lambda x: key(x) != k)
    return start, end


def day_start(day: date, send_time: time, tz: ZoneInfo) -> datetime:
    """The first instant of local ``day`` whose wall-clock time is ≥ ``send_time``, in UTC:
    the bound between the daily window before it and the one starting on ``day``."""
    wall = datetime.combine(day, send_time)
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)  # fold=0: the first of repeated times
    if first.astimezone(tz).replace(tzinfo=None) == wall:
        return first
    # ``wall`` falls in a gap: fold=1 reads it with the offset after the gap (an instant
    # before it), fold=0 with the one before (an instant after it); the end lies between.
    before = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    return _first(before, first, lambda x: x.astimezone(tz).replace(tzinfo=None) >= wall)


def windows_between(start_utc: datetime, end_utc: datetime, period: str, tz: ZoneInfo,
                    send_time: time = MIDNIGHT) -> Iterator[tuple[datetime, datetime]]:
    """Every window that overlaps [start_utc, end_utc), in order."""
    window = digest_window(start_utc, period, tz, send_time)
    while window[0] < end_utc:
        yield window
        window = digest_window(window[1], period, tz, send_time)


def resolve_send_time(user_send_time: str | None, settings) -> time:
    """The user's digest send time, else ALERTS_DIGEST_SEND_TIME. The database refuses a
    malformed value; one written before its CHECK existed falls back, like a bad zone."""
    for text in (user_send_time, settings.digest_send_time):
        try:
            return parse_time_of_day(text)
        except (TypeError, ValueError):
            continue
    return MIDNIGHT


def resolve_period(user_digest_period: str | None, user_plan: str | None, settings) -> str:
    """Hourly only for users who asked for it and whose plan allows it."""
    if user_digest_period == HOURLY and user_plan in settings.hourly_digest_plans:
        return HOURLY
    return settings.digest_period


def resolve_timezone(name: str | None, settings) -> ZoneInfo:
    """The user's zone; null, blank or unknown names fall back to ALERTS_TIMEZONE so one
    bad row cannot stop the digest build."""
    if name and name.strip():
        try:
            return ZoneInfo(name.strip())
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    return settings.tz


def format_window_start(window_start_utc: datetime) -> str:
    """The window start as it appears in digest keys, e.g. ``2026-05-11T22:00:00Z``."""
    return window_start_utc.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def digest_key(user_id: int, channel: str, period: str, window_start_utc: datetime, sequence: int = 0) -> str:
    """Deterministic and distinct per window; a follow-up digest for the same window
    (its first digest had already left ``queued``) carries ``#<sequence>``."""
    key = f"{user_id}:{channel}:{period}:{format_window_start(window_start_utc)}"
    return f"{key}#{sequence}" if sequence else key


# --- internals ---------------------------------------------------------------------------

def _daily_window(t: datetime, tz: ZoneInfo, send_time: time) -> tuple[datetime, datetime]:
    day = t.astimezone(tz).date()
    start = day_start(day, send_time, tz)
    if t < start:  # before today's send time: the window that began yesterday
        return day_start(day - timedelta(days=1), send_time, tz), start
    end = day_start(day + timedelta(days=1), send_time, tz)
    while end <= t:  # clocks went back across midnight (Goose Bay, 2010): tomorrow began already
        day += timedelta(days=1)
        start, end = end, day_start(day + timedelta(days=1), send_time, tz)
    return start, end


def _hour_key(tz: ZoneInfo) -> Callable[[datetime], tuple]:
    """What stays constant over one hourly window, as seen at a UTC instant."""
    def hourly(x: datetime) -> tuple:
        local = x.astimezone(tz)
        return local.date(), local.hour, local.utcoffset()

    return hourly


def _first(lo: datetime, hi: datetime, predicate: Callable[[datetime], bool]) -> datetime:
    """The first whole UTC second in (lo, hi] where ``predicate`` holds; it must be false
    at lo and stay true once true. Zone transitions fall on whole seconds."""
    low, high = math.floor(lo.timestamp()), math.floor(hi.timestamp())
    while high - low > 1:
        mid = (low + high) // 2
        if predicate(datetime.fromtimestamp(mid, UTC)):
            high = mid
        else:
            low = mid
    return datetime.fromtimestamp(high, UTC)
