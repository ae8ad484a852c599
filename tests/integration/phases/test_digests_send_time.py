"""Phase D with send times (docs/policy.md): daily windows end at the user's local send time,
on PostgreSQL and SQLite."""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy import event

from alerts.core import tables as m
from alerts.phases.digests import run_phase_d
from alerts.policy.windows import digest_key
from tests.support.clock import NO_CHANNELS, clock_at
from tests.support.factories import add_delivery, add_event, add_user, rows

UTC = timezone.utc


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def add_digest_delivery(conn, user_id: int, created_at: datetime, channel: str = "email") -> int:
    event_id = add_event(conn, created_at=created_at, status="fanned_out")
    return add_delivery(conn, user_id, event_id, channel=channel, delivery_kind="digest")


def built(conn) -> list[tuple]:
    """(user, window_start, window_end, next_retry_at, digest_key, item delivery ids) per digest."""
    i = m.user_alert_digest_items
    found = []
    for g in rows(conn, m.user_alert_digests):
        items = sorted(conn.execute(sa.select(i.c.delivery_id).where(i.c.digest_id == g["id"])).scalars())
        found.append((g["user_id"], g["window_start"], g["window_end"], g["next_retry_at"], g["digest_key"], items))
    return sorted(found)


def test_a_0730_user_gets_the_24_hours_before_0730_due_at_0730(db, settings, now):
    with db.transaction() as conn:
        user = add_user(conn, digest_send_time="07:30")  # Europe/Amsterdam, CEST in May
        before = add_digest_delivery(conn, user, utc(2026, 5, 12, 5, 29))  # 07:29 local
        at = add_digest_delivery(conn, user, utc(2026, 5, 12, 5, 30))  # 07:30: the next window
        evening = add_digest_delivery(conn, user, utc(2026, 5, 12, 20))

    result = run_phase_d(db, clock_at(now), settings, NO_CHANNELS)

    assert result == {"digests_created": 2, "digest_items_attached": 3, "deliveries_marked_batched": 3}
    with db.engine.connect() as conn:
        assert built(conn) == [
            (user, utc(2026, 5, 11, 5, 30), utc(2026, 5, 12, 5, 30), utc(2026, 5, 12, 5, 30),
             f"{user}:email:daily:2026-05-11T05:30:00Z", [before]),
            (user, utc(2026, 5, 12, 5, 30), utc(2026, 5, 13, 5, 30), utc(2026, 5, 13, 5, 30),
             digest_key(user, "email", "daily", utc(2026, 5, 12, 5, 30)), [at, evening]),
        ]


def test_users_without_a_send_time_use_alerts_digest_send_time(db, settings, now):
    settings = replace(settings, digest_send_time="08:00")
    with db.transaction() as conn:
        default = add_user(conn)
        own = add_user(conn, digest_send_time="06:00", timezone="America/New_York")
        for user in (default, own):
            add_digest_delivery(conn, user, utc(2026, 5, 12, 11))  # 13:00 CEST, 07:00 EDT

    run_phase_d(db, clock_at(now), settings, NO_CHANNELS)

    with db.engine.connect() as conn:
        windows = [(user, start, end) for user, start, end, *_ in built(conn)]
    assert windows == [(default, utc(2026, 5, 12, 6), utc(2026, 5, 13, 6)),  # 08:00 CEST
                       (own, utc(2026, 5, 12, 10), utc(2026, 5, 13, 10))]  # 06:00 EDT


def test_the_spring_forward_day_window_is_23_hours_and_a_gap_send_time_starts_after_the_gap(db, settings, now):
    with db.transaction() as conn:
        morning = add_user(conn, digest_send_time="07:30")
        in_gap = add_user(conn, digest_send_time="02:30")  # 02:30 does not happen on 29 March
        add_digest_delivery(conn, morning, utc(2026, 3, 29, 5))  # 07:00 CEST
        add_digest_delivery(conn, in_gap, utc(2026, 3, 29, 1))  # 03:00 CEST, right after the gap

    run_phase_d(db, clock_at(now), settings, NO_CHANNELS)

    with db.engine.connect() as conn:
        windows = {user: (start, end) for user, start, end, *_ in built(conn)}
    assert windows[morning] == (utc(2026, 3, 28, 6, 30), utc(2026, 3, 29, 5, 30))  # 07:30 CET – 07:30 CEST
    assert windows[in_gap] == (utc(2026, 3, 29, 1), utc(2026, 3, 30, 0, 30))  # 03:00 CEST – 02:30 CEST


def test_on_the_fall_back_day_the_first_repeated_send_time_counts(db, settings, now):
    with db.transaction() as conn:
        user = add_user(conn, digest_send_time="02:30")
        first = add_digest_delivery(conn, user, utc(2026, 10, 25, 0, 30))  # 02:30 CEST
        second = add_digest_delivery(conn, user, utc(2026, 10, 25, 1, 30))  # 02:30 CET: same window

    run_phase_d(db, clock_at(now), settings, NO_CHANNELS)

    with db.engine.connect() as conn:
        assert [(start, end, items) for _, start, end, _, _, items in built(conn)] == [
            (utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30), [first, second])]  # 25 h


def test_hourly_windows_ignore_the_send_time(db, settings, now):
    settings = replace(settings, hourly_digest_plans=frozenset({"pro"}))
    with db.transaction() as conn:
        user = add_user(conn, plan="pro", digest_period="hourly", digest_send_time="07:30")
        add_digest_delivery(conn, user, utc(2026, 5, 12, 9, 41))

    run_phase_d(db, clock_at(now), settings, NO_CHANNELS)

    with db.engine.connect() as conn:
        assert [(start, end) for _, start, end, *_ in built(conn)] == [(utc(2026, 5, 12, 9), utc(2026, 5, 12, 10))]


def test_changing_the_send_time_never_moves_or_empties_a_built_digest(db, settings, now):
    with db.transaction() as conn:
        user = add_user(conn, digest_send_time="08:00")
        early = add_digest_delivery(conn, user, utc(2026, 5, 12, 7))  # 09:00 CEST
    run_phase_d(db, clock_at(now), settings, NO_CHANNELS)
    with db.engine.connect() as conn:
        (old,) = built(conn)

    with db.transaction() as conn:
        conn.execute(sa.update(m.users).where(m.users.c.id == user).values(digest_send_time="18:00"))
        late = add_digest_delivery(conn, user, utc(2026, 5, 12, 9))  # 11:00: inside the old window too

    result = run_phase_d(db, clock_at(now), settings, NO_CHANNELS)

    assert result == {"digests_created": 1, "digest_items_attached": 1, "deliveries_marked_batched": 1}
    with db.engine.connect() as conn:
        assert built(conn) == sorted([
            old,  # same window, same key, same items
            (user, utc(2026, 5, 11, 16), utc(2026, 5, 12, 16), utc(2026, 5, 12, 16),
             digest_key(user, "email", "daily", utc(2026, 5, 11, 16)), [late]),
        ])
    assert old[1:3] == (utc(2026, 5, 12, 6), utc(2026, 5, 13, 6)) and old[5] == [early]


def test_two_send_times_in_one_spring_gap_share_a_start_but_not_a_digest(db, settings, now):
    """02:00 and 02:30 both start the window of 29 March at 03:00 CEST, but end it at
    different times: after a change from one to the other the new window's events go
    into a follow-up (a key of its own), never into the digest of the other window."""
    with db.transaction() as conn:
        user = add_user(conn, digest_send_time="02:00")
        early = add_digest_delivery(conn, user, utc(2026, 3, 29, 12))
    run_phase_d(db, clock_at(now), settings, NO_CHANNELS)
    with db.transaction() as conn:
        conn.execute(sa.update(m.users).where(m.users.c.id == user).values(digest_send_time="02:30"))
        late = add_digest_delivery(conn, user, utc(2026, 3, 30, 0, 15))  # 02:15 CEST on the 30th

    assert run_phase_d(db, clock_at(now), settings, NO_CHANNELS)["digests_created"] == 1

    start = utc(2026, 3, 29, 1)
    with db.engine.connect() as conn:
        assert built(conn) == [
            (user, start, utc(2026, 3, 30, 0), utc(2026, 3, 30, 0), digest_key(user, "email", "daily", start),
             [early]),
            (user, start, utc(2026, 3, 30, 0, 30), utc(2026, 3, 30, 0, 30),
             digest_key(user, "email", "daily", start, sequence=1), [late]),
        ]


def _statements_of_a_build(db, settings, now, users: list[dict]) -> int:
    with db.transaction() as conn:
        for cols in users:
            user = add_user(conn, **cols)
            for hour in (3, 9, 15, 21):
                add_digest_delivery(conn, user, utc(2026, 5, 12, hour))
    seen = []

    def count(*args):
        seen.append(1)

    event.listen(db.engine, "before_cursor_execute", count)
    try:
        assert run_phase_d(db, clock_at(now), settings, NO_CHANNELS)["deliveries_marked_batched"] == 4 * len(users)
    finally:
        event.remove(db.engine, "before_cursor_execute", count)
    return len(seen)


def test_phase_d_runs_the_same_statements_for_one_send_time_or_many(db, engine, settings, now):
    """Set-based: more users, zones and send times mean more rows, not more statements."""
    one = _statements_of_a_build(db, settings, now, [{}])
    with engine.begin() as conn:
        for table in (m.user_alert_digest_items, m.user_alert_digests, m.user_alert_deliveries):
            conn.execute(sa.delete(table))
    zones = ["Europe/Amsterdam", "America/New_York", "Asia/Kolkata", "Australia/Sydney", "America/Sao_Paulo"]
    times = [None, "06:00", "07:30", "08:00", "09:15", "12:00", "17:45", "18:00", "21:30", "23:00"]
    many = _statements_of_a_build(db, settings, now, [{"timezone": z, "digest_send_time": t} for z in zones
                                                      for t in times])
    assert many == one
