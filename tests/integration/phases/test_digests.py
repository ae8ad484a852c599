"""Phase D — digest build (docs/architecture.md), on PostgreSQL and SQLite."""
from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from alerts.core import tables as m
from alerts.core.settings import Settings
from alerts.core.db import Database, make_engine
from alerts.phases.digests import run_phase_d
from alerts.sending.outbox import DIGESTS
from alerts.policy.windows import digest_key
from tests.support.factories import add_delivery, add_event, add_user, rows
from tests.support.clock import NO_CHANNELS, clock_at

UTC = timezone.utc
AMS_MAY_12 = (datetime(2026, 5, 11, 22, tzinfo=UTC), datetime(2026, 5, 12, 22, tzinfo=UTC))
NOTHING = {"digests_created": 0, "digest_items_attached": 0, "deliveries_marked_batched": 0}


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def add_digest_delivery(conn, user_id: int, created_at: datetime, channel: str = "email", **cols) -> int:
    """A fanned-out event and the queued digest delivery Phase B would have made for it."""
    event_id = add_event(conn, created_at=created_at, status="fanned_out")
    return add_delivery(conn, user_id, event_id, channel=channel, delivery_kind="digest", **cols)


def counts(created: int, attached: int, batched: int | None = None) -> dict:
    return {"digests_created": created, "digest_items_attached": attached,
            "deliveries_marked_batched": attached if batched is None else batched}


def digests(conn) -> list[dict]:
    return rows(conn, m.user_alert_digests)


def items_of(conn, digest_id: int) -> list[int]:
    i = m.user_alert_digest_items
    return sorted(conn.execute(sa.select(i.c.delivery_id).where(i.c.digest_id == digest_id)).scalars())


def seed_day(db, hours=(7, 9, 15), **user_cols) -> tuple[int, list[int]]:
    """One user (Amsterdam by default) with digest deliveries for events on 12 May 2026."""
    with db.transaction() as conn:
        user = add_user(conn, **user_cols)
        deliveries = [add_digest_delivery(conn, user, utc(2026, 5, 12, h)) for h in hours]
    return user, deliveries


# --- the schema (migration 0002) -------------------------------------------------------------

def _add_digest(conn, user_id: int, **cols) -> int:
    start, end = AMS_MAY_12
    values = {"user_id": user_id, "channel": "email", "period": "daily", "window_start": start, "window_end": end,
              "digest_key": digest_key(user_id, "email", "daily", start), **cols}
    return conn.execute(sa.insert(m.user_alert_digests).values(**values).returning(m.user_alert_digests.c.id)).scalar_one()


@pytest.mark.parametrize("values", [{"channel": "sms"}, {"period": "weekly"}, {"status": "lost"},
                                    {"window_end": AMS_MAY_12[0]}])
def test_check_constraints_reject_bad_digest_values(engine, values):
    with pytest.raises(sa.exc.IntegrityError):
        with engine.begin() as conn:
            _add_digest(conn, add_user(conn), **values)


def test_digest_keys_and_item_deliveries_are_unique(engine):
    with engine.begin() as conn:
        user = add_user(conn)
        delivery = add_digest_delivery(conn, user, utc(2026, 5, 12, 9))
        first = _add_digest(conn, user)
        second = _add_digest(conn, user, digest_key="another", sequence=1)
        conn.execute(sa.insert(m.user_alert_digest_items).values(digest_id=first, delivery_id=delivery))
    with pytest.raises(sa.exc.IntegrityError):
        with engine.begin() as conn:
            _add_digest(conn, user, sequence=2)  # same digest_key
    with pytest.raises(sa.exc.IntegrityError):
        with engine.begin() as conn:
            conn.execute(sa.insert(m.user_alert_digest_items).values(digest_id=second, delivery_id=delivery))


# --- the seed scenario ----------------------------------------------------------------------

def test_three_events_in_one_amsterdam_day_make_one_digest_with_three_items(db, settings, now):
    with db.transaction() as conn:
        user = add_user(conn)
        deliveries = [add_digest_delivery(conn, user, at) for at in
                      (utc(2026, 5, 11, 22), utc(2026, 5, 12, 9), utc(2026, 5, 12, 21, 59, 59, 999999))]

    assert run_phase_d(db, clock_at(now), settings, NO_CHANNELS) == counts(1, 3)

    with db.engine.connect() as conn:
        (digest,) = digests(conn)
        assert (digest["user_id"], digest["channel"], digest["period"]) == (user, "email", "daily")
        assert (digest["window_start"], digest["window_end"]) == AMS_MAY_12
        assert digest["digest_key"] == digest_key(user, "email", "daily", AMS_MAY_12[0])
        assert (digest["status"], digest["attempts"], digest["sequence"]) == ("queued", 0, 0)
        assert digest["next_retry_at"] == AMS_MAY_12[1]  # not due before the window closes
        assert items_of(conn, digest["id"]) == deliveries
        assert {(d["status"], d["last_error"]) for d in rows(conn, m.user_alert_deliveries)} == {
            ("skipped", "batched_into_digest")}


def test_running_phase_d_twice_creates_nothing_new(db, settings, now):
    seed_day(db)
    run_phase_d(db, clock_at(now), settings, NO_CHANNELS)
    with db.engine.connect() as conn:
        before = digests(conn), rows(conn, m.user_alert_digest_items, "delivery_id")

    assert run_phase_d(db, clock_at(now), settings, NO_CHANNELS) == NOTHING

    with db.engine.connect() as conn:
        assert (digests(conn), rows(conn, m.user_alert_digest_items, "delivery_id")) == before


def test_zero_pending_deliveries_is_a_clean_no_op(db, settings, now):
    with db.transaction() as conn:
        user = add_user(conn)
        instant = add_delivery(conn, user, add_event(conn, status="fanned_out"))
        add_digest_delivery(conn, user, utc(2026, 5, 12, 9), channel="sms", status="skipped",
                            last_error="sms_digest_not_supported")

    assert run_phase_d(db, clock_at(now), settings, NO_CHANNELS) == NOTHING
    assert run_phase_d(db, clock_at(now), settings, NO_CHANNELS) == NOTHING

    with db.engine.connect() as conn:
        assert digests(conn) == []
        assert [(d["id"], d["status"]) for d in rows(conn, m.user_alert_deliveries)] == [
            (instant, "queued"), (instant + 1, "skipped")]


def test_a_dry_run_reports_the_digests_but_changes_nothing(engine, settings, now):
    seed_day(Database(engine))
    with Database.dry_run_of(engine) as dry:
        assert run_phase_d(dry, clock_at(now), settings, NO_CHANNELS) == counts(1, 3)
    with engine.connect() as conn:
        assert digests(conn) == []
        assert {d["status"] for d in rows(conn, m.user_alert_deliveries)} == {"queued"}
    assert run_phase_d(Database(engine), clock_at(now), settings, NO_CHANNELS) == counts(1, 3)


# --- who gets which window ---------------------------------------------------------------------

def test_each_user_channel_and_local_day_is_its_own_digest(db, settings, now):
    with db.transaction() as conn:
        ams, nyc = add_user(conn), add_user(conn, timezone="America/New_York")
        for user in (ams, nyc):
            for at in (utc(2026, 5, 12, 3), utc(2026, 5, 12, 5)):  # New York: 23:00 on the 11th, 01:00
                add_digest_delivery(conn, user, at)
        add_digest_delivery(conn, ams, utc(2026, 5, 12, 3), channel="telegram")

    assert run_phase_d(db, clock_at(now), settings, NO_CHANNELS) == counts(4, 5)

    with db.engine.connect() as conn:
        found = {(g["user_id"], g["channel"], g["window_start"], g["window_end"]): len(items_of(conn, g["id"]))
                 for g in digests(conn)}
    assert found == {
        (ams, "email", *AMS_MAY_12): 2,
        (ams, "telegram", *AMS_MAY_12): 1,
        (nyc, "email", utc(2026, 5, 11, 4), utc(2026, 5, 12, 4)): 1,
        (nyc, "email", utc(2026, 5, 12, 4), utc(2026, 5, 13, 4)): 1,
    }


def test_hourly_digests_only_for_users_whose_plan_allows_them(db, settings, now):
    settings = replace(settings, hourly_digest_plans=frozenset({"pro"}))
    with db.transaction() as conn:
        pro = add_user(conn, plan="pro", digest_period="hourly")
        free = add_user(conn, plan="free", digest_period="hourly")
        for user in (pro, free):
            for at in (utc(2026, 5, 12, 9, 10), utc(2026, 5, 12, 9, 50), utc(2026, 5, 12, 10, 5)):
                add_digest_delivery(conn, user, at)

    assert run_phase_d(db, clock_at(now), settings, NO_CHANNELS) == counts(3, 6)

    with db.engine.connect() as conn:
        found = sorted((g["user_id"], g["period"], g["window_start"], len(items_of(conn, g["id"])))
                       for g in digests(conn))
    assert found == [(pro, "hourly", utc(2026, 5, 12, 9), 2), (pro, "hourly", utc(2026, 5, 12, 10), 1),
                     (free, "daily", AMS_MAY_12[0], 3)]


def test_the_repeated_fall_back_hour_gives_two_hourly_digests(db, settings, now):
    settings = replace(settings, hourly_digest_plans=frozenset({"pro"}))
    with db.transaction() as conn:
        user = add_user(conn, plan="pro", digest_period="hourly")
        add_digest_delivery(conn, user, utc(2026, 10, 25, 0, 30))  # 02:30 CEST
        add_digest_delivery(conn, user, utc(2026, 10, 25, 1, 30))  # 02:30 CET

    assert run_phase_d(db, clock_at(now), settings, NO_CHANNELS) == counts(2, 2)

    with db.engine.connect() as conn:
        windows = [(g["window_start"], g["window_end"], g["next_retry_at"]) for g in digests(conn)]
    assert sorted(windows) == [(utc(2026, 10, 25, 0), utc(2026, 10, 25, 1), utc(2026, 10, 25, 1)),
                               (utc(2026, 10, 25, 1), utc(2026, 10, 25, 2), utc(2026, 10, 25, 2))]


def test_an_unknown_user_timezone_falls_back_to_the_app_timezone(db, settings, now):
    seed_day(db, timezone="Mars/Olympus_Mons")
    assert run_phase_d(db, clock_at(now), settings, NO_CHANNELS) == counts(1, 3)
    with db.engine.connect() as conn:
        assert [(g["window_start"], g["window_end"]) for g in digests(conn)] == [AMS_MAY_12]


def test_event_times_stored_without_a_fraction_still_land_in_the_right_window(db, settings, now):
    """Producers may INSERT created_at themselves; SQLite then keeps their text as is."""
    user, (first, second) = seed_day(db, hours=(9, 10))
    text = {"sqlite": "2026-05-12 22:00:00", "postgresql": "2026-05-12 22:00:00+00"}[db.engine.dialect.name]
    with db.transaction() as conn:
        event_id = conn.execute(sa.select(m.user_alert_deliveries.c.alert_event_id)
                                .where(m.user_alert_deliveries.c.id == second)).scalar_one()
        conn.execute(sa.text("UPDATE alert_events SET created_at = :t WHERE id = :id"), {"t": text, "id": event_id})

    assert run_phase_d(db, clock_at(now), settings, NO_CHANNELS) == counts(2, 2)

    with db.engine.connect() as conn:
        placed = {tuple(items_of(conn, g["id"])): g["window_start"] for g in digests(conn)}
    assert placed == {(first,): AMS_MAY_12[0], (second,): AMS_MAY_12[1]}


# --- late deliveries and follow-ups -------------------------------------------------------------

def test_a_late_delivery_joins_its_windows_digest_while_that_is_still_queued(db, settings, now):
    user, deliveries = seed_day(db)
    run_phase_d(db, clock_at(now), settings, NO_CHANNELS)
    with db.transaction() as conn:
        late = add_digest_delivery(conn, user, utc(2026, 5, 12, 20))

    assert run_phase_d(db, clock_at(now), settings, NO_CHANNELS) == counts(0, 1)

    with db.engine.connect() as conn:
        (digest,) = digests(conn)
        assert items_of(conn, digest["id"]) == deliveries + [late]


@pytest.mark.parametrize("left_queued", [
    {"status": "sending", "attempts": 1},
    {"status": "sent", "attempts": 1},
    {"status": "failed", "attempts": 5, "last_error": "550 mailbox unavailable"},
    {"status": "skipped", "last_error": "recipient has no email"},
    {"status": "queued", "attempts": 1, "last_error": "451 try again later"},  # waiting for a retry
    {"status": "queued", "attempts": 0, "last_error": "550 mailbox unavailable"},  # `alerts retry`
], ids=["sending", "sent", "failed", "skipped", "retrying", "requeued"])
def test_a_late_delivery_after_its_digest_left_queued_goes_into_a_follow_up(db, settings, now, left_queued):
    user, deliveries = seed_day(db)
    run_phase_d(db, clock_at(now), settings, NO_CHANNELS)
    with db.transaction() as conn:
        conn.execute(sa.update(m.user_alert_digests).values(**left_queued))
        late = add_digest_delivery(conn, user, utc(2026, 5, 12, 20))

    assert run_phase_d(db, clock_at(now), settings, NO_CHANNELS) == counts(1, 1)

    with db.engine.connect() as conn:
        first, follow_up = digests(conn)
        assert items_of(conn, first["id"]) == deliveries
        assert items_of(conn, follow_up["id"]) == [late]
        assert (follow_up["window_start"], follow_up["window_end"]) == AMS_MAY_12
        assert follow_up["digest_key"] == digest_key(user, "email", "daily", AMS_MAY_12[0], sequence=1)
        assert (follow_up["status"], follow_up["sequence"]) == ("queued", 1)


def test_follow_ups_keep_counting_and_later_deliveries_join_the_open_one(db, settings, now):
    user, _ = seed_day(db, hours=(7,))
    run_phase_d(db, clock_at(now), settings, NO_CHANNELS)
    made = []
    for hour in (8, 9):
        with db.transaction() as conn:
            conn.execute(sa.update(m.user_alert_digests).values(status="sent", attempts=1))
            made.append(add_digest_delivery(conn, user, utc(2026, 5, 12, hour)))
        assert run_phase_d(db, clock_at(now), settings, NO_CHANNELS) == counts(1, 1)
    with db.transaction() as conn:
        made.append(add_digest_delivery(conn, user, utc(2026, 5, 12, 10)))
    assert run_phase_d(db, clock_at(now), settings, NO_CHANNELS) == counts(0, 1)

    with db.engine.connect() as conn:
        found = [(g["sequence"], g["digest_key"][-2:], items_of(conn, g["id"])) for g in digests(conn)]
    assert [(s, k) for s, k, _ in found] == [(0, "0Z"), (1, "#1"), (2, "#2")]
    assert found[1][2] == [made[0]] and found[2][2] == made[1:]


# --- racing a sender (PostgreSQL row locks) -------------------------------------------------------

def _wait_for_lock_wait(conn, builder, timeout=20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and builder.is_alive():
        waiting = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).scalar()
        conn.rollback()  # pg_stat_activity is a snapshot per transaction
        if waiting:
            return
        time.sleep(0.05)
    raise AssertionError("phase D never waited for the sender's row lock")


def test_a_digest_claimed_while_phase_d_waits_for_it_gets_no_items(pg_url, now):
    settings = Settings.from_env({})
    engine = make_engine(pg_url)
    db = Database(engine)
    user, deliveries = seed_day(db)
    run_phase_d(db, clock_at(now), settings, NO_CHANNELS)
    with db.transaction() as conn:
        late = add_digest_delivery(conn, user, utc(2026, 5, 12, 20))

    result = {}
    sender = engine.connect()
    claim = sender.begin()
    digests_table = m.user_alert_digests
    after_window = AMS_MAY_12[1] + timedelta(minutes=1)
    assert len(DIGESTS.claim(sender, after_window, 10)) == 1
    builder = threading.Thread(target=lambda: result.update(run_phase_d(db, clock_at(now), settings, NO_CHANNELS)))
    builder.start()
    try:
        with engine.connect() as watcher:
            _wait_for_lock_wait(watcher, builder)
    finally:
        claim.commit()
        sender.close()
        builder.join(timeout=30)

    assert result == counts(1, 1)
    with engine.connect() as conn:
        claimed, follow_up = digests(conn)
        assert claimed["status"] == "sending" and items_of(conn, claimed["id"]) == deliveries
        assert items_of(conn, follow_up["id"]) == [late]
    engine.dispose()


def test_a_sender_skips_a_digest_while_phase_d_attaches_items_to_it(pg_url, now):
    settings = Settings.from_env({})
    engine = make_engine(pg_url)
    db = Database(engine)
    user, deliveries = seed_day(db)
    run_phase_d(db, clock_at(now), settings, NO_CHANNELS)
    with db.transaction() as conn:
        late = add_digest_delivery(conn, user, utc(2026, 5, 12, 20))

    locked, resume = threading.Event(), threading.Event()

    @event.listens_for(engine, "after_cursor_execute")
    def pause_after_locking(conn, cursor, statement, *args):
        if "FOR UPDATE" in statement:
            locked.set()
            resume.wait(timeout=30)

    result = {}
    builder = threading.Thread(target=lambda: result.update(run_phase_d(db, clock_at(now), settings, NO_CHANNELS)))
    builder.start()
    try:
        assert locked.wait(timeout=30)
        sender = make_engine(pg_url)
        table = m.user_alert_digests
        after_window = AMS_MAY_12[1] + timedelta(minutes=1)
        with sender.begin() as conn:
            assert DIGESTS.claim(conn, after_window, 10) == []
    finally:
        resume.set()
        builder.join(timeout=30)

    assert result == counts(0, 1)
    with sender.begin() as conn:
        ((digest_id, _),) = DIGESTS.claim(conn, after_window, 10)
        assert items_of(conn, digest_id) == deliveries + [late]
    sender.dispose()
    engine.dispose()


def test_a_queued_sms_digest_delivery_is_skipped_not_left_waiting(db, settings, now):
    """Phase B never makes one, but a row written by hand must not wait forever."""
    with db.transaction() as conn:
        user = add_user(conn, phone="+31600000000")
        delivery = add_digest_delivery(conn, user, utc(2026, 5, 12, 7), channel="sms")
    assert run_phase_d(db, clock_at(now), settings, NO_CHANNELS) == NOTHING
    with db.transaction() as conn:
        (row,) = [r for r in rows(conn, m.user_alert_deliveries) if r["id"] == delivery]
    assert (row["status"], row["last_error"]) == ("skipped", "sms_digest_not_supported")
