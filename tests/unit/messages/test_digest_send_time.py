"""Digest messages for windows that end at a send time (docs/policy.md): the header names both
bounds when the send time is not midnight, the subject the local date of the start."""
from __future__ import annotations

from datetime import datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from alerts.core.settings import Settings
from alerts.messages import render_digest, window_label
from alerts.policy.windows import digest_window
from tests.support.telegram_html import parse_telegram_html

UTC = timezone.utc
AMS, NYC = ZoneInfo("Europe/Amsterdam"), ZoneInfo("America/New_York")
SETTINGS = Settings.from_env({})


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def window_of(instant: datetime, tz: ZoneInfo, send_time: time) -> tuple[datetime, datetime]:
    return digest_window(instant, "daily", tz, send_time)


@pytest.mark.parametrize("instant, tz, send_time, label", [
    (utc(2026, 5, 12, 12), AMS, time(8), "Tue 12 May 08:00 – Wed 13 May 08:00 Europe/Amsterdam"),
    (utc(2026, 5, 12, 5), AMS, time(7, 30), "Mon 11 May 07:30 – Tue 12 May 07:30 Europe/Amsterdam"),
    (utc(2026, 5, 12, 5), NYC, time(7, 30), "Mon 11 May 07:30 – Tue 12 May 07:30 America/New_York"),
    # DST days: offsets on both bounds and the real length.
    (utc(2026, 3, 29, 3), AMS, time(7, 30),
     "Sat 28 Mar 07:30 (UTC+01:00) – Sun 29 Mar 07:30 (UTC+02:00) Europe/Amsterdam, 23 h"),
    (utc(2026, 10, 25, 12), AMS, time(2, 30),  # the first of the two 02:30s
     "Sun 25 Oct 02:30 (UTC+02:00) – Mon 26 Oct 02:30 (UTC+01:00) Europe/Amsterdam, 25 h"),
    (utc(2026, 3, 29, 12), AMS, time(2, 30),  # 02:30 does not happen: the window starts at 03:00
     "Sun 29 Mar 03:00 – Mon 30 Mar 02:30 Europe/Amsterdam, 23.5 h"),
    # Midnight keeps the calendar-day header of §5.
    (utc(2026, 5, 12, 12), AMS, time(0), "Tuesday 12 May 2026, 00:00–24:00 Europe/Amsterdam"),
])
def test_the_header_names_both_bounds_when_the_send_time_is_not_midnight(instant, tz, send_time, label):
    assert window_label(*window_of(instant, tz, send_time), tz) == label


def _digest(start: datetime, end: datetime, tz: ZoneInfo) -> dict:
    return {"id": 1, "digest_key": f"1:email:daily:{start:%Y-%m-%dT%H:%M:%SZ}", "user_id": 1, "channel": "email",
            "period": "daily", "window_start": start, "window_end": end, "timezone": tz.key}


def _events(start: datetime, n: int) -> list[dict]:
    return [{"id": i, "event_key": f"e{i}", "alert_type": "pipeline_outage", "region": "NL", "severity": 3,
             "title": f"Event {i}", "summary": "Flows down", "url": None, "created_at": start + timedelta(hours=i)}
            for i in range(1, n + 1)]


def test_email_subject_names_the_local_date_of_the_start_and_both_parts_the_bounds():
    start, end = window_of(utc(2026, 5, 12, 12), AMS, time(8))  # 12 May 06:00 – 13 May 06:00 UTC
    message = render_digest("email", _digest(start, end, AMS), _events(start, 2), settings=SETTINGS)
    assert message.subject == "EnergyRiskIQ daily digest — 2026-05-12 (2 alerts)"
    label = "Tue 12 May 08:00 – Wed 13 May 08:00 Europe/Amsterdam"
    assert label in message.text and label in message.html


def test_the_subject_date_is_local_even_when_the_start_is_the_day_before_in_utc():
    start, end = window_of(utc(2026, 5, 12, 12), AMS, time(0, 30))  # starts 11 May 22:30 UTC
    assert start == utc(2026, 5, 11, 22, 30)
    message = render_digest("email", _digest(start, end, AMS), _events(start, 1), settings=SETTINGS)
    assert message.subject == "EnergyRiskIQ daily digest — 2026-05-12 (1 alert)"


def test_telegram_header_names_both_bounds_in_valid_telegram_html():
    start, end = window_of(utc(2026, 5, 12, 12), AMS, time(7, 30))
    message = render_digest("telegram", _digest(start, end, AMS), _events(start, 3), settings=SETTINGS)
    text = parse_telegram_html(message.text)
    assert "Tue 12 May 07:30 – Wed 13 May 07:30 Europe/Amsterdam" in text
