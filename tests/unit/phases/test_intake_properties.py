"""Intake's rules on arbitrary producer input (property-based, Hypothesis): the verdict
never raises, names only known fields, and matches each rule exactly."""
from __future__ import annotations

import unicodedata
from datetime import datetime, timedelta, timezone

from hypothesis import given, strategies as st

from alerts.phases.intake import (CREATED_AT_FROM, CREATED_AT_UNTIL, MAX_ALERT_TYPE_CHARS, MAX_REGION_CHARS,
                                  normalise, one_line_title, validate_event)
from tests.support.properties import properties

GOOD = {"title": "TTF day-ahead +18%", "severity": 3, "alert_type": "price_spike", "region": "NL",
        "url": "https://energyriskiq.com/e/1", "summary": "Cold snap", "collapse_key": None,
        "created_at": datetime(2026, 5, 12, 9, tzinfo=timezone.utc)}
FIELDS = {"title", "severity", "alert_type", "region", "url", "summary", "collapse_key", "created_at"}

char = st.characters(blacklist_categories=("Cs",))
controls = st.sampled_from([chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]])
text = st.one_of(st.text(char, max_size=100),
                 st.tuples(st.text(char, min_size=1, max_size=3), st.integers(1, 3000)).map(lambda p: p[0] * p[1]),
                 st.lists(st.one_of(st.text(char, max_size=5), controls), max_size=80).map("".join))
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                           max_leaves=5)
offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
any_time = st.datetimes(timezones=offsets).filter(lambda t: 1 < t.year < 9999)


def reason_of(field: str, reason: str | None) -> str | None:
    parts = [p for p in (reason or "").split("; ") if p.startswith(field + ": ")]
    return parts[0] if parts else None


@properties(150)
@given(row=st.fixed_dictionaries({}, optional={field: st.one_of(json_values, any_time) for field in FIELDS}))
def test_any_row_gets_a_verdict_naming_only_known_fields(row):
    reason = validate_event(row)

    if reason is not None:
        assert {part.split(":")[0] for part in reason.split("; ")} <= FIELDS
    else:
        normalised = normalise(row)
        assert "\n" not in normalised["title"] and normalised["title"] == one_line_title(row["title"])


@properties(300)
@given(region=st.one_of(st.none(), text))
def test_a_region_is_rejected_exactly_when_too_long_or_holding_a_control_character(region):
    bad = region is not None and (len(region) > MAX_REGION_CHARS
                                  or any(unicodedata.category(c) == "Cc" for c in region))

    reason = reason_of("region", validate_event({**GOOD, "region": region}))

    assert (reason is not None) == bad, reason
    assert validate_event({**GOOD, "region": region}) == reason


@properties(300)
@given(alert_type=st.one_of(st.text(st.sampled_from("abc_.-9"), min_size=1, max_size=200), text))
def test_an_alert_type_over_64_characters_is_rejected_for_its_length(alert_type):
    reason = reason_of("alert_type", validate_event({**GOOD, "alert_type": alert_type}))

    if len(alert_type.strip()) > MAX_ALERT_TYPE_CHARS:
        assert reason == f"alert_type: longer than {MAX_ALERT_TYPE_CHARS} characters"
    elif alert_type.strip() and set(alert_type.strip()) <= set("abcdefghijklmnopqrstuvwxyz0123456789_.-"):
        assert reason is None


@properties(300)
@given(at=st.one_of(any_time, st.datetimes(min_value=datetime(1999, 12, 31), max_value=datetime(2000, 1, 2),
                                            timezones=offsets),
                    st.datetimes(min_value=datetime(2099, 12, 31), max_value=datetime(2100, 1, 2),
                                 timezones=offsets)))
def test_created_at_is_accepted_exactly_from_2000_up_to_2100_utc(at):
    reason = reason_of("created_at", validate_event({**GOOD, "created_at": at}))

    assert (reason is None) == (CREATED_AT_FROM <= at < CREATED_AT_UNTIL), (at, reason)
