"""Delivery policy in Phase B and its effect on Phase C (docs/policy.md), on both
databases: digest bypass, quiet hours, and the supersede of queued instant deliveries by
a newer event of the same collapse_key."""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

from alerts.core import tables as m
from alerts.phases.fanout import run_phase_b
from alerts.phases.pipeline import run_phases, session
from tests.support.clock import NO_CHANNELS, clock_at
from tests.support.factories import add_delivery, add_event, add_pref, add_user, rows
from tests.support.fakes.fixtures import with_fakes

UTC = timezone.utc
# 12 May 2026 in Amsterdam is CEST (UTC+2).
EVENING = datetime(2026, 5, 12, 21, 0, tzinfo=UTC)  # 23:00 local
NIGHT = datetime(2026, 5, 13, 0, 0, tzinfo=UTC)  # 02:00 local
DAWN = datetime(2026, 5, 13, 3, 0, tzinfo=UTC)  # 05:00 local
MORNING = datetime(2026, 5, 13, 5, 0, tzinfo=UTC)  # 07:00 local: the end of 22:00-07:00
NOON = datetime(2026, 5, 12, 10, 0, tzinfo=UTC)


def deliveries(engine) -> list[dict]:
    with engine.connect() as conn:
        return rows(conn, m.user_alert_deliveries, order_by="alert_event_id, user_id, channel")


def by_event_and_channel(engine) -> dict:
    return {(d["alert_event_id"], d["channel"]): d for d in deliveries(engine)}


def fan_out(db, settings, now) -> dict:
    return run_phase_b(db, clock_at(now), settings, NO_CHANNELS)


def event(conn, when: datetime, **cols) -> int:
    return add_event(conn, status="ready", created_at=when, **cols)


# --- §10.2 bypass ---------------------------------------------------------------------------

def test_a_digest_pref_delivers_at_once_from_the_bypass_severity_sms_included(db, engine, settings, now):
    settings = replace(settings, digest_bypass_severity=4)
    with engine.begin() as conn:
        user = add_user(conn, phone="+31612345678")
        add_pref(conn, user, channel="email", delivery_kind="digest")
        add_pref(conn, user, channel="sms", delivery_kind="digest")
        high = event(conn, now, severity=4)
        critical = event(conn, now, severity=5)
        elevated = event(conn, now, severity=3)

    assert fan_out(db, settings, now) == {"events_fanned_out": 3, "deliveries_created": 6}

    got = {k: (d["delivery_kind"], d["status"], d["last_error"]) for k, d in by_event_and_channel(engine).items()}
    assert got == {
        (high, "email"): ("instant", "queued", None), (high, "sms"): ("instant", "queued", None),
        (critical, "email"): ("instant", "queued", None), (critical, "sms"): ("instant", "queued", None),
        (elevated, "email"): ("digest", "queued", None),
        (elevated, "sms"): ("digest", "skipped", m.SMS_DIGEST_NOT_SUPPORTED),
    }


def test_without_a_bypass_severity_even_a_critical_event_waits_for_the_digest(db, engine, settings, now):
    assert settings.digest_bypass_severity is None
    with engine.begin() as conn:
        add_pref(conn, add_user(conn), channel="email", delivery_kind="digest")
        event(conn, now, severity=5)

    fan_out(db, settings, now)

    [d] = deliveries(engine)
    assert (d["delivery_kind"], d["status"]) == ("digest", "queued")


def test_bypass_still_respects_the_prefs_min_severity(db, engine, settings, now):
    settings = replace(settings, digest_bypass_severity=2)
    with engine.begin() as conn:
        add_pref(conn, add_user(conn), channel="email", delivery_kind="digest", min_severity=4)
        event(conn, now, severity=3)

    assert fan_out(db, settings, now)["deliveries_created"] == 0


# --- §10.4 quiet hours -----------------------------------------------------------------------

def test_an_instant_alert_inside_quiet_hours_is_held_until_the_period_ends(db, engine, settings):
    with engine.begin() as conn:
        quiet = add_user(conn, quiet_hours="22:00-07:00")  # timezone NULL: ALERTS_TIMEZONE, Amsterdam
        in_new_york = add_user(conn, quiet_hours="22:00-07:00", timezone="America/New_York")  # 17:00 there
        awake = add_user(conn)
        for user in (quiet, in_new_york, awake):
            add_pref(conn, user, channel="email")
        add_pref(conn, quiet, channel="telegram", delivery_kind="digest")
        moderate = event(conn, EVENING, severity=2)
        critical = event(conn, EVENING, severity=5)

    fan_out(db, settings, EVENING)

    held = {(d["user_id"], d["alert_event_id"], d["channel"]): (d["next_retry_at"], d["attempts"])
            for d in deliveries(engine)}
    assert held == {
        (quiet, moderate, "email"): (MORNING, 0),
        (quiet, critical, "email"): (None, 0),  # ALERTS_QUIET_HOURS_BYPASS_SEVERITY=5 goes through
        (quiet, moderate, "telegram"): (None, 0),  # digests are not held
        (quiet, critical, "telegram"): (None, 0),
        (in_new_york, moderate, "email"): (None, 0),
        (in_new_york, critical, "email"): (None, 0),
        (awake, moderate, "email"): (None, 0),
        (awake, critical, "email"): (None, 0),
    }


def test_the_quiet_hours_bypass_severity_is_a_setting(db, engine, settings):
    settings = replace(settings, quiet_hours_bypass_severity=2)
    with engine.begin() as conn:
        add_pref(conn, add_user(conn, quiet_hours="22:00-07:00"))
        low, moderate = event(conn, EVENING, severity=1), event(conn, EVENING, severity=2)

    fan_out(db, settings, EVENING)

    assert {d["alert_event_id"]: d["next_retry_at"] for d in deliveries(engine)} == {low: MORNING, moderate: None}


def test_a_bypassed_digest_alert_is_an_instant_one_and_is_held_like_one(db, engine, settings):
    settings = replace(settings, digest_bypass_severity=4)
    with engine.begin() as conn:
        add_pref(conn, add_user(conn, quiet_hours="22:00-07:00"), delivery_kind="digest")
        high = event(conn, EVENING, severity=4)

    fan_out(db, settings, EVENING)

    [d] = deliveries(engine)
    assert (d["alert_event_id"], d["delivery_kind"], d["next_retry_at"]) == (high, "instant", MORNING)


def test_a_held_alert_is_not_due_before_the_end_and_sent_at_it_a_retry_is_not_held_again(
        db, engine, settings, smtp_server):
    settings = with_fakes(settings, smtp_server)
    with engine.begin() as conn:
        add_pref(conn, add_user(conn, quiet_hours="22:00-07:00"))
        event(conn, EVENING, severity=3)
    fan_out(db, settings, EVENING)

    assert run_c(engine, settings, MORNING - timedelta(minutes=1))["instant"]["sent"] == 0
    smtp_server.fail_data(times=1)
    assert run_c(engine, settings, MORNING)["instant"]["retried"] == 1
    [d] = deliveries(engine)
    assert d["attempts"] == 1 and MORNING < d["next_retry_at"] <= MORNING + timedelta(seconds=60), \
        "the retry follows the backoff, not the next night's quiet period"
    assert run_c(engine, settings, d["next_retry_at"])["instant"]["sent"] == 1
    assert len(smtp_server.messages) == 1


def run_c(engine, settings, now) -> dict:
    with session(engine, settings) as (db, channels):
        return run_phases(db, ("c",), clock_at(now), settings, channels)["c"]


# --- §10.3 supersede ----------------------------------------------------------------------------

def test_a_newer_event_of_a_key_supersedes_the_queued_instant_delivery_of_the_older(db, engine, settings):
    with engine.begin() as conn:
        user, other_user = add_user(conn), add_user(conn)
        add_pref(conn, user, alert_type="pipeline_outage")
        add_pref(conn, other_user, alert_type="other_type")
        first = event(conn, NOON, collapse_key="story")
    fan_out(db, settings, NOON)
    with engine.begin() as conn:
        second = event(conn, NOON + timedelta(minutes=5), collapse_key="story")
        unrelated = event(conn, NOON + timedelta(minutes=6), collapse_key="another story")
        event(conn, NOON + timedelta(minutes=7), collapse_key="story", alert_type="other_type")
    fan_out(db, settings, NOON + timedelta(minutes=10))

    got = {(d["user_id"], d["alert_event_id"]): (d["status"], d["last_error"]) for d in deliveries(engine)}
    assert got[(user, first)] == ("skipped", f"superseded by #{second}")
    assert got[(user, second)] == ("queued", None)
    assert got[(user, unrelated)] == ("queued", None)
    assert [v for (u, _), v in got.items() if u == other_user] == [("queued", None)], \
        "another user's delivery of the key supersedes nothing of this user's"


def test_events_of_one_key_fanned_out_together_leave_only_the_newest_queued(db, engine, settings):
    with engine.begin() as conn:
        user = add_user(conn, telegram_chat_id="42")
        add_pref(conn, user, channel="email")
        add_pref(conn, user, channel="telegram")
        same_time = NOON + timedelta(minutes=2)
        ids = [event(conn, NOON, collapse_key="k"), event(conn, same_time, collapse_key="k"),
               event(conn, same_time, collapse_key="k")]  # a tie on created_at: the higher id is newer

    fan_out(db, settings, NOON + timedelta(minutes=3))

    got = {(d["alert_event_id"], d["channel"]): (d["status"], d["last_error"]) for d in deliveries(engine)}
    for channel in ("email", "telegram"):
        assert [got[(i, channel)] for i in ids] == [
            ("skipped", f"superseded by #{ids[2]}"), ("skipped", f"superseded by #{ids[2]}"), ("queued", None)]


def test_a_delivery_already_sending_or_sent_is_never_superseded(db, engine, settings):
    with engine.begin() as conn:
        user = add_user(conn)
        add_pref(conn, user)
        sending_event = add_event(conn, status="fanned_out", created_at=NOON, collapse_key="k")
        sent_event = add_event(conn, status="fanned_out", created_at=NOON, collapse_key="k")
        sending = add_delivery(conn, user, sending_event, status="sending", attempts=1, claimed_at=NOON)
        sent = add_delivery(conn, user, sent_event, status="sent", attempts=1, sent_at=NOON)
        newer = event(conn, NOON + timedelta(minutes=5), collapse_key="k")

    fan_out(db, settings, NOON + timedelta(minutes=5))

    got = {d["id"]: d["status"] for d in deliveries(engine)}
    assert (got[sending], got[sent]) == ("sending", "sent")
    assert [d["status"] for d in deliveries(engine) if d["alert_event_id"] == newer] == ["queued"]


def test_an_older_event_arriving_late_never_supersedes_a_newer_one(db, engine, settings):
    with engine.begin() as conn:
        user = add_user(conn)
        add_pref(conn, user)
        newer = event(conn, NOON + timedelta(minutes=30), collapse_key="k")
    fan_out(db, settings, NOON + timedelta(minutes=30))
    with engine.begin() as conn:
        late = event(conn, NOON, collapse_key="k")  # created earlier, fanned out later
    fan_out(db, settings, NOON + timedelta(minutes=31))

    got = {d["alert_event_id"]: (d["status"], d["last_error"]) for d in deliveries(engine)}
    assert got == {newer: ("queued", None), late: ("skipped", f"superseded by #{newer}")}


def test_digest_deliveries_are_not_superseded_they_collapse_in_the_digest(db, engine, settings):
    with engine.begin() as conn:
        add_pref(conn, add_user(conn), delivery_kind="digest")
        event(conn, NOON, collapse_key="k")
        event(conn, NOON + timedelta(minutes=1), collapse_key="k")

    fan_out(db, settings, NOON + timedelta(minutes=2))

    assert [(d["status"], d["last_error"]) for d in deliveries(engine)] == [("queued", None)] * 2


def test_a_night_of_three_updates_arrives_as_one_message_in_the_morning(db, engine, settings, smtp_server):
    settings = with_fakes(settings, smtp_server)
    with engine.begin() as conn:
        user = add_user(conn, quiet_hours="22:00-07:00", timezone="Europe/Amsterdam")
        add_pref(conn, user)
    titles = ["Compressor trip at Emden", "Flows down 40%", "Flows restored"]
    ids = []
    for when, title in zip((EVENING, NIGHT, DAWN), titles):
        with engine.begin() as conn:
            ids.append(event(conn, when, title=title, collapse_key="emden-2026-05-12"))
        with session(engine, settings) as (db_, channels):
            results = run_phases(db_, ("a", "b", "d", "c"), clock_at(when), settings, channels)
        assert results["c"]["instant"]["sent"] == 0, f"nothing is sent at night ({title})"

    with session(engine, settings) as (db_, channels):
        assert run_phases(db_, ("c",), clock_at(MORNING), settings, channels)["c"]["instant"]["sent"] == 1

    (mail,) = smtp_server.messages
    assert "Flows restored" in mail.message["Subject"]
    got = {d["alert_event_id"]: (d["status"], d["last_error"]) for d in deliveries(engine)}
    assert got == {ids[0]: ("skipped", f"superseded by #{ids[1]}"), ids[1]: ("skipped", f"superseded by #{ids[2]}"),
                   ids[2]: ("sent", None)}



def test_a_digest_sent_by_phase_c_collapses_a_story_into_one_item(db, engine, settings, smtp_server):
    settings = with_fakes(settings, smtp_server)
    with engine.begin() as conn:
        add_pref(conn, add_user(conn), delivery_kind="digest")
        ids = [event(conn, NOON + timedelta(minutes=i), title=f"Update {i}", collapse_key="story") for i in range(3)]
        alone = event(conn, NOON, title="Unrelated")
    after_window = datetime(2026, 5, 12, 22, 1, tzinfo=UTC)  # the Amsterdam day of 12 May has closed
    with session(engine, settings) as (db_, channels):
        results = run_phases(db_, ("b", "d", "c"), clock_at(after_window), settings, channels)

    assert results["c"]["digests"]["sent"] == 1
    (mail,) = smtp_server.messages
    text = mail.message.get_body(("plain",)).get_content()
    assert mail.message["Subject"].endswith("(2 alerts)")
    assert f"3 updates · #{ids[0]} #{ids[1]} #{ids[2]} ·" in text and "Update 2" in text
    assert "Update 0" not in text and "Update 1" not in text and f"#{alone} ·" in text


def test_alerts_status_counts_the_held_deliveries_and_names_the_earliest_release(db, engine, settings, db_url):
    import json

    from click.testing import CliRunner

    from alerts.cli import cli

    with engine.begin() as conn:
        amsterdam = add_user(conn, quiet_hours="22:00-07:00")
        london = add_user(conn, quiet_hours="22:00-07:00", timezone="Europe/London")  # 22:00 there: held to 06:00Z
        for user in (amsterdam, london):
            add_pref(conn, user)
        event(conn, EVENING, severity=2)
        event(conn, EVENING, severity=3)
        add_delivery(conn, amsterdam, add_event(conn, status="fanned_out"), attempts=1,
                     next_retry_at=EVENING + timedelta(minutes=5))  # a retry is not held
    fan_out(db, settings, EVENING)
    env = {"DATABASE_URL": db_url}

    def status(*args):
        result = CliRunner().invoke(cli, ["status", "--now", EVENING.isoformat(), *args], env=env)
        assert result.exit_code == 0, result.output
        return result.output

    assert "instant deliveries held by quiet hours: 4 (earliest release 2026-05-13 05:00:00 UTC)" in status()
    report = json.loads(status("--json"))
    assert report["held_by_quiet_hours"] == {"count": 4, "earliest_release": "2026-05-13 05:00:00+00:00"}
    later = CliRunner().invoke(cli, ["status", "--now", MORNING.isoformat()], env=env).output
    assert "held by quiet hours: 2 (earliest release 2026-05-13 06:00:00 UTC)" in later
