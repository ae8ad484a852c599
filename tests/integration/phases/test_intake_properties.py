"""Phase A judges created_at in SQL (property-based, Hypothesis, both databases): any time
a column can hold — year 1 to 9999, and PostgreSQL's infinity and years past 9999 that
the driver cannot even read — is accepted exactly when it lies in [2000-01-01, 2100-01-01)
UTC, and one such row never stops the others of its batch."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import sqlalchemy as sa
from hypothesis import given, strategies as st

from alerts.core import tables as m
from alerts.core.db import Database, make_engine
from alerts.core.settings import Settings
from alerts.phases.intake import CREATED_AT_FROM, CREATED_AT_UNTIL, run_phase_a
from tests.support.clock import NO_CHANNELS, clock_at
from tests.support.properties import properties

UTC = timezone.utc
NOW = datetime(2026, 5, 12, 12, tzinfo=UTC)
offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
near_bounds = st.sampled_from([CREATED_AT_FROM, CREATED_AT_UNTIL]).flatmap(
    lambda bound: st.integers(-10**6, 10**6).map(lambda us: bound + timedelta(microseconds=us)))
times = st.one_of(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=offsets),
    near_bounds,
    st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2110, 1, 1), timezones=st.just(UTC)),
)
# What only a plain INSERT on PostgreSQL can write (psycopg cannot read them back).
PG_ONLY = ["infinity", "-infinity", "10000-01-01 00:00:00+00", "294276-12-31 00:00:00+00",
           "0001-01-01 00:00:00+00 BC", "4713-01-01 00:00:00+00 BC"]


def store(conn, values: list) -> list[int]:
    ids = []
    for n, value in enumerate(values):
        row = {"event_key": f"e{n}", "alert_type": "price_spike", "severity": 3, "title": f"Event {n}"}
        if isinstance(value, datetime):
            row["created_at"] = value
        event_id = conn.execute(sa.insert(m.alert_events).values(**row).returning(m.alert_events.c.id)).scalar_one()
        if isinstance(value, str):
            conn.execute(sa.text("UPDATE alert_events SET created_at = CAST(:v AS timestamptz) WHERE id = :id"),
                         {"v": value, "id": event_id})
        ids.append(event_id)
    return ids


def verdicts(conn) -> dict[int, tuple[str, str | None]]:
    e = m.alert_events
    return {r.id: (r.status, r.reject_reason) for r in conn.execute(sa.select(e.c.id, e.c.status, e.c.reject_reason))}


def expected_ready(value) -> bool:
    return isinstance(value, datetime) and CREATED_AT_FROM <= value < CREATED_AT_UNTIL


def judge_batch(db, settings, engine, values: list) -> None:
    with engine.begin() as conn:
        conn.execute(sa.delete(m.alert_events))
        ids = store(conn, values)

    counts = run_phase_a(db, clock_at(NOW), settings, NO_CHANNELS)

    with engine.connect() as conn:
        found = verdicts(conn)
    assert counts == {"accepted": sum(map(expected_ready, values)),
                      "rejected": len(values) - sum(map(expected_ready, values))}
    for event_id, value in zip(ids, values):
        status, reason = found[event_id]
        if expected_ready(value):
            assert (status, reason) == ("ready", None), value
        else:
            assert status == "rejected" and reason.startswith("created_at: "), (value, reason)


@properties(25)
@given(values=st.lists(times, min_size=1, max_size=12))
def test_any_time_a_column_holds_is_accepted_exactly_inside_the_range(db, settings, engine, values):
    judge_batch(db, settings, engine, values)


@properties(25)
@given(values=st.lists(st.one_of(times, st.sampled_from(PG_ONLY)), min_size=1, max_size=12))
def test_times_the_driver_cannot_read_are_rejected_next_to_good_ones(pg_url, values):
    engine = make_engine(pg_url)
    try:
        judge_batch(Database(engine), Settings.from_env({"DATABASE_URL": pg_url}), engine, values)
    finally:
        engine.dispose()
