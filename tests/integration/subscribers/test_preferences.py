"""The preferences page's logic (alerts/subscribers/preferences.py) on PostgreSQL and SQLite:
its token, the "Manage alerts" link of every email, what the page shows, how a form
becomes changes, that invalid input saves nothing, and that a save changes what the
pipeline does next — plus the unsubscribe marks that resubscribing restores."""
from __future__ import annotations

import email
import re
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from email import policy

import pytest
import sqlalchemy as sa

from alerts.core import tables as m
from alerts.core import tokens
from alerts.phases.fanout import run_phase_b
from alerts.phases.pipeline import run_phases, session
from alerts.subscribers import preferences as prefs
from alerts.subscribers import unsubscribe as unsub
from tests.support.clock import NO_CHANNELS, clock_at
from tests.support.factories import (WINDOW_END, add_delivery, add_digest, add_event, add_pref, add_user,
                                     rows)

UTC = timezone.utc
KEY = "k" * 16 + "0123456789abcdef"
PUBLIC_URL = "https://alerts.example.com"
NOW = datetime(2026, 5, 12, 12, 0, tzinfo=UTC)  # 14:00 in Amsterdam


def public(settings):
    return replace(settings, public_url=PUBLIC_URL, secret_key=KEY)


def dump(engine) -> dict:
    with engine.connect() as conn:
        return {t.name: [dict(r._mapping) for r in conn.execute(sa.select(t).order_by(*t.primary_key.columns or t.c))]
                for t in m.metadata.sorted_tables}


def load(engine, user_id, settings, now=NOW) -> prefs.Page:
    with engine.connect() as conn:
        return prefs.load(conn, user_id, settings, now)


def submit(engine, settings, user_id, form: dict, now=NOW) -> dict:
    """Read the form against the page as it stands and save it when it has no errors,
    as the web app does; the errors."""
    with engine.begin() as conn:
        page = prefs.load(conn, user_id, settings, now)
        changes, errors = prefs.read_form(page, form)
        if not errors:
            prefs.save(conn, page, changes, now)
    return errors


def as_shown(page: prefs.Page) -> dict:
    """The form exactly as the page would submit it untouched."""
    form = {prefs.TIMEZONE: page.timezone or "", prefs.SEND_TIME: page.send_time or "",
            prefs.QUIET_START: page.quiet_start, prefs.QUIET_END: page.quiet_end, prefs.NEW_TYPE: ""}
    if len(page.periods) > 1:
        form[prefs.PERIOD] = page.digest_period
    for channel in page.channels:
        if channel.subscriptions and channel.on:
            form[prefs.CHANNEL_FIELD.format(channel.name)] = prefs.ON
    for s in page.subscriptions:
        form[prefs.sub_field(s.id, "severity")] = str(s.min_severity)
        form[prefs.sub_field(s.id, "kind")] = s.delivery_kind
        if s.enabled:
            form[prefs.sub_field(s.id, "enabled")] = prefs.ON
    return form


def pref_rows(engine, user_id) -> list[dict]:
    p = m.user_alert_prefs
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(
            sa.select(p.c.id, p.c.alert_type, p.c.region, p.c.channel, p.c.delivery_kind, p.c.min_severity,
                      p.c.enabled, p.c.unsubscribed_at).where(p.c.user_id == user_id).order_by(p.c.id))]


def user_row(engine, user_id) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(m.users).where(m.users.c.id == user_id)).one()._mapping)


@pytest.fixture
def user(engine):
    """Jane: email digest of price spikes, instant email of everything from severity 3,
    Telegram instant of outages in NL."""
    with engine.begin() as conn:
        uid = add_user(conn, email="jane.doe@example.com", telegram_chat_id="123456789")
        add_pref(conn, uid, alert_type="price_spike", delivery_kind="digest")
        add_pref(conn, uid, min_severity=3)
        add_pref(conn, uid, channel="telegram", alert_type="pipeline_outage", region="NL")
    return uid


def sub_id(engine, user_id, channel, alert_type) -> int:
    return next(r["id"] for r in pref_rows(engine, user_id) if (r["channel"], r["alert_type"]) == (channel, alert_type))


# --- the token ---------------------------------------------------------------------------

def test_a_preferences_token_names_one_user_and_reads_back_for_a_year():
    token = tokens.make_preferences_token(KEY, 42, NOW)
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", token) and "42" not in token.split(".")[-1]
    assert tokens.read_preferences_token(KEY, token, NOW) == 42
    assert tokens.read_preferences_token(KEY, token, NOW + timedelta(days=90)) == 42
    assert tokens.read_preferences_token(KEY, token, NOW + tokens.PREFERENCES_MAX_AGE) == 42
    with pytest.raises(tokens.ExpiredToken):
        tokens.read_preferences_token(KEY, token, NOW + tokens.PREFERENCES_MAX_AGE + timedelta(seconds=1))


@pytest.mark.parametrize("forge", [
    lambda: tokens.make_preferences_token("another key of more than thirty-two characters", 42, NOW),
    lambda: tokens.make_token(KEY, 42, "email"),  # an unsubscribe token: another salt
    lambda: tokens.make_preferences_token(KEY, 42, NOW)[:-1],
    lambda: tokens.make_preferences_token(KEY, 42, NOW)[:-2] + "AA",
    lambda: "W1s0Ml0sMV0.not-a-signature",
    lambda: "",
])
def test_an_altered_forged_or_other_token_is_refused(forge):
    with pytest.raises(tokens.BadToken) as info:
        tokens.read_preferences_token(KEY, forge(), NOW)
    assert not isinstance(info.value, tokens.ExpiredToken)


def test_a_preferences_token_is_no_unsubscribe_token():
    with pytest.raises(tokens.BadToken):
        tokens.read_token(KEY, tokens.make_preferences_token(KEY, 42, NOW))


def test_the_link_needs_a_public_url(settings):
    assert tokens.preferences_url(settings, 1) is None
    url = tokens.preferences_url(public(settings), 7, NOW)
    assert url.startswith(f"{PUBLIC_URL}/preferences/")
    assert tokens.read_preferences_token(KEY, url.rsplit("/", 1)[1], NOW) == 7


# --- "Manage alerts" in every email ------------------------------------------------------

def _send(engine, settings, now):
    with session(engine, settings) as (db, channels):
        return run_phases(db, ("c",), clock_at(now), settings, channels)["c"]


def test_every_email_carries_a_manage_alerts_link_in_both_parts(engine, live_settings, smtp_server):
    settings = public(live_settings)
    with engine.begin() as conn:
        instant_user = add_user(conn, email="ann@example.com")
        digest_user = add_user(conn, email="bob@example.com")
        add_delivery(conn, instant_user, add_event(conn, status="fanned_out"))
        add_digest(conn, digest_user)
    assert _send(engine, settings, WINDOW_END + timedelta(minutes=1)) == {
        "instant": {"sent": 1, "retried": 0, "failed": 0, "skipped": 0},
        "digests": {"sent": 1, "retried": 0, "failed": 0, "skipped": 0}}
    for mail in smtp_server.messages:
        message = email.message_from_bytes(mail.data, policy=policy.default)
        text = message.get_body(("plain",)).get_content()
        html = message.get_body(("html",)).get_content()
        url = re.search(r"^Manage alerts: (\S+)\r?$", text, re.M).group(1)
        assert f'<a href="{url}" style="color:#888888;">Manage alerts</a>' in html
        owner = {"ann@example.com": instant_user, "bob@example.com": digest_user}[mail.rcpt_tos[0]]
        token = url.removeprefix(f"{PUBLIC_URL}/preferences/")
        assert tokens.read_preferences_token(KEY, token, datetime.now(UTC)) == owner


def test_without_a_public_url_emails_carry_no_manage_link(engine, live_settings, smtp_server):
    with engine.begin() as conn:
        add_delivery(conn, add_user(conn), add_event(conn, status="fanned_out"))
    _send(engine, live_settings, NOW)
    (mail,) = smtp_server.messages
    assert "Manage alerts" not in mail.message.get_body(("plain",)).get_content()
    assert "/preferences/" not in mail.message.get_body(("html",)).get_content()


# --- what the page shows ---------------------------------------------------------------------

def test_the_page_shows_each_channel_masked_with_its_state_and_every_subscription(engine, settings, user):
    page = load(engine, user, settings)
    assert [(c.name, c.address, c.on, c.subscriptions) for c in page.channels] == [
        ("email", "j***@example.com", True, 2), ("telegram", "***89", True, 1), ("sms", None, False, 0)]
    assert [(s.alert_type, s.region, s.channel, s.min_severity, s.delivery_kind, s.enabled)
            for s in page.subscriptions] == [
        ("*", "*", "email", 3, "instant", True), ("price_spike", "*", "email", 1, "digest", True),
        ("pipeline_outage", "NL", "telegram", 1, "instant", True)]
    assert load(engine, 10_000, settings) is None


def test_new_subscriptions_offer_the_types_and_regions_of_the_last_90_days(engine, settings, user):
    with engine.begin() as conn:
        add_event(conn, alert_type="price_spike", region="DE", created_at=NOW - timedelta(days=3))
        add_event(conn, alert_type="lng_delay", region="NL", status="fanned_out", created_at=NOW - timedelta(days=89))
        add_event(conn, alert_type="old_news", region="FR", created_at=NOW - timedelta(days=91))
        add_event(conn, alert_type="bad type!", region="XX", status="rejected", created_at=NOW)
        add_event(conn, alert_type="no_region", region=None, created_at=NOW)
    page = load(engine, user, settings)
    assert page.alert_types == ("*", "lng_delay", "no_region", "price_spike")
    assert page.regions == ("*", "DE", "NL")


def test_a_channel_without_an_address_is_not_offered_but_telegram_is_when_it_can_be_connected(engine, settings):
    with engine.begin() as conn:
        uid = add_user(conn, email="x@example.com")
    offered = lambda s: [c.name for c in load(engine, uid, s).channels if c.can_add]  # noqa: E731
    assert offered(settings) == ["email"]
    assert offered(replace(settings, telegram_bot_username="energy_bot")) == ["email", "telegram"]


@pytest.mark.parametrize("plan,plans,default,offered", [
    ("free", frozenset({"pro"}), "daily", ("daily",)),
    ("pro", frozenset({"pro"}), "daily", ("daily", "hourly")),
    ("pro", frozenset({"pro"}), "hourly", ("hourly",)),
])
def test_hourly_digests_are_offered_only_on_a_plan_that_has_them(engine, settings, plan, plans, default, offered):
    with engine.begin() as conn:
        uid = add_user(conn, plan=plan)
    page = load(engine, uid, replace(settings, hourly_digest_plans=plans, digest_period=default))
    assert page.periods == offered


def test_a_block_in_force_is_shown_on_its_channel(engine, settings, user):
    with engine.begin() as conn:
        conn.execute(sa.insert(m.user_channel_blocks).values(user_id=user, channel="telegram", address="123456789",
                                                             reason="bot blocked by the user", created_at=NOW))
    page = load(engine, user, settings)
    assert page.channel("telegram").blocked == "bot blocked by the user"
    assert page.channel("email").blocked is None


# --- saving --------------------------------------------------------------------------------

def test_an_untouched_form_changes_nothing(engine, settings, user):
    before = dump(engine)
    assert submit(engine, settings, user, as_shown(load(engine, user, settings))) == {}
    assert dump(engine) == before


def test_a_subscription_moves_from_digest_to_instant_with_a_new_severity(engine, settings, user):
    spike = sub_id(engine, user, "email", "price_spike")
    form = as_shown(load(engine, user, settings))
    form.update({prefs.sub_field(spike, "kind"): "instant", prefs.sub_field(spike, "severity"): "4"})
    assert submit(engine, settings, user, form) == {}
    row = next(r for r in pref_rows(engine, user) if r["id"] == spike)
    assert (row["delivery_kind"], row["min_severity"], row["enabled"]) == ("instant", 4, True)


def test_the_digest_time_zone_and_quiet_hours_are_saved(engine, settings, user):
    settings = replace(settings, hourly_digest_plans=frozenset({"free"}))
    form = as_shown(load(engine, user, settings))
    form.update({prefs.SEND_TIME: "8:30", prefs.TIMEZONE: "America/New_York", prefs.QUIET_START: "22:00",
                 prefs.QUIET_END: "07:00:00", prefs.PERIOD: "hourly"})
    assert submit(engine, settings, user, form) == {}
    row = user_row(engine, user)
    assert (row["digest_send_time"], row["timezone"], row["quiet_hours"], row["digest_period"]) == (
        "08:30", "America/New_York", "22:00-07:00", "hourly")
    form.update({prefs.SEND_TIME: "", prefs.TIMEZONE: "", prefs.QUIET_START: "", prefs.QUIET_END: ""})
    assert submit(engine, settings, user, form) == {}
    row = user_row(engine, user)
    assert (row["digest_send_time"], row["timezone"], row["quiet_hours"]) == (None, None, None), "empty: the defaults"


def test_a_subscription_is_removed_and_another_added(engine, settings, user):
    with engine.begin() as conn:
        add_event(conn, alert_type="lng_delay", region="NL", created_at=NOW)
    everything = sub_id(engine, user, "email", "*")
    form = as_shown(load(engine, user, settings))
    form.update({prefs.sub_field(everything, "remove"): prefs.ON, prefs.NEW_TYPE: "lng_delay", prefs.NEW_REGION: "NL",
                 prefs.NEW_CHANNEL: "telegram", prefs.NEW_KIND: "digest", prefs.NEW_SEVERITY: "2"})
    assert submit(engine, settings, user, form) == {}
    got = {(r["channel"], r["alert_type"], r["region"], r["delivery_kind"], r["min_severity"], r["enabled"])
           for r in pref_rows(engine, user)}
    assert got == {("email", "price_spike", "*", "digest", 1, True),
                   ("telegram", "pipeline_outage", "NL", "instant", 1, True),
                   ("telegram", "lng_delay", "NL", "digest", 2, True)}


def test_a_subscription_removed_can_be_added_again_in_the_same_save(engine, settings, user):
    spike = sub_id(engine, user, "email", "price_spike")
    with engine.begin() as conn:
        add_event(conn, alert_type="price_spike", created_at=NOW)
    form = as_shown(load(engine, user, settings))
    form.update({prefs.sub_field(spike, "remove"): prefs.ON, prefs.NEW_TYPE: "price_spike", prefs.NEW_REGION: "*",
                 prefs.NEW_CHANNEL: "email", prefs.NEW_KIND: "instant", prefs.NEW_SEVERITY: "5"})
    assert submit(engine, settings, user, form) == {}
    assert [(r["alert_type"], r["delivery_kind"], r["min_severity"]) for r in pref_rows(engine, user)
            if r["alert_type"] == "price_spike"] == [("price_spike", "instant", 5)]


def test_a_subscription_switched_off_and_on_alone(engine, settings, user):
    spike = sub_id(engine, user, "email", "price_spike")
    form = as_shown(load(engine, user, settings))
    del form[prefs.sub_field(spike, "enabled")]
    assert submit(engine, settings, user, form) == {}
    assert [r["enabled"] for r in pref_rows(engine, user)] == [False, True, True]
    assert load(engine, user, settings).channel("email").on, "the channel stays on while another subscription is"


@pytest.mark.parametrize("change,field", [
    ({prefs.TIMEZONE: "Mars/Olympus_Mons"}, prefs.TIMEZONE),
    ({prefs.TIMEZONE: "localtime"}, prefs.TIMEZONE),
    ({prefs.SEND_TIME: "25:00"}, prefs.SEND_TIME),
    ({prefs.SEND_TIME: "8h"}, prefs.SEND_TIME),
    ({prefs.QUIET_START: "22:00", prefs.QUIET_END: "22:00"}, prefs.QUIET_END),
    ({prefs.QUIET_START: "22:00", prefs.QUIET_END: ""}, prefs.QUIET_END),
    ({prefs.QUIET_START: "", prefs.QUIET_END: "07:00"}, prefs.QUIET_START),
    ({prefs.QUIET_START: "22:60", prefs.QUIET_END: "07:00"}, prefs.QUIET_START),
    ({prefs.PERIOD: "weekly"}, prefs.PERIOD),
    ({prefs.NEW_TYPE: "price_spike", prefs.NEW_REGION: "*", prefs.NEW_CHANNEL: "email", prefs.NEW_KIND: "instant",
      prefs.NEW_SEVERITY: "2"}, prefs.NEW_TYPE),  # Jane has that one already
    ({prefs.NEW_TYPE: "made_up", prefs.NEW_REGION: "*", prefs.NEW_CHANNEL: "email", prefs.NEW_KIND: "instant",
      prefs.NEW_SEVERITY: "2"}, prefs.NEW_TYPE),
    ({prefs.NEW_TYPE: "*", prefs.NEW_REGION: "Atlantis", prefs.NEW_CHANNEL: "email", prefs.NEW_KIND: "instant",
      prefs.NEW_SEVERITY: "2"}, prefs.NEW_REGION),
    ({prefs.NEW_TYPE: "*", prefs.NEW_REGION: "*", prefs.NEW_CHANNEL: "sms", prefs.NEW_KIND: "instant",
      prefs.NEW_SEVERITY: "2"}, prefs.NEW_CHANNEL),  # no phone number
    ({prefs.NEW_TYPE: "*", prefs.NEW_REGION: "DE", prefs.NEW_CHANNEL: "email", prefs.NEW_KIND: "instant",
      prefs.NEW_SEVERITY: "0"}, prefs.NEW_SEVERITY),
    ({prefs.NEW_TYPE: "*", prefs.NEW_REGION: "DE", prefs.NEW_CHANNEL: "email", prefs.NEW_KIND: "weekly",
      prefs.NEW_SEVERITY: "2"}, prefs.NEW_KIND),
])
def test_invalid_input_names_its_field_and_saves_nothing(engine, settings, user, change, field):
    settings = replace(settings, hourly_digest_plans=frozenset({"free"}))
    with engine.begin() as conn:
        add_event(conn, alert_type="price_spike", region="DE", created_at=NOW)
    form = as_shown(load(engine, user, settings))
    form.update({prefs.SEND_TIME: "09:00"}, **{prefs.sub_field(sub_id(engine, user, "email", "*"), "severity"): "5"})
    form.update(change)
    before = dump(engine)
    errors = submit(engine, settings, user, form)
    assert list(errors) == [field], errors
    assert dump(engine) == before, "the valid changes beside it are not saved either"


@pytest.mark.parametrize("name,value", [("severity", "6"), ("severity", "three"), ("kind", "weekly")])
def test_an_invalid_subscription_field_is_named(engine, settings, user, name, value):
    spike = sub_id(engine, user, "email", "price_spike")
    form = {**as_shown(load(engine, user, settings)), prefs.sub_field(spike, name): value}
    before = dump(engine)
    assert list(submit(engine, settings, user, form)) == [prefs.sub_field(spike, name)]
    assert dump(engine) == before


def test_sms_cannot_be_made_a_digest(engine, settings):
    with engine.begin() as conn:
        uid = add_user(conn, phone="+31612345678")
        sms = add_pref(conn, uid, channel="sms")
    form = {**as_shown(load(engine, uid, settings)), prefs.sub_field(sms, "kind"): "digest"}
    assert list(submit(engine, settings, uid, form)) == [prefs.sub_field(sms, "kind")]


# --- channels on and off: the unsubscribe and the resubscribe ---------------------------------

def test_a_channel_switched_off_is_the_unsubscribe_and_on_again_restores_only_what_it_turned_off(
        engine, settings, user):
    spike = sub_id(engine, user, "email", "price_spike")
    with engine.begin() as conn:
        conn.execute(sa.update(m.user_alert_prefs).where(m.user_alert_prefs.c.id == spike).values(enabled=False))
        queued = add_delivery(conn, user, add_event(conn, status="fanned_out"))
    form = as_shown(load(engine, user, settings))
    del form[prefs.CHANNEL_FIELD.format("email")]
    assert submit(engine, settings, user, form) == {}
    emails = [r for r in pref_rows(engine, user) if r["channel"] == "email"]
    assert [(r["alert_type"], r["enabled"], r["unsubscribed_at"] is not None) for r in emails] == [
        ("price_spike", False, False), ("*", False, True)]
    with engine.connect() as conn:
        assert conn.execute(sa.select(m.user_alert_deliveries.c.status, m.user_alert_deliveries.c.last_error)
                            .where(m.user_alert_deliveries.c.id == queued)).one() == ("skipped", "unsubscribed")
    page = load(engine, user, settings)
    assert not page.channel("email").on
    assert [s.off_with_channel for s in page.subscriptions if s.channel == "email"] == [True, False]

    form = {**as_shown(page), prefs.CHANNEL_FIELD.format("email"): prefs.ON}
    assert submit(engine, settings, user, form) == {}
    assert [(r["alert_type"], r["enabled"], r["unsubscribed_at"]) for r in pref_rows(engine, user)
            if r["channel"] == "email"] == [("price_spike", False, None), ("*", True, None)]


def test_a_channel_switch_wins_over_its_subscriptions_boxes(engine, settings, user):
    form = as_shown(load(engine, user, settings))
    del form[prefs.CHANNEL_FIELD.format("telegram")]  # the boxes of its subscriptions stay ticked
    assert submit(engine, settings, user, form) == {}
    assert not load(engine, user, settings).channel("telegram").on


def test_unsubscribe_marks_only_the_preferences_it_turns_off_and_resubscribe_restores_them(engine, user):
    spike = sub_id(engine, user, "email", "price_spike")
    with engine.begin() as conn:
        conn.execute(sa.update(m.user_alert_prefs).where(m.user_alert_prefs.c.id == spike).values(enabled=False))
        unsub.unsubscribe(conn, user, "email", NOW)
    marks = {r["alert_type"]: r["unsubscribed_at"] for r in pref_rows(engine, user) if r["channel"] == "email"}
    assert marks == {"price_spike": None, "*": NOW}
    with engine.begin() as conn:
        unsub.unsubscribe(conn, user, "email", NOW + timedelta(hours=1))  # again: the first mark stays
        assert unsub.resubscribe(conn, user, "email") == 1
    assert [(r["alert_type"], r["enabled"], r["unsubscribed_at"]) for r in pref_rows(engine, user)
            if r["channel"] == "email"] == [("price_spike", False, None), ("*", True, None)]


def test_resubscribing_a_channel_turned_off_without_marks_turns_all_of_it_on(engine, user):
    """Preferences an unsubscribe turned off before the marks existed have none."""
    with engine.begin() as conn:
        conn.execute(sa.update(m.user_alert_prefs).where(m.user_alert_prefs.c.channel == "email")
                     .values(enabled=False))
        assert unsub.resubscribe(conn, user, "email") == 2
    assert all(r["enabled"] for r in pref_rows(engine, user))


# --- what a save changes in the pipeline -------------------------------------------------------

def test_changes_apply_to_events_fanned_out_after_the_save_and_built_digests_keep_their_windows(
        db, engine, settings, user):
    with engine.begin() as conn:
        built = add_digest(conn, user)
        # Severity 2: below Jane's instant "everything from 3", so only the price-spike subscription matches.
        before_save = add_event(conn, alert_type="price_spike", severity=2, status="ready", created_at=NOW)
    run_phase_b(db, clock_at(NOW), settings, NO_CHANNELS)
    spike = sub_id(engine, user, "email", "price_spike")
    form = {**as_shown(load(engine, user, settings)), prefs.sub_field(spike, "kind"): "instant",
            prefs.SEND_TIME: "08:00"}
    assert submit(engine, settings, user, form) == {}
    with engine.begin() as conn:
        after_save = add_event(conn, alert_type="price_spike", severity=2, status="ready", created_at=NOW)
    run_phase_b(db, clock_at(NOW + timedelta(minutes=1)), settings, NO_CHANNELS)
    with engine.connect() as conn:
        kinds = {(d["alert_event_id"], d["channel"]): d["delivery_kind"] for d in rows(conn, m.user_alert_deliveries)}
        digest = rows(conn, m.user_alert_digests)[0]
    assert kinds[(before_save, "email")] == "digest" and kinds[(after_save, "email")] == "instant"
    assert (digest["id"], digest["window_start"], digest["window_end"]) == (
        built, datetime(2026, 5, 11, 22, 0, tzinfo=UTC), WINDOW_END)
