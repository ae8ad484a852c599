"""Quiet hours (docs/policy.md): pure functions over a user's ``HH:MM-HH:MM`` period.

The period is local wall-clock time and may wrap midnight (``22:00-07:00``). The start
is inside it, the end is not; equal start and end is malformed. An instant delivery
created inside the period is held until its end: the first instant at or after ``now``
whose local wall-clock time is the end time. When the end time does not exist that day
(it falls in a spring-forward gap) the first instant after the gap counts, as for the
digest send time (§10.1); when it exists twice (fall-back) the first one not before
``now`` counts.
"""
from __future__ import annotations

import math
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

from alerts.core.timeofday import parse_time_of_day

UTC = timezone.utc


def parse_quiet_hours(text: str) -> tuple[time, time]:
    """(start, end) of ``HH:MM-HH:MM``; ValueError saying what is wrong."""
    start_text, sep, end_text = (text or "").partition("-")
    if not sep:
        raise ValueError(f"quiet hours must look like HH:MM-HH:MM (got {text!r})")
    start, end = _clock(start_text, text), _clock(end_text, text)
    if start == end:
        raise ValueError(f"quiet hours must not start and end at the same time (got {text!r})")
    return start, end


def is_quiet(local: time, start: time, end: time) -> bool:
    """Is the wall-clock time ``local`` inside [start, end), wrapping midnight if need be."""
    if start < end:
        return start <= local < end
    return local >= start or local < end


def release_at(now: datetime, quiet_hours: str, tz: ZoneInfo) -> datetime | None:
    """When an instant alert created at ``now`` may go out: the end of the quiet period
    ``now`` is in (UTC), or None when ``now`` is outside it."""
    if now.tzinfo is None:
        raise ValueError("release_at needs a timezone-aware instant")
    start, end = parse_quiet_hours(quiet_hours)
    local = now.astimezone(tz)
    if not is_quiet(local.time().replace(tzinfo=None), start, end):
        return None
    now_utc = now.astimezone(UTC)
    for day in (local.date(), local.date() + timedelta(days=1)):
        for candidate in _wall_clock_instants(day, end, tz):
            if candidate >= now_utc:
                return candidate
    raise AssertionError(f"no end of quiet hours {quiet_hours!r} after {now.isoformat()} in {tz.key}")


def _wall_clock_instants(day: date, at: time, tz: ZoneInfo) -> list[datetime]:
    """The UTC instants at which ``tz`` shows ``at`` on ``day``: one, two (fall-back), or
    — inside a spring-forward gap — the first instant after the gap."""
    wanted = datetime.combine(day, at)
    found = []
    for fold in (0, 1):
        instant = wanted.replace(tzinfo=tz, fold=fold).astimezone(UTC)
        if instant.astimezone(tz).replace(tzinfo=None) == wanted and instant not in found:
            found.append(instant)
    if found:
        return sorted(found)
    # A gap: fold=1 reads the time with the offset after the change (an instant before
    # the gap), fold=0 with the one before it (an instant after). Bisect between them
    # for the first second whose wall clock is at or past ``at``.
    low = math.floor(wanted.replace(tzinfo=tz, fold=1).astimezone(UTC).timestamp())
    high = math.ceil(wanted.replace(tzinfo=tz, fold=0).astimezone(UTC).timestamp())
    low, high = min(low, high), max(low, high)
    while high - low > 1:
        mid = (low + high) // 2
        if datetime.fromtimestamp(mid, UTC).astimezone(tz).replace(tzinfo=None) >= wanted:
            high = mid
        else:
            low = mid
    return [datetime.fromtimestamp(high, UTC)]


def _clock(part: str, whole: str) -> time:
    try:
        return parse_time_of_day(part)
    except ValueError:
        raise ValueError(f"quiet hours must look like HH:MM-HH:MM (got {whole!r})") from None
