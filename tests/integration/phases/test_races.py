"""Races between the phases, a sender and a subscriber, each forced into its worst
interleaving on PostgreSQL: a second connection acting between two statements of a
phase, or holding a lock the other side must meet."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from alerts.channels.registry import ChannelSet
from alerts.core import tables as m
from alerts.core.db import Database, make_engine
from alerts.core.settings import Settings
from alerts.phases import digests as phase_d
from alerts.phases.fanout import run_phase_b
from alerts.phases.digests import run_phase_d
from alerts.subscribers import unsubscribe as unsub
from tests.support.clock import NO_CHANNELS, clock_at
from tests.support.factories import WINDOW_END, WINDOW_START, add_delivery, add_digest, add_event, add_pref, add_user

UTC = timezone.utc
IN_WINDOW = datetime(2026, 5, 12, 9, 0, tzinfo=UTC)


@pytest.fixture
def engine(pg_url):
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


def items_of(engine, digest_id: int) -> list[int]:
    i = m.user_alert_digest_items
    with engine.connect() as conn:
        return conn.execute(sa.select(i.c.delivery_id).where(i.c.digest_id == digest_id)).scalars().all()


# --- Phase D and a claim given back ------------------------------------------------------------

def test_phase_d_never_fills_a_digest_whose_claim_was_given_back_between_its_statements(engine, monkeypatch):
    """A sender held the window's digest when Phase D locked the open ones, and gave its
    claim back (half lease, --max-seconds) before Phase D chose where items go: the
    digest looks open again but is not locked, so a sender could send it before Phase D
    commits. Its late delivery must go to a follow-up digest instead."""
    with engine.begin() as conn:
        user = add_user(conn)
        held = add_digest(conn, user, events=1, status="sending", attempts=1, claimed_at=WINDOW_END)
        late = add_delivery(conn, user, add_event(conn, status="fanned_out", created_at=IN_WINDOW),
                            delivery_kind="digest")

    real = phase_d.lock_open_digests

    def then_the_claim_is_given_back(conn):
        real(conn)
        with engine.begin() as sender:  # outbox.release, as the sender's own transaction
            g = m.user_alert_digests
            sender.execute(sa.update(g).where(g.c.id == held).values(status="queued", attempts=0, claimed_at=None))

    monkeypatch.setattr(phase_d, "lock_open_digests", then_the_claim_is_given_back)
    counts = run_phase_d(Database(engine), clock_at(WINDOW_END), Settings(), NO_CHANNELS)

    assert counts["digests_created"] == 1 and counts["digest_items_attached"] == 1
    assert late not in items_of(engine, held)
    g = m.user_alert_digests
    with engine.connect() as conn:
        follow_up = conn.execute(sa.select(g.c.id).where(g.c.sequence == 1)).scalar_one()
    assert items_of(engine, follow_up) == [late]


def test_phase_d_still_fills_the_open_digest_it_locked(engine):
    with engine.begin() as conn:
        user = add_user(conn)
        digest = add_digest(conn, user, events=1)
        late = add_delivery(conn, user, add_event(conn, status="fanned_out", created_at=IN_WINDOW),
                            delivery_kind="digest")

    counts = run_phase_d(Database(engine), clock_at(WINDOW_START + timedelta(hours=12)), Settings(), NO_CHANNELS)

    assert counts["digests_created"] == 0
    assert late in items_of(engine, digest)


# --- the one-click unsubscribe and Phase D ---------------------------------------------------------

def test_an_unsubscribe_meeting_phase_d_on_the_same_rows_waits_and_takes_effect_without_a_deadlock(engine,
                                                                                                    monkeypatch):
    """Phase D locks the window's open digest, then marks deliveries batched; the
    unsubscribe skips the user's digests and deliveries. Taken in opposite orders, each
    would wait for the other: PostgreSQL would kill one (a 503 to a mail provider, or
    a failed phase). Both must finish, and the unsubscribe win on what stays queued."""
    with engine.begin() as conn:
        user = add_user(conn)
        add_pref(conn, user, delivery_kind="digest")
        digest = add_digest(conn, user, events=1)
        pending = [add_delivery(conn, user, add_event(conn, status="fanned_out", created_at=IN_WINDOW),
                                delivery_kind="digest") for _ in range(2)]

    real = phase_d.lock_open_digests
    locked, unsubscribing = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def unsubscribe_now():
        try:
            locked.wait(10)
            with engine.begin() as conn:
                unsubscribing.set()
                unsub.unsubscribe(conn, user, "email")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def lock_then_let_the_unsubscribe_start(conn):
        real(conn)
        locked.set()
        unsubscribing.wait(10)
        threading.Event().wait(0.5)  # the unsubscribe is now inside its statements, waiting on us

    monkeypatch.setattr(phase_d, "lock_open_digests", lock_then_let_the_unsubscribe_start)
    subscriber = threading.Thread(target=unsubscribe_now)
    subscriber.start()
    counts = run_phase_d(Database(engine), clock_at(WINDOW_START + timedelta(hours=12)), Settings(), NO_CHANNELS)
    subscriber.join(30)

    assert not errors, errors
    assert counts["digest_items_attached"] == 2
    g, d = m.user_alert_digests, m.user_alert_deliveries
    with engine.connect() as conn:
        assert conn.execute(sa.select(g.c.status, g.c.last_error).where(g.c.id == digest)).one() == \
            ("skipped", m.UNSUBSCRIBED)
        assert conn.execute(sa.select(sa.func.count()).select_from(d).where(d.c.status == "queued")).scalar_one() == 0
    assert set(pending) <= set(items_of(engine, digest))


# --- two fan-outs of one story at once ---------------------------------------------------------------

def test_two_fan_outs_at_once_of_updates_of_one_story_leave_one_queued_delivery(engine, monkeypatch):
    """The event-driven path fans out one event at a time, beside beat's Phase B: two
    updates of one story (one collapse_key) fanned out at once each used to miss the
    other's uncommitted delivery, and both stayed queued. The second now waits for the
    first's commit before it supersedes, whichever of them is newer."""
    from alerts.phases import fanout

    with engine.begin() as conn:
        user = add_user(conn)
        add_pref(conn, user)
        older = add_event(conn, status="ready", collapse_key="story-1", created_at=IN_WINDOW)
        newer = add_event(conn, status="ready", collapse_key="story-1", created_at=IN_WINDOW + timedelta(minutes=5))

    real = fanout._supersede
    first_inside, second_done = threading.Event(), threading.Event()

    def supersede_slowly(conn):
        superseded = real(conn)
        if not first_inside.is_set():  # the first has superseded what it saw; not committed yet
            first_inside.set()
            second_done.wait(3)  # the other fan-out runs its course meanwhile, as far as it can
        return superseded

    monkeypatch.setattr(fanout, "_supersede", supersede_slowly)
    errors: list[BaseException] = []

    def fan_out(event_id):
        try:
            run_phase_b(Database(engine), clock_at(IN_WINDOW + timedelta(minutes=6)), Settings(), NO_CHANNELS,
                        event_id=event_id)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            if first_inside.is_set():
                second_done.set()

    one = threading.Thread(target=fan_out, args=(newer,))
    one.start()
    first_inside.wait(10)
    fan_out(older)
    one.join(30)

    assert not errors, errors
    d = m.user_alert_deliveries
    with engine.connect() as conn:
        rows = dict(conn.execute(sa.select(d.c.alert_event_id, d.c.status)).all())
    assert rows == {newer: "queued", older: "skipped"}


def test_a_phase_b_with_its_lock_skips_nothing_it_should_not(engine):
    with engine.begin() as conn:
        user = add_user(conn)
        add_pref(conn, user)
        events = [add_event(conn, status="ready", collapse_key=f"story-{n}") for n in range(3)]

    run_phase_b(Database(engine), clock_at(WINDOW_END), Settings(), ChannelSet())

    d = m.user_alert_deliveries
    with engine.connect() as conn:
        assert sorted(conn.execute(sa.select(d.c.alert_event_id).where(d.c.status == "queued")).scalars()) == events


# --- one event no window can hold ---------------------------------------------------------------

def test_a_digest_delivery_of_an_event_at_infinity_is_skipped_and_the_others_are_built(engine):
    """Fanned out before intake refused such times: it must not stop Phase D for everyone."""
    with engine.begin() as conn:
        user = add_user(conn)
        good = add_delivery(conn, user, add_event(conn, status="fanned_out", created_at=IN_WINDOW),
                            delivery_kind="digest")
        bad_event = add_event(conn, status="fanned_out")
        conn.execute(sa.update(m.alert_events).where(m.alert_events.c.id == bad_event)
                     .values(created_at=sa.literal_column("'infinity'::timestamptz")))
        bad = add_delivery(conn, user, bad_event, delivery_kind="digest")

    counts = run_phase_d(Database(engine), clock_at(WINDOW_END), Settings(), NO_CHANNELS)

    assert counts["digest_items_attached"] == 1
    d = m.user_alert_deliveries
    with engine.connect() as conn:
        rows = dict(conn.execute(sa.select(d.c.id, d.c.last_error)).all())
    assert rows[good] == m.BATCHED_INTO_DIGEST
    assert rows[bad].startswith("created_at: ")
