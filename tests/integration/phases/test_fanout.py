"""Phase B — fan-out, on both databases."""
import sqlalchemy as sa

from alerts.core import tables as m
from alerts.core.settings import Settings
from alerts.core.db import Database, make_engine
from alerts.phases.fanout import run_phase_b
from tests.support.factories import add_delivery, add_event, add_pref, add_user, rows
from tests.support.clock import NO_CHANNELS, clock_at


def ready_event(conn, **cols) -> int:
    return add_event(conn, status="ready", **{"alert_type": "price_spike", "region": "NL", "severity": 3, **cols})


def deliveries(engine) -> list[dict]:
    with engine.connect() as conn:
        return rows(conn, m.user_alert_deliveries, order_by="user_id, alert_event_id, channel")


def delivered(engine) -> set[tuple]:
    """(user_id, event_id, channel, delivery_kind, status) of every delivery."""
    return {(d["user_id"], d["alert_event_id"], d["channel"], d["delivery_kind"], d["status"])
            for d in deliveries(engine)}


def event_status(engine, event_id) -> str:
    with engine.connect() as conn:
        return conn.execute(sa.select(m.alert_events.c.status).where(m.alert_events.c.id == event_id)).scalar_one()


def test_a_matching_pref_gets_one_queued_delivery_and_the_event_is_fanned_out(db, engine, now, settings):
    with engine.begin() as conn:
        user = add_user(conn)
        add_pref(conn, user, alert_type="price_spike", region="NL", channel="email")
        event = ready_event(conn)

    assert run_phase_b(db, clock_at(now), settings, NO_CHANNELS) == {"events_fanned_out": 1, "deliveries_created": 1}

    [d] = deliveries(engine)
    assert (d["user_id"], d["alert_event_id"], d["channel"], d["delivery_kind"], d["status"]) == (
        user, event, "email", "instant", "queued")
    assert (d["attempts"], d["last_error"], d["created_at"]) == (0, None, now)
    assert event_status(engine, event) == "fanned_out"


def test_wildcards_match_any_type_and_any_region(db, engine, now, settings):
    with engine.begin() as conn:
        any_type, any_region, both, neither = (add_user(conn) for _ in range(4))
        add_pref(conn, any_type, alert_type="*", region="NL")
        add_pref(conn, any_region, alert_type="price_spike", region="*")
        add_pref(conn, both, alert_type="*", region="*")
        add_pref(conn, neither, alert_type="pipeline_outage", region="DE")
        nl_spike = ready_event(conn, alert_type="price_spike", region="NL")
        de_spike = ready_event(conn, alert_type="price_spike", region="DE")
        no_region = ready_event(conn, alert_type="price_spike", region=None)

    run_phase_b(db, clock_at(now), settings, NO_CHANNELS)

    got = {(d["user_id"], d["alert_event_id"]) for d in deliveries(engine)}
    assert got == {(any_type, nl_spike), (any_region, nl_spike), (any_region, de_spike), (any_region, no_region),
                   (both, nl_spike), (both, de_spike), (both, no_region)}


def test_an_event_below_the_min_severity_is_not_delivered(db, engine, now, settings):
    with engine.begin() as conn:
        user = add_user(conn)
        add_pref(conn, user, min_severity=4)
        low, exact, high = (ready_event(conn, severity=s) for s in (3, 4, 5))

    run_phase_b(db, clock_at(now), settings, NO_CHANNELS)

    assert {d["alert_event_id"] for d in deliveries(engine)} == {exact, high}
    assert event_status(engine, low) == "fanned_out"


def test_disabled_prefs_and_inactive_users_get_nothing(db, engine, now, settings):
    with engine.begin() as conn:
        add_pref(conn, add_user(conn), enabled=False)
        add_pref(conn, add_user(conn, is_active=False))
        ready_event(conn)

    assert run_phase_b(db, clock_at(now), settings, NO_CHANNELS) == {"events_fanned_out": 1, "deliveries_created": 0}


def test_instant_wins_over_digest_on_the_same_channel(db, engine, now, settings):
    with engine.begin() as conn:
        user = add_user(conn)
        add_pref(conn, user, alert_type="*", region="*", channel="email", delivery_kind="digest")
        add_pref(conn, user, alert_type="price_spike", region="*", channel="email", delivery_kind="instant")
        add_pref(conn, user, alert_type="*", region="NL", channel="email", delivery_kind="digest")
        event = ready_event(conn)

    assert run_phase_b(db, clock_at(now), settings, NO_CHANNELS)["deliveries_created"] == 1
    assert delivered(engine) == {(user, event, "email", "instant", "queued")}


def test_each_channel_gets_its_own_delivery_with_its_own_kind(db, engine, now, settings):
    with engine.begin() as conn:
        user = add_user(conn)
        add_pref(conn, user, channel="email", delivery_kind="digest")
        add_pref(conn, user, channel="telegram", delivery_kind="instant")
        add_pref(conn, user, channel="sms", delivery_kind="instant")
        event = ready_event(conn)

    run_phase_b(db, clock_at(now), settings, NO_CHANNELS)

    assert delivered(engine) == {(user, event, "email", "digest", "queued"),
                                 (user, event, "telegram", "instant", "queued"),
                                 (user, event, "sms", "instant", "queued")}


def test_sms_digest_is_created_skipped_as_not_supported(db, engine, now, settings):
    with engine.begin() as conn:
        user = add_user(conn, phone="+31600000000")
        add_pref(conn, user, channel="sms", delivery_kind="digest")
        ready_event(conn)

    assert run_phase_b(db, clock_at(now), settings, NO_CHANNELS)["deliveries_created"] == 1

    [d] = deliveries(engine)
    assert (d["channel"], d["delivery_kind"], d["status"], d["last_error"]) == (
        "sms", "digest", "skipped", "sms_digest_not_supported")


def test_sms_with_an_instant_pref_is_not_skipped_even_when_a_digest_pref_matches_too(db, engine, now, settings):
    with engine.begin() as conn:
        user = add_user(conn, phone="+31600000000")
        add_pref(conn, user, alert_type="*", channel="sms", delivery_kind="digest")
        add_pref(conn, user, alert_type="price_spike", channel="sms", delivery_kind="instant")
        event = ready_event(conn)

    run_phase_b(db, clock_at(now), settings, NO_CHANNELS)

    assert delivered(engine) == {(user, event, "sms", "instant", "queued")}


def test_a_user_without_an_address_still_gets_the_delivery(db, engine, now, settings):
    with engine.begin() as conn:
        user = add_user(conn, email=None, telegram_chat_id=None, phone=None)
        add_pref(conn, user, channel="telegram")
        event = ready_event(conn)

    run_phase_b(db, clock_at(now), settings, NO_CHANNELS)

    assert delivered(engine) == {(user, event, "telegram", "instant", "queued")}


def test_only_ready_events_are_fanned_out(db, engine, now, settings):
    with engine.begin() as conn:
        add_pref(conn, add_user(conn))
        new = add_event(conn, status="new")
        rejected = add_event(conn, status="rejected")
        done = add_event(conn, status="fanned_out")

    assert run_phase_b(db, clock_at(now), settings, NO_CHANNELS) == {"events_fanned_out": 0, "deliveries_created": 0}
    assert [event_status(engine, e) for e in (new, rejected, done)] == ["new", "rejected", "fanned_out"]


def test_running_twice_creates_nothing_new(db, engine, now, settings):
    with engine.begin() as conn:
        for _ in range(3):
            add_pref(conn, add_user(conn))
        ready_event(conn)
        ready_event(conn)

    first = run_phase_b(db, clock_at(now), settings, NO_CHANNELS)
    before = deliveries(engine)

    assert first == {"events_fanned_out": 2, "deliveries_created": 6}
    assert run_phase_b(db, clock_at(now), settings, NO_CHANNELS) == {"events_fanned_out": 0, "deliveries_created": 0}
    assert deliveries(engine) == before


def test_an_existing_delivery_is_left_alone_and_not_duplicated(db, engine, now, settings):
    """An event put back to ready (e.g. by an operator) fans out only what is missing."""
    with engine.begin() as conn:
        old, new = add_user(conn), add_user(conn)
        add_pref(conn, old)
        add_pref(conn, new)
        event = ready_event(conn)
        add_delivery(conn, old, event, status="sent")

    assert run_phase_b(db, clock_at(now), settings, NO_CHANNELS) == {"events_fanned_out": 1, "deliveries_created": 1}
    assert delivered(engine) == {(old, event, "email", "instant", "sent"), (new, event, "email", "instant", "queued")}


def test_zero_ready_events_is_a_clean_no_op(db, engine, now, settings):
    with engine.begin() as conn:
        add_pref(conn, add_user(conn))

    assert run_phase_b(db, clock_at(now), settings, NO_CHANNELS) == {"events_fanned_out": 0, "deliveries_created": 0}
    assert deliveries(engine) == []


def test_an_event_locked_by_another_transaction_is_left_for_the_next_run(pg_url, now):
    """PostgreSQL: a run never waits on, nor half-handles, an event someone else holds."""
    settings = Settings.from_env({"DATABASE_URL": pg_url})
    engine = make_engine(pg_url)
    try:
        with engine.begin() as conn:
            add_pref(conn, add_user(conn))
            held, free = ready_event(conn), ready_event(conn)
        with engine.connect() as other, other.begin():
            other.execute(sa.select(m.alert_events.c.id).where(m.alert_events.c.id == held).with_for_update())

            assert run_phase_b(Database(engine), clock_at(now), settings, NO_CHANNELS) == {"events_fanned_out": 1, "deliveries_created": 1}
            assert (event_status(engine, held), event_status(engine, free)) == ("ready", "fanned_out")

        assert run_phase_b(Database(engine), clock_at(now), settings, NO_CHANNELS) == {"events_fanned_out": 1, "deliveries_created": 1}
        assert event_status(engine, held) == "fanned_out"
    finally:
        engine.dispose()
