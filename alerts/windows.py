"""Digest windows: which local day or hour an instant falls in, as UTC bounds (SPEC §4 D).

A window is the longest stretch of time over which the user's wall clock shows the same
calendar day (daily) or the same hour *at the same UTC offset* (hourly) — so a DST day is
23 h or 25 h long and the repeated fall-back hour is two windows. The usual wall-clock
arithmetic gives the bounds; they are then checked against that definition and, in the
rare zone where the arithmetic is wrong (a DST gap across midnight, Lord Howe's 30-minute
shift), found by bisection instead. Everything returned is UTC; callers build queries
and keys from these bounds only.
"""
from __future__ import annotations

import math
from datetime import datetime, time, timedelta, timezone
from typing import Callable, Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from alerts.models import DAILY, HOURLY

UTC = timezone.utc
SECOND = timedelta(seconds=1)
# Longer than any window can be, so a bisection bracket of this size holds a boundary.
_MAX_LENGTH = {DAILY: timedelta(days=3), HOURLY: timedelta(hours=3)}


def digest_window(instant: datetime, period: str, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """UTC bounds [start, end) of the ``period`` window of ``tz`` that contains ``instant``."""
    if instant.tzinfo is None:
        raise ValueError("digest_window needs a timezone-aware instant")
    if period not in _MAX_LENGTH:
        raise ValueError(f"unknown digest period {period!r}")
    t = instant.astimezone(UTC)
    key = _window_key(period, tz)
    k = key(t)
    start, end = _wall_clock_guess(t, period, tz)
    if not (start <= t and key(start) == k and key(start - SECOND) != k):
        start = _first(t - _MAX_LENGTH[period], t, lambda x: key(x) == k)
    if not (t < end and key(end - SECOND) == k and key(end) != k):
        end = _first(t, t + _MAX_LENGTH[period], lambda x: key(x) != k)
    return start, end


def windows_between(start_utc: datetime, end_utc: datetime, period: str,
                    tz: ZoneInfo) -> Iterator[tuple[datetime, datetime]]:
    """Every window that overlaps [start_utc, end_utc), in order."""
    window = digest_window(start_utc, period, tz)
    while window[0] < end_utc:
        yield window
        window = digest_window(window[1], period, tz)


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

def _window_key(period: str, tz: ZoneInfo) -> Callable[[datetime], tuple]:
    """What stays constant over one window, as seen at a UTC instant."""
    if period == DAILY:
        return lambda x: x.astimezone(tz).date()

    def hourly(x: datetime) -> tuple:
        local = x.astimezone(tz)
        return local.date(), local.hour, local.utcoffset()

    return hourly


def _wall_clock_guess(t: datetime, period: str, tz: ZoneInfo) -> tuple[datetime, datetime]:
    local = t.astimezone(tz)
    if period == DAILY:
        day = local.date()
        start = datetime.combine(day, time(0), tzinfo=tz).astimezone(UTC)
        end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=tz).astimezone(UTC)
        return start, end
    # In UTC, so the repeated fall-back hour gives two different starts.
    start = t - timedelta(minutes=local.minute, seconds=local.second, microseconds=local.microsecond)
    return start, start + timedelta(hours=1)


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
