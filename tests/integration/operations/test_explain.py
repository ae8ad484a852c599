"""`alerts explain`: every decision from one event to one user's messages, read back from
the rows the real phases wrote (PostgreSQL and SQLite) — the event's status, each
subscription and why it did or did not match, what became of the delivery on every
channel (held, superseded, blocked, unsubscribed, retried, stuck) and the digest it
joined — and the command's output, JSON and exit codes."""
from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from alerts.cli import cli
from alerts.core import tables as m
from alerts.operations.explain import Unknown, explain, render
from alerts.phases.pipeline import run_phases, session
from alerts.sending import blocks
from alerts.sending.outbox import skip_queued
from alerts.subscribers import unsubscribe as unsub
from tests.support.clock import clock_at
from tests.support.factories import add_delivery, add_event, add_pref, add_user
from tests.support.fakes.fixtures import with_fakes

UTC = timezone.utc
NOON = datetime(2026, 5, 12, 10, 0, tzinfo=UTC)  # 12:00 in Amsterdam (CEST)
ADDRESS = "jane.doe@example.com"


def run(engine, settings, now, phases=("a", "b", "d", "c")) -> dict:
    with session(engine, settings) as (db, channels):
        return run_phases(db, phases, clock_at(now), settings, channels)


def why(engine, settings, user_id, event_id, now) -> dict:
    with engine.connect() as conn:
        return explain(conn, user_id, event_id, settings, now)


def channel(report: dict, name: str) -> dict:
    return next(c for c in report["channels"] if c["channel"] == name)


def invoke(db_url, *args, env=None):
    return CliRunner().invoke(cli, ["explain", *args], env={"DATABASE_URL": db_url, **(env or {})})


def dump(engine) -> dict:
    with engine.connect() as conn:
        return {t.name: [dict(r._mapping) for r in conn.execute(sa.select(t).order_by(*t.primary_key.columns))]
                for t in m.metadata.sorted_tables}


def the_only(engine, table: sa.Table, **where) -> dict:
    with engine.connect() as conn:
        (row,) = conn.execute(sa.select(table).filter_by(**where)).mappings().all()
    return dict(row)


# --- the three cases support meets most --------------------------------------------------------

def test_an_instant_alert_that_was_sent_says_when(engine, settings, smtp_server):
    with engine.begin() as conn:
        user = add_user(conn, email=ADDRESS)
        instant = add_pref(conn, user, alert_type="pipeline_outage", min_severity=3)
        digest = add_pref(conn, user, delivery_kind="digest")
        event = add_event(conn, created_at=NOON)
    run(engine, with_fakes(settings, smtp_server), NOON)

    report = why(engine, settings, user, event, NOON + timedelta(minutes=5))

    assert report["event"]["status"] == "fanned_out"
    assert report["event"]["verdict"] == "fanned out at 2026-05-12 10:00:00 UTC"
    assert [(s["id"], s["matched"]) for s in report["subscriptions"]] == [(instant, True), (digest, True)]
    email = channel(report, "email")
    assert email["subscriptions_matched"] == [instant, digest]
    assert (email["matched_kind"], email["matched_kind_because"]) == (
        "instant", "an instant subscription wins over a digest one")
    assert email["delivered"] is True
    assert email["outcome"] == "sent at 2026-05-12 10:00:00 UTC"
    d = email["delivery"]
    assert (d["kind"], d["status"], d["attempts"], d["last_error"]) == ("instant", "sent", 1, None)
    assert channel(report, "telegram")["outcome"] == "no delivery: no subscription on telegram"


def test_a_digest_delivery_names_the_digest_it_joined_its_window_status_and_sent_at(engine, settings, smtp_server):
    with engine.begin() as conn:
        user = add_user(conn, email=ADDRESS)
        add_pref(conn, user, delivery_kind="digest")
        event = add_event(conn, created_at=NOON)
        add_event(conn, created_at=NOON + timedelta(hours=1))
    run(engine, settings, NOON + timedelta(hours=2), ("a", "b", "d"))
    after_window = datetime(2026, 5, 12, 22, 1, tzinfo=UTC)  # the Amsterdam day ended at 22:00 UTC

    before = channel(why(engine, settings, user, event, NOON + timedelta(hours=2)), "email")
    run(engine, with_fakes(settings, smtp_server), after_window, ("c",))
    after = channel(why(engine, settings, user, event, after_window), "email")

    digest = the_only(engine, m.user_alert_digests)
    assert before["delivered"] is None
    assert before["outcome"] == (f"in daily digest #{digest['id']} (Tuesday 12 May 2026, 00:00–24:00 "
                                 "Europe/Amsterdam, 2 item(s)): queued, goes out when its window closes at "
                                 "2026-05-12 22:00:00 UTC")
    assert after["delivered"] is True
    assert after["delivery"]["digest"] == {
        "id": digest["id"], "period": "daily", "sequence": 0, "window_start": "2026-05-11T22:00:00+00:00",
        "window_end": "2026-05-12T22:00:00+00:00", "window": "Tuesday 12 May 2026, 00:00–24:00 Europe/Amsterdam",
        "status": "sent", "attempts": 1, "next_retry_at": None, "last_error": None, "claimed_at": None,
        "sent_at": "2026-05-12T22:01:00+00:00", "items": 2}
    assert after["outcome"].endswith(": sent at 2026-05-12 22:01:00 UTC")
    assert (after["delivery"]["status"], after["delivery"]["last_error"]) == ("skipped", m.BATCHED_INTO_DIGEST)


@pytest.mark.parametrize("pref, reason", [
    ({"alert_type": "price_spike"}, "alert type 'price_spike', the event's is 'pipeline_outage'"),
    ({"region": "DE"}, "region 'DE', the event's is 'NL'"),
    ({"min_severity": 4}, "minimum severity 4 (high), the event's is 3 (elevated)"),
    ({"enabled": False}, "disabled"),
], ids=["type", "region", "severity", "disabled"])
def test_a_subscription_that_does_not_match_says_why(engine, settings, pref, reason):
    with engine.begin() as conn:
        user = add_user(conn)
        add_pref(conn, user, **pref)
        event = add_event(conn, created_at=NOON)
    run(engine, settings, NOON, ("a", "b"))

    report = why(engine, settings, user, event, NOON)

    (subscription,) = report["subscriptions"]
    assert (subscription["matched"], subscription["not_matched_because"]) == (False, [reason])
    email = channel(report, "email")
    assert (email["delivery"], email["delivered"]) == (None, False)
    assert email["outcome"] == "no delivery: none of the 1 subscription(s) on email matches"


def test_every_reason_is_listed_and_an_inactive_user_is_one(engine, settings):
    with engine.begin() as conn:
        user = add_user(conn, is_active=False)
        add_pref(conn, user, alert_type="price_spike", region="DE", min_severity=5)
        event = add_event(conn, created_at=NOON, region=None)
    (subscription,) = why(engine, settings, user, event, NOON)["subscriptions"]
    assert subscription["not_matched_because"] == [
        "alert type 'price_spike', the event's is 'pipeline_outage'", "region 'DE', the event's is none",
        "minimum severity 5 (critical), the event's is 3 (elevated)", "the user is inactive"]


# --- what became of a delivery -------------------------------------------------------------------

def test_an_instant_alert_held_by_quiet_hours_says_until_when(engine, settings):
    with engine.begin() as conn:
        user = add_user(conn, quiet_hours="11:00-15:00")  # Amsterdam; noon there is inside
        add_pref(conn, user)
        event = add_event(conn, created_at=NOON)
    run(engine, settings, NOON, ("a", "b"))

    email = channel(why(engine, settings, user, event, NOON), "email")

    assert email["delivery"]["held_by_quiet_hours_until"] == "2026-05-12T13:00:00+00:00"
    assert email["outcome"] == "held by quiet hours until 2026-05-12 13:00:00 UTC (15:00 Europe/Amsterdam)"
    assert email["delivered"] is None
    later = channel(why(engine, settings, user, event, NOON + timedelta(hours=4)), "email")
    assert later["outcome"].endswith("; due since then, waiting for a sender")


def test_a_retried_delivery_is_not_taken_for_one_held_by_quiet_hours(engine, settings, now):
    with engine.begin() as conn:
        user = add_user(conn)
        event = add_event(conn, status="fanned_out")
        add_delivery(conn, user, event, attempts=2, next_retry_at=now + timedelta(minutes=4),
                     last_error="smtp 451 4.3.0 try later", created_at=now - timedelta(minutes=10))
    email = channel(why(engine, settings, user, event, now), "email")
    assert email["delivery"]["held_by_quiet_hours_until"] is None
    assert email["outcome"] == ("queued after 2 failed attempt(s) (smtp 451 4.3.0 try later): "
                                "retry due at 2026-05-12 12:04:00 UTC")


def test_a_superseded_update_names_the_newer_event_and_what_became_of_it(engine, settings):
    with engine.begin() as conn:
        user = add_user(conn, quiet_hours="11:00-15:00")  # held, so the first is still queued
        add_pref(conn, user)
        first = add_event(conn, created_at=NOON, collapse_key="emden")
    run(engine, settings, NOON, ("a", "b"))
    with engine.begin() as conn:
        second = add_event(conn, created_at=NOON + timedelta(minutes=30), collapse_key="emden")
    run(engine, settings, NOON + timedelta(minutes=30), ("a", "b"))

    email = channel(why(engine, settings, user, first, NOON + timedelta(hours=1)), "email")

    newer = the_only(engine, m.user_alert_deliveries, alert_event_id=second)
    assert email["delivery"]["superseded_by"] == {"event_id": second, "delivery_id": newer["id"], "status": "queued",
                                                  "sent_at": None, "last_error": None}
    assert email["outcome"] == (f"skipped: superseded by #{second}, a newer event of the same story "
                                f"(its delivery #{newer['id']}: queued)")
    assert email["delivered"] is False


def test_a_blocked_destination_names_the_block_and_whether_it_still_holds(engine, settings, now):
    reason = "bounce: 5.1.1 550 5.1.1 user unknown"
    with engine.begin() as conn:
        user = add_user(conn, email=ADDRESS)
        add_pref(conn, user)
        event = add_event(conn, status="fanned_out")
        add_delivery(conn, user, event)
        blocks.record(conn, user, "email", ADDRESS, reason, now)
        skipped = skip_queued(conn, user, "email", m.destination_disabled(reason))
    assert skipped["user_alert_deliveries"] == 1

    email = channel(why(engine, settings, user, event, now), "email")
    assert email["delivery"]["blocked"] == reason
    assert email["outcome"] == f"skipped: the destination is blocked ({reason})"
    assert email["block"] == {"address": ADDRESS, "reason": reason, "since": now.isoformat(), "in_force": True}

    with engine.begin() as conn:
        conn.execute(sa.update(m.users).where(m.users.c.id == user).values(email="jane@new.example.com"))
    assert channel(why(engine, settings, user, event, now), "email")["block"]["in_force"] is False


def test_an_unsubscribed_channel_says_so_and_since_when(engine, settings, now):
    with engine.begin() as conn:
        user = add_user(conn)
        add_pref(conn, user)
        event = add_event(conn, status="fanned_out")
        add_delivery(conn, user, event)
        unsub.unsubscribe(conn, user, "email")

    email = channel(why(engine, settings, user, event, now), "email")

    assert email["delivery"]["unsubscribed"] is True
    assert email["outcome"] == "skipped: the user unsubscribed from this channel"
    assert email["unsubscribed"] is not None
    assert "unsubscribed: every subscription on this channel is off" in render(why(engine, settings, user, event, now))


def test_a_pending_digest_delivery_names_the_window_phase_d_then_puts_it_in(engine, settings):
    with engine.begin() as conn:
        user = add_user(conn, timezone="America/New_York", digest_send_time="08:00")
        add_pref(conn, user, delivery_kind="digest")
        event = add_event(conn, created_at=NOON)
    run(engine, settings, NOON, ("a", "b"))

    email = channel(why(engine, settings, user, event, NOON), "email")
    run(engine, settings, NOON, ("d",))
    built = the_only(engine, m.user_alert_digests)

    window = email["delivery"]["digest_window"]
    assert (window["window_start"], window["window_end"]) == (built["window_start"].isoformat(),
                                                              built["window_end"].isoformat())
    assert email["outcome"] == ("waiting for the digest build: joins the daily digest of "
                                "Mon 11 May 08:00 – Tue 12 May 08:00 America/New_York")  # 06:00 there: before 08:00


def test_a_failed_delivery_and_a_send_stuck_past_the_lease(engine, settings, now):
    with engine.begin() as conn:
        user = add_user(conn, telegram_chat_id="42")
        event = add_event(conn, status="fanned_out")
        add_delivery(conn, user, event, status="failed", attempts=5, last_error="smtp 550 5.7.1 rejected")
        add_delivery(conn, user, event, channel="telegram", status="sending", attempts=1,
                     claimed_at=now - timedelta(hours=1))
    report = why(engine, settings, user, event, now)
    assert channel(report, "email")["outcome"] == "failed after 5 attempts: smtp 550 5.7.1 rejected"
    assert channel(report, "telegram")["outcome"] == (
        "stuck in sending since 2026-05-12 11:00:00 UTC, past the 600s lease: the next recovery puts it back "
        "in the queue")


# --- when there is no delivery --------------------------------------------------------------------------

@pytest.mark.parametrize("status, verdict, outcome", [
    ("new", "new: not validated yet (phase A, intake, has not run since it was stored)",
     "no delivery yet: the event has not been fanned out"),
    ("ready", "ready: validated, not fanned out yet (phase B has not run since)",
     "no delivery yet: the event has not been fanned out"),
])
def test_an_event_not_fanned_out_yet_says_which_phase_it_waits_for(engine, settings, now, status, verdict, outcome):
    with engine.begin() as conn:
        user = add_user(conn)
        add_pref(conn, user)
        event = add_event(conn, status=status)
    report = why(engine, settings, user, event, now)
    assert report["event"]["verdict"] == verdict
    assert channel(report, "email")["outcome"] == outcome
    assert report["subscriptions"][0]["matched"] is True, "it will match once fanned out"


def test_a_rejected_event_gives_its_reason(engine, settings, now):
    with engine.begin() as conn:
        user = add_user(conn)
        add_pref(conn, user)
        event = add_event(conn, title=" ", created_at=NOON)
    run(engine, settings, NOON, ("a", "b"))
    report = why(engine, settings, user, event, now)
    assert report["event"]["status"] == "rejected"
    assert report["event"]["verdict"].startswith("rejected by intake: title")
    assert channel(report, "email")["outcome"] == "no delivery: the event was rejected by intake"


def test_a_subscription_made_after_the_fan_out_is_named_as_such(engine, settings):
    with engine.begin() as conn:
        user, other = add_user(conn), add_user(conn)
        add_pref(conn, other)
        event = add_event(conn, created_at=NOON)
    run(engine, settings, NOON, ("a", "b"))
    with engine.begin() as conn:
        late = add_pref(conn, user, created_at=NOON + timedelta(hours=1))

    email = channel(why(engine, settings, user, event, NOON + timedelta(hours=2)), "email")

    assert email["outcome"] == (f"no delivery: subscription #{late} matches, but was created after the event "
                                "was fanned out (2026-05-12 10:00:00 UTC)")


def test_a_subscription_turned_on_after_the_fan_out_is_named_as_changed(engine, settings):
    with engine.begin() as conn:
        user = add_user(conn)
        pref = add_pref(conn, user, enabled=False, created_at=NOON - timedelta(days=1))
        event = add_event(conn, created_at=NOON)
        add_delivery(conn, add_user(conn), event, status="sent", created_at=NOON)  # someone else's: the fan-out time
        conn.execute(sa.update(m.alert_events).values(status="fanned_out"))
        conn.execute(sa.update(m.user_alert_prefs).where(m.user_alert_prefs.c.id == pref).values(enabled=True))
    email = channel(why(engine, settings, user, event, NOON), "email")
    assert email["outcome"] == (f"no delivery: subscription #{pref} matches now, but did not when the event was "
                                "fanned out (2026-05-12 10:00:00 UTC): it (or the user) was changed since")


# --- the command --------------------------------------------------------------------------------------------

def test_the_command_prints_every_channel_and_changes_nothing(db_url, engine, settings):
    with engine.begin() as conn:
        user = add_user(conn, email=ADDRESS, telegram_chat_id="424242")
        add_pref(conn, user)
        add_pref(conn, user, channel="telegram", min_severity=4)
        event = add_event(conn, created_at=NOON)
    run(engine, settings, NOON, ("a", "b"))
    before = dump(engine)

    result = invoke(db_url, "--user", str(user), "--event", str(event), "--now", NOON.isoformat())

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"user {user}, time zone Europe/Amsterdam, daily digests at 00:00"
    assert f"email ({ADDRESS}): queued, due since 2026-05-12 10:00:00 UTC: waiting for a sender" in lines
    assert "telegram (424242): no delivery: none of the 1 subscription(s) on telegram matches" in lines
    assert "sms (no address): no delivery: no subscription on sms" in lines
    assert dump(engine) == before


def test_json_prints_the_same_as_one_object(db_url, engine, settings):
    with engine.begin() as conn:
        user = add_user(conn)
        add_pref(conn, user)
        event = add_event(conn, created_at=NOON)
    run(engine, settings, NOON, ("a", "b"))

    result = invoke(db_url, "--user", str(user), "--event", str(event), "--json", "--now", NOON.isoformat())

    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == why(engine, settings, user, event, NOON)


@pytest.mark.parametrize("which", ["user", "event"])
def test_an_unknown_user_or_event_exits_2_naming_it(db_url, engine, which):
    with engine.begin() as conn:
        ids = {"user": add_user(conn), "event": add_event(conn)}
    ids[which] = 4242
    result = invoke(db_url, "--user", str(ids["user"]), "--event", str(ids["event"]))
    assert result.exit_code == 2
    assert result.output.strip() == f"Error: --{which}: no {which} with id 4242"


def test_an_unknown_id_raises_a_lookup_error_naming_the_option(engine, settings, now):
    with engine.connect() as conn, pytest.raises(Unknown) as err:
        explain(conn, 1, 1, settings, now)
    assert err.value.option == "--user"


def test_producer_text_cannot_rewrite_the_terminal(engine, settings, now):
    with engine.begin() as conn:
        user = add_user(conn)
        event = add_event(conn, title="Flow \x1b[2Jcut", event_key="k\x1b]0;x\x07", status="fanned_out")
    shown = render(why(engine, settings, user, event, now))
    assert "\x1b" not in shown and "\\x1b[2J" in shown


def test_a_digest_bypass_is_named_when_it_makes_a_digest_subscription_instant(engine, settings, now):
    settings = replace(settings, digest_bypass_severity=3)
    with engine.begin() as conn:
        user = add_user(conn)
        add_pref(conn, user, delivery_kind="digest")
        event = add_event(conn)
    email = channel(why(engine, settings, user, event, now), "email")
    assert (email["matched_kind"], email["matched_kind_because"]) == (
        "instant", "severity 3 >= ALERTS_DIGEST_BYPASS_SEVERITY (3) skips the digest")


def test_it_runs_without_any_channel_configured(engine, settings, now):
    """An operator's shell need not hold the providers' secrets."""
    with engine.begin() as conn:
        user = add_user(conn)
        add_pref(conn, user)
        event = add_event(conn, created_at=NOON)
    run(engine, settings, NOON, ("a", "b", "c"))  # no channel configured: the sender skips it
    email = channel(why(engine, settings, user, event, now), "email")
    assert email["outcome"] == "skipped: email not configured: ALERTS_SMTP_HOST is not set"


def test_an_unreachable_database_is_one_line_naming_database_url():
    result = invoke("postgresql://alerts:s3cr3t@127.0.0.1:9/alerts", "--user", "1", "--event", "1")
    assert result.exit_code == 3
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: DATABASE_URL postgresql://alerts:***@127.0.0.1:9/alerts: cannot reach")
