"""Phase C — send (docs/architecture.md), through ``run_phases`` with real channels pointed at the
fake SMTP server and the fake Telegram/Twilio API, on PostgreSQL and SQLite.

What the channel tests already cover (classification of every provider answer, secrets
kept out of reasons, connection reuse) is not repeated here; these tests check what a
run does with each outcome: the row's status, attempts, last_error, next_retry_at and
sent_at, and what reached the providers.
"""
from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser

import pytest
import sqlalchemy as sa

from alerts.core import tables as m
from alerts.channels.registry import build_channels
from alerts.core.settings import Settings
from alerts.core.db import Database
from alerts.phases.send import run_phase_c
from alerts.phases.pipeline import run_phases, session
from tests.support.clock import clock_at
from tests.support.factories import WINDOW_END, add_delivery, add_digest, add_event, add_pref, add_user
from tests.support.fakes import ProviderApi
from tests.support.fakes.fixtures import with_fakes
from tests.support.fakes.provider_api import BLOCKED, CHAT_NOT_FOUND
from tests.support.fakes.smtp_server import MAILBOX_UNAVAILABLE
from tests.support.telegram_html import parse_telegram_html

UTC = timezone.utc
AFTER_WINDOW = WINDOW_END + timedelta(minutes=1)
CHAT_ID = "424242"
PHONE = "+31612345678"
HOSTILE_TITLE = """<script>alert(1)</script> & "quotes" 'apostrophes'"""
HOSTILE_SUMMARY = """Flow < 50% & "falling" — it's <b>bad</b> > expected"""


# --- helpers ------------------------------------------------------------------------------

def counts(sent=0, retried=0, failed=0, skipped=0) -> dict:
    return {"sent": sent, "retried": retried, "failed": failed, "skipped": skipped}


NOTHING = {"instant": counts(), "digests": counts()}


def run_c(engine, settings: Settings, now: datetime) -> dict:
    """One cron run of phase C, with the real channels of ``settings``."""
    return run(engine, settings, now, ("c",))["c"]


def run(engine, settings: Settings, now: datetime, phases: tuple[str, ...]) -> dict:
    with session(engine, settings) as (db, channels):
        return run_phases(db, phases, clock_at(now), settings, channels)


def row(engine, table: sa.Table, row_id: int) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(table).where(table.c.id == row_id)).one()._mapping)


def state(engine, table: sa.Table, row_id: int) -> tuple:
    r = row(engine, table, row_id)
    return r["status"], r["attempts"], r["last_error"], r["next_retry_at"], r["sent_at"]


def deliveries(engine, row_id: int) -> tuple:
    return state(engine, m.user_alert_deliveries, row_id)


def digests(engine, row_id: int) -> tuple:
    return state(engine, m.user_alert_digests, row_id)


def update(engine, table: sa.Table, row_id: int, **values) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(table).where(table.c.id == row_id).values(**values))


def add_recipient(conn, **cols) -> int:
    """A user reachable on every channel unless told otherwise."""
    return add_user(conn, **{"telegram_chat_id": CHAT_ID, "phone": PHONE, **cols})


def seed_instant(engine, channel: str = "email", user: dict | None = None, **event_cols) -> int:
    """A queued instant delivery of a fanned-out event, as Phase B leaves it."""
    with engine.begin() as conn:
        user_id = add_recipient(conn, **(user or {}))
        event = add_event(conn, status="fanned_out", **event_cols)
        return add_delivery(conn, user_id, event, channel=channel)


def seed_digest(engine, channel: str = "email", events: int = 2, user: dict | None = None, **cols) -> int:
    """A queued digest of the 2026-05-12 Amsterdam window, due when the window closes."""
    with engine.begin() as conn:
        return add_digest(conn, add_recipient(conn, **(user or {})), events=events, channel=channel, **cols)


def seed_digest_deliveries(engine, channel: str, events: list[dict], **user_cols) -> tuple[int, list[int]]:
    """Queued digest deliveries (as Phase B makes them) for events on 12 May 2026."""
    with engine.begin() as conn:
        user_id = add_recipient(conn, **user_cols)
        event_ids = []
        for hour, cols in zip((7, 9, 11, 13, 15), events):
            event_ids.append(add_event(conn, status="fanned_out", created_at=datetime(2026, 5, 12, hour, tzinfo=UTC),
                                       **cols))
            add_delivery(conn, user_id, event_ids[-1], channel=channel, delivery_kind="digest")
    return user_id, event_ids


def backoff_bounds(settings: Settings, attempt: int) -> tuple[timedelta, timedelta]:
    """The wait after failed attempt ``attempt``: equal jitter over the capped step."""
    step = min(settings.retry_max_seconds, settings.retry_base_seconds * 2 ** (attempt - 1))
    return timedelta(seconds=step / 2), timedelta(seconds=step)


def assert_retry_scheduled(settings: Settings, now: datetime, next_retry_at: datetime, attempt: int) -> None:
    low, high = backoff_bounds(settings, attempt)
    assert now + low <= next_retry_at <= now + high, (next_retry_at - now, low, high)


def the_only_digest(engine) -> dict:
    with engine.connect() as conn:
        (digest,) = conn.execute(sa.select(m.user_alert_digests)).mappings().all()
        return dict(digest)


def text_part(mail) -> str:
    return mail.message.get_body(preferencelist=("plain",)).get_content()


def html_part(mail) -> str:
    return mail.message.get_body(preferencelist=("html",)).get_content()


class _HtmlReader(HTMLParser):
    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.data: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.data.append(data)

    @property
    def text(self) -> str:
        return "".join(self.data)


# --- instant: what arrives -------------------------------------------------------------------

def test_an_instant_email_is_sent_as_text_then_html_and_the_row_marked_sent(engine, live_settings, now, smtp_server):
    delivery = seed_instant(engine, user={"email": "ann@example.com"}, title="Gas flow cut at Emden",
                            summary="Nominations down 40%")

    assert run_c(engine, live_settings, now) == {"instant": counts(sent=1), "digests": counts()}

    assert deliveries(engine, delivery) == ("sent", 1, None, None, now)
    (mail,) = smtp_server.messages
    assert mail.rcpt_tos == ["ann@example.com"]
    assert mail.message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in mail.message.iter_parts()] == ["text/plain", "text/html"]
    for part in (text_part(mail), _HtmlReader(html_part(mail)).text):
        assert "Gas flow cut at Emden" in part and "Nominations down 40%" in part
    assert mail.message["Message-ID"]
    assert run_c(engine, live_settings, now + timedelta(hours=1)) == NOTHING
    assert len(smtp_server.messages) == 1


def test_each_instant_email_has_its_own_message_id(engine, live_settings, now, smtp_server):
    seed_instant(engine)
    seed_instant(engine)

    run_c(engine, live_settings, now)

    first, second = smtp_server.messages
    assert first.message["Message-ID"] != second.message["Message-ID"]


def test_an_instant_telegram_message_is_html_with_link_previews_off(engine, live_settings, now, provider_api):
    delivery = seed_instant(engine, "telegram", title="Power price spike")

    assert run_c(engine, live_settings, now) == {"instant": counts(sent=1), "digests": counts()}

    assert deliveries(engine, delivery) == ("sent", 1, None, None, now)
    (sent,) = provider_api.telegram_messages
    assert (sent.chat_id, sent.parse_mode, sent.preview_disabled) == (CHAT_ID, "HTML", True)
    assert "Power price spike" in parse_telegram_html(sent.text)


def test_an_instant_sms_goes_through_the_twilio_api(engine, live_settings, now, provider_api):
    delivery = seed_instant(engine, "sms", title="Grid frequency alarm")

    assert run_c(engine, live_settings, now) == {"instant": counts(sent=1), "digests": counts()}

    assert deliveries(engine, delivery) == ("sent", 1, None, None, now)
    (sms,) = provider_api.sms_messages
    assert (sms.to, sms.from_) == (PHONE, live_settings.twilio_from)
    assert "Grid frequency alarm" in sms.body


# --- instant: transient failures ---------------------------------------------------------------

def test_an_smtp_451_is_retried_after_a_backoff_and_sent_once_due(engine, live_settings, now, smtp_server):
    delivery = seed_instant(engine)
    smtp_server.fail_data(times=1)

    assert run_c(engine, live_settings, now)["instant"] == counts(retried=1)

    status, attempts, last_error, next_retry_at, sent_at = deliveries(engine, delivery)
    assert (status, attempts, sent_at) == ("queued", 1, None)
    assert "451" in last_error
    assert_retry_scheduled(live_settings, now, next_retry_at, attempt=1)
    assert smtp_server.messages == []

    # Not due yet: a run just before the retry time sends nothing and changes nothing.
    assert run_c(engine, live_settings, next_retry_at - timedelta(seconds=1)) == NOTHING
    assert deliveries(engine, delivery) == ("queued", 1, last_error, next_retry_at, None)
    assert smtp_server.messages == []

    assert run_c(engine, live_settings, next_retry_at)["instant"] == counts(sent=1)
    assert deliveries(engine, delivery) == ("sent", 2, None, None, next_retry_at)
    assert len(smtp_server.messages) == 1


def test_retries_of_one_outage_are_spread_by_jitter(engine, live_settings, now, smtp_server):
    ids = [seed_instant(engine) for _ in range(6)]
    smtp_server.fail_data(times=None)

    assert run_c(engine, live_settings, now)["instant"] == counts(retried=6)

    waits = set()
    for delivery in ids:
        status, attempts, _, next_retry_at, _ = deliveries(engine, delivery)
        assert (status, attempts) == ("queued", 1)
        assert_retry_scheduled(live_settings, now, next_retry_at, attempt=1)
        waits.add(next_retry_at)
    assert len(waits) > 1


def test_backoff_doubles_up_to_its_cap_and_the_last_allowed_attempt_fails(db_url, engine, tmp_path, now, smtp_server):
    settings = with_fakes(Settings.from_env({
        "DATABASE_URL": db_url, "ALERTS_OUTBOX_DIR": str(tmp_path),
        "ALERTS_MAX_ATTEMPTS": "4", "ALERTS_RETRY_BASE_SECONDS": "10", "ALERTS_RETRY_MAX_SECONDS": "25",
    }), smtp_server)
    delivery = seed_instant(engine)
    smtp_server.fail_data(times=None)

    at = now
    for attempt in (1, 2, 3):  # steps 10, 20, 25 (capped)
        assert run_c(engine, settings, at)["instant"] == counts(retried=1)
        status, attempts, last_error, next_retry_at, _ = deliveries(engine, delivery)
        assert (status, attempts) == ("queued", attempt) and "451" in last_error
        assert_retry_scheduled(settings, at, next_retry_at, attempt)
        at = next_retry_at

    assert run_c(engine, settings, at)["instant"] == counts(failed=1)
    status, attempts, last_error, next_retry_at, sent_at = deliveries(engine, delivery)
    assert (status, attempts, next_retry_at, sent_at) == ("failed", 4, None, None)
    assert "451" in last_error

    smtp_server.reset()
    assert run_c(engine, settings, at + timedelta(days=1)) == NOTHING
    assert smtp_server.messages == []


def _drop_during_data(smtp_server) -> threading.Thread:
    """Close the server side of the first session while its DATA is being answered."""
    def dropper():
        deadline = time.monotonic() + 10
        while smtp_server.open_connections == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # EHLO … DATA take milliseconds; the DATA answer waits 3 s
        smtp_server.data_delay = 0
        smtp_server.drop_connections()

    thread = threading.Thread(target=dropper, daemon=True)
    thread.start()
    return thread


def test_a_connection_dropped_mid_send_is_retried_and_the_run_goes_on(engine, live_settings, now, smtp_server):
    first = seed_instant(engine, user={"email": "first@example.com"})
    second = seed_instant(engine, user={"email": "second@example.com"})
    smtp_server.data_delay = 3.0
    dropper = _drop_during_data(smtp_server)

    assert run_c(engine, live_settings, now)["instant"] == counts(sent=1, retried=1)
    dropper.join()

    status, attempts, last_error, next_retry_at, sent_at = deliveries(engine, first)
    assert (status, attempts, sent_at) == ("queued", 1, None)
    assert last_error.startswith("smtp")
    assert_retry_scheduled(live_settings, now, next_retry_at, attempt=1)
    assert deliveries(engine, second) == ("sent", 1, None, None, now)

    assert run_c(engine, live_settings, next_retry_at)["instant"] == counts(sent=1)
    assert deliveries(engine, first) == ("sent", 2, None, None, next_retry_at)
    assert sorted(r for mail in smtp_server.messages for r in mail.rcpt_tos) == [
        "first@example.com", "second@example.com"]


@pytest.mark.parametrize("retry_after", [120, 5000], ids=["above-the-backoff", "above-the-cap"])
def test_a_telegram_429_is_not_retried_before_retry_after(engine, live_settings, now, provider_api, retry_after):
    delivery = seed_instant(engine, "telegram")
    provider_api.telegram_error(429, f"Too Many Requests: retry after {retry_after}", retry_after=retry_after,
                                times=1)

    assert run_c(engine, live_settings, now)["instant"] == counts(retried=1)

    status, attempts, last_error, next_retry_at, sent_at = deliveries(engine, delivery)
    assert (status, attempts, sent_at) == ("queued", 1, None)
    assert "429" in last_error
    assert next_retry_at >= now + timedelta(seconds=retry_after)
    assert run_c(engine, live_settings, now + timedelta(seconds=retry_after - 1)) == NOTHING

    assert run_c(engine, live_settings, next_retry_at)["instant"] == counts(sent=1)
    assert deliveries(engine, delivery) == ("sent", 2, None, None, next_retry_at)
    assert len(provider_api.telegram_messages) == 1


@pytest.mark.parametrize("channel, script, needle", [
    ("telegram", lambda api: api.telegram_error(500, "Internal Server Error"), "telegram 500"),
    ("telegram", lambda api: api.telegram_raw(502, "<html>502 Bad Gateway</html>"), "telegram 502"),
    ("sms", lambda api: api.twilio_error(503, None, "Service Unavailable"), "twilio 503"),
], ids=["telegram-500", "telegram-502-page", "twilio-503"])
def test_provider_server_errors_are_retried(engine, live_settings, now, provider_api, channel, script, needle):
    delivery = seed_instant(engine, channel)
    script(provider_api)

    assert run_c(engine, live_settings, now)["instant"] == counts(retried=1)

    status, attempts, last_error, next_retry_at, sent_at = deliveries(engine, delivery)
    assert (status, attempts, sent_at) == ("queued", 1, None)
    assert last_error.startswith(needle)
    assert_retry_scheduled(live_settings, now, next_retry_at, attempt=1)


def test_a_telegram_timeout_is_retried(engine, live_settings, now, provider_api):
    settings = replace(live_settings, http_timeout_seconds=0.3)
    delivery = seed_instant(engine, "telegram")
    provider_api.delay(3.0, service="telegram", times=1)

    assert run_c(engine, settings, now)["instant"] == counts(retried=1)

    status, attempts, last_error, next_retry_at, sent_at = deliveries(engine, delivery)
    assert (status, attempts, sent_at) == ("queued", 1, None)
    assert "timeout" in last_error
    assert_retry_scheduled(settings, now, next_retry_at, attempt=1)


# --- instant: permanent failures ----------------------------------------------------------------

@pytest.mark.parametrize("channel, script, reason", [
    ("email", lambda smtp, api: smtp.reject_recipient("gone@example.com"), "smtp 550 5.1.1 mailbox unavailable"),
    ("email", lambda smtp, api: smtp.fail_data(MAILBOX_UNAVAILABLE), "smtp 550 5.1.1 mailbox unavailable"),
    ("telegram", lambda smtp, api: api.telegram_error(*BLOCKED), "telegram 403: Forbidden: bot was blocked by the user"),
    ("telegram", lambda smtp, api: api.telegram_error(*CHAT_NOT_FOUND), "telegram 400: Bad Request: chat not found"),
    ("telegram", lambda smtp, api: api.telegram_error(
        400, "Bad Request: can't parse entities: Unsupported start tag \"x\" at byte offset 0"),
     "telegram 400: Bad Request: can't parse entities: Unsupported start tag \"x\" at byte offset 0"),
], ids=["smtp-550-rcpt", "smtp-550-data", "telegram-blocked", "telegram-chat-not-found", "telegram-bad-entities"])
def test_a_permanent_refusal_fails_at_once_with_the_providers_reason(engine, live_settings, now, smtp_server,
                                                                     provider_api, channel, script, reason):
    delivery = seed_instant(engine, channel, user={"email": "gone@example.com"})
    script(smtp_server, provider_api)

    assert run_c(engine, live_settings, now)["instant"] == counts(failed=1)

    assert deliveries(engine, delivery) == ("failed", 1, reason, None, None)
    assert run_c(engine, live_settings, now + timedelta(days=1)) == NOTHING
    assert smtp_server.messages == [] and provider_api.telegram_messages == []


def test_an_invalid_phone_number_fails_at_once(engine, live_settings, now, provider_api):
    delivery = seed_instant(engine, "sms", user={"phone": "12345"})

    assert run_c(engine, live_settings, now)["instant"] == counts(failed=1)

    status, attempts, last_error, next_retry_at, _ = deliveries(engine, delivery)
    assert (status, attempts, next_retry_at) == ("failed", 1, None)
    assert "21211" in last_error
    assert provider_api.sms_messages == []


# --- instant: skipped ------------------------------------------------------------------------

def test_unconfigured_channels_skip_their_deliveries_naming_what_is_missing(engine, settings, now):
    email, telegram, sms = (seed_instant(engine, channel) for channel in ("email", "telegram", "sms"))

    assert run_c(engine, settings, now) == {"instant": counts(skipped=3), "digests": counts()}

    for delivery, variable in ((email, "ALERTS_SMTP_HOST"), (telegram, "ALERTS_TELEGRAM_BOT_TOKEN"),
                               (sms, "ALERTS_TWILIO_ACCOUNT_SID")):
        status, attempts, last_error, next_retry_at, sent_at = deliveries(engine, delivery)
        assert (status, attempts, next_retry_at, sent_at) == ("skipped", 0, None, None)
        assert variable in last_error


def test_a_channel_left_unconfigured_does_not_stop_the_others(engine, settings, now, provider_api):
    settings = with_fakes(settings, api=provider_api)  # Telegram and SMS, but no SMTP
    email, telegram = seed_instant(engine, "email"), seed_instant(engine, "telegram")

    assert run_c(engine, settings, now)["instant"] == counts(sent=1, skipped=1)

    assert deliveries(engine, email)[0] == "skipped"
    assert deliveries(engine, telegram) == ("sent", 1, None, None, now)


@pytest.mark.parametrize("channel, user, column", [
    ("email", {"email": None}, "email"),
    ("telegram", {"telegram_chat_id": None}, "telegram_chat_id"),
    ("sms", {"phone": "   "}, "phone"),
])
def test_a_recipient_without_an_address_is_skipped_with_a_reason(engine, live_settings, now, smtp_server,
                                                                 provider_api, channel, user, column):
    delivery = seed_instant(engine, channel, user=user)

    assert run_c(engine, live_settings, now)["instant"] == counts(skipped=1)

    status, attempts, last_error, next_retry_at, sent_at = deliveries(engine, delivery)
    assert (status, attempts, next_retry_at, sent_at) == ("skipped", 0, None, None)
    assert column in last_error
    assert smtp_server.messages == [] and provider_api.telegram_messages == [] and provider_api.sms_messages == []


def test_a_user_deactivated_after_fan_out_is_skipped(engine, live_settings, now, smtp_server):
    delivery = seed_instant(engine, user={"is_active": False})

    assert run_c(engine, live_settings, now)["instant"] == counts(skipped=1)

    status, attempts, last_error, _, sent_at = deliveries(engine, delivery)
    assert (status, attempts, sent_at) == ("skipped", 0, None)
    assert "inactive" in last_error
    assert smtp_server.messages == []


def test_per_event_digest_deliveries_are_never_sent_on_their_own(engine, live_settings, now, smtp_server,
                                                                  provider_api):
    with engine.begin() as conn:
        user = add_recipient(conn)
        ids = [add_delivery(conn, user, add_event(conn, status="fanned_out"), channel=channel,
                            delivery_kind="digest") for channel in ("email", "telegram")]

    assert run_c(engine, live_settings, now) == NOTHING
    assert run_c(engine, live_settings, AFTER_WINDOW + timedelta(days=2)) == NOTHING

    for delivery in ids:
        assert deliveries(engine, delivery) == ("queued", 0, None, None, None)
    assert smtp_server.messages == [] and provider_api.telegram_messages == []


# --- crash safety: leases and fencing ----------------------------------------------------------

LEASE = 120


@pytest.fixture
def lease_settings(live_settings):
    return replace(live_settings, sending_lease_seconds=LEASE)


def _abandon(engine, kind: str, claimed_at: datetime, attempts: int) -> tuple[sa.Table, int]:
    """A row a killed sender left in ``sending``."""
    if kind == "instant":
        table, row_id = m.user_alert_deliveries, seed_instant(engine)
    else:
        table, row_id = m.user_alert_digests, seed_digest(engine)
    update(engine, table, row_id, status="sending", attempts=attempts, claimed_at=claimed_at)
    return table, row_id


@pytest.mark.parametrize("kind", ["instant", "digests"])
def test_a_send_abandoned_past_the_lease_is_retried_and_sent_once(engine, lease_settings, smtp_server, kind):
    now = AFTER_WINDOW
    table, row_id = _abandon(engine, kind, now - timedelta(seconds=LEASE + 1), attempts=1)

    result = run_c(engine, lease_settings, now)

    assert result[kind] == counts(sent=1)
    assert state(engine, table, row_id) == ("sent", 2, None, None, now)  # the interrupted attempt counts
    assert len(smtp_server.messages) == 1
    assert run_c(engine, lease_settings, now + timedelta(hours=1)) == NOTHING
    assert len(smtp_server.messages) == 1


@pytest.mark.parametrize("kind", ["instant", "digests"])
def test_a_send_still_within_its_lease_is_left_alone(engine, lease_settings, smtp_server, kind):
    now = AFTER_WINDOW
    claimed_at = now - timedelta(seconds=LEASE - 1)
    table, row_id = _abandon(engine, kind, claimed_at, attempts=1)

    assert run_c(engine, lease_settings, now) == NOTHING

    assert state(engine, table, row_id)[:2] == ("sending", 1)
    assert row(engine, table, row_id)["claimed_at"] == claimed_at
    assert smtp_server.messages == []


@pytest.mark.parametrize("kind", ["instant", "digests"])
def test_an_abandoned_send_with_its_attempts_used_up_fails(engine, lease_settings, smtp_server, kind):
    now = AFTER_WINDOW
    table, row_id = _abandon(engine, kind, now - timedelta(hours=1), attempts=lease_settings.max_attempts)

    run_c(engine, lease_settings, now)

    status, attempts, last_error, next_retry_at, sent_at = state(engine, table, row_id)
    assert (status, attempts, next_retry_at, sent_at) == ("failed", lease_settings.max_attempts, None, None)
    assert "lease" in last_error
    assert smtp_server.messages == []


@pytest.mark.parametrize("kind", ["instant", "digests"])
def test_a_send_whose_commit_was_lost_is_resent_with_the_same_message_id(engine, lease_settings, smtp_server, kind):
    """The one duplicate window docs/architecture.md leaves: the provider accepted, the outcome was
    never committed. The resend carries the same Message-ID so receivers can collapse it."""
    now = AFTER_WINDOW
    if kind == "instant":
        table, row_id = m.user_alert_deliveries, seed_instant(engine)
    else:
        table, row_id = m.user_alert_digests, seed_digest(engine)
    run_c(engine, lease_settings, now)
    update(engine, table, row_id, status="sending", sent_at=None, claimed_at=now)  # as if the commit was lost

    later = now + timedelta(seconds=LEASE + 1)
    assert run_c(engine, lease_settings, later)[kind] == counts(sent=1)

    assert state(engine, table, row_id) == ("sent", 2, None, None, later)
    first, again = smtp_server.messages
    assert first.message["Message-ID"] == again.message["Message-ID"]
    assert first.message["X-Alerts-Digest-Key"] == again.message["X-Alerts-Digest-Key"]


def test_a_stale_sender_cannot_overwrite_the_outcome_of_the_sender_that_took_over(engine, live_settings, now,
                                                                                  provider_api):
    """Sender A claims a Telegram delivery and hangs on the provider; after the lease a
    run at a later time re-claims and sends it; A's late answer must not be recorded."""
    delivery = seed_instant(engine, "telegram")
    with ProviderApi() as slow:
        slow.delay(60, service="telegram")
        slow_settings = replace(with_fakes(live_settings, api=slow), http_timeout_seconds=120)
        stale = threading.Thread(target=_run_phase_c_directly, args=(engine, slow_settings, now), daemon=True)
        stale.start()
        _wait_for(lambda: deliveries(engine, delivery)[0] == "sending")

        later = now + timedelta(seconds=live_settings.sending_lease_seconds + 1)
        assert run_c(engine, live_settings, later)["instant"] == counts(sent=1)

        slow.reset()  # A's request is answered now: 503, a transient failure A wants to record
        stale.join(30)
        assert not stale.is_alive()

    assert deliveries(engine, delivery) == ("sent", 2, None, None, later)
    assert len(provider_api.telegram_messages) == 1


def test_a_digest_put_back_after_a_crash_gains_no_items_that_arrived_meanwhile(engine, lease_settings,
                                                                                smtp_server):
    table, digest = _abandon(engine, "digests", AFTER_WINDOW - timedelta(hours=1), attempts=1)
    smtp_server.fail_data(times=1)
    assert run_c(engine, lease_settings, AFTER_WINDOW)["digests"] == counts(retried=1)
    _, attempts, _, next_retry_at, _ = digests(engine, digest)
    user = row(engine, table, digest)["user_id"]
    with engine.begin() as conn:  # a late event of the same window, for the same user and channel
        add_delivery(conn, user, add_event(conn, status="fanned_out", title="Late arrival",
                                           created_at=datetime(2026, 5, 12, 21, tzinfo=UTC)), delivery_kind="digest")

    result = run(engine, lease_settings, next_retry_at, ("d", "c"))

    assert result["d"]["digests_created"] == 1 and result["c"]["digests"] == counts(sent=2)
    assert digests(engine, digest) == ("sent", attempts + 1, None, None, next_retry_at)
    original, follow_up = sorted(smtp_server.messages, key=lambda mail: "Late arrival" in text_part(mail))
    assert "Late arrival" not in text_part(original) and text_part(original).count("Event ") == 2
    assert "Late arrival" in text_part(follow_up) and "Event " not in text_part(follow_up)
    assert original.message["Message-ID"] != follow_up.message["Message-ID"]


def _run_phase_c_directly(engine, settings, now):
    """A sender without the runner's phase lock, like a Celery send task."""
    channels = build_channels(settings)
    try:
        run_phase_c(Database(engine), clock_at(now), settings, channels)
    finally:
        channels.close()


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# --- digests ----------------------------------------------------------------------------------

def test_a_digest_is_sent_once_after_its_window_closes_with_every_item(engine, live_settings, now, smtp_server):
    titles = ["LNG terminal outage", "Day-ahead price spike", "Storage withdrawal record"]
    user, events = seed_digest_deliveries(engine, "email", [{"title": t} for t in titles],
                                          email="dora@example.com")

    result = run(engine, live_settings, now, ("d", "c"))
    assert result["d"]["digests_created"] == 1 and result["c"] == NOTHING
    digest = the_only_digest(engine)
    assert digest["next_retry_at"] == WINDOW_END
    assert run_c(engine, live_settings, WINDOW_END - timedelta(seconds=1)) == NOTHING
    assert smtp_server.messages == []

    assert run_c(engine, live_settings, AFTER_WINDOW) == {"instant": counts(), "digests": counts(sent=1)}

    assert digests(engine, digest["id"]) == ("sent", 1, None, None, AFTER_WINDOW)
    (mail,) = smtp_server.messages
    assert mail.rcpt_tos == ["dora@example.com"]
    assert mail.message["X-Alerts-Digest-Key"] == digest["digest_key"]
    assert mail.message["Message-ID"]
    assert "(3 alerts)" in mail.message["Subject"]
    assert [p.get_content_type() for p in mail.message.iter_parts()] == ["text/plain", "text/html"]
    for part in (text_part(mail), _HtmlReader(html_part(mail)).text):
        for title, event_id in zip(titles, events):
            assert title in part and f"#{event_id}" in part

    assert run(engine, live_settings, AFTER_WINDOW + timedelta(hours=1), ("a", "b", "d", "c"))["c"] == NOTHING
    assert len(smtp_server.messages) == 1


def test_a_telegram_digest_is_one_valid_html_message(engine, live_settings, now, provider_api):
    titles = ["LNG terminal outage", "Day-ahead price spike", "Storage withdrawal record"]
    _, events = seed_digest_deliveries(engine, "telegram", [{"title": t} for t in titles])
    run(engine, live_settings, now, ("d",))

    assert run_c(engine, live_settings, AFTER_WINDOW)["digests"] == counts(sent=1)

    assert digests(engine, the_only_digest(engine)["id"]) == ("sent", 1, None, None, AFTER_WINDOW)
    (sent,) = provider_api.telegram_messages
    assert (sent.chat_id, sent.parse_mode, sent.preview_disabled) == (CHAT_ID, "HTML", True)
    shown = parse_telegram_html(sent.text)
    for title, event_id in zip(titles, events):
        assert title in shown and f"#{event_id}" in shown


def test_sms_digests_are_never_sent(engine, live_settings, now, provider_api):
    with engine.begin() as conn:
        user = add_recipient(conn)
        add_pref(conn, user, channel="sms", delivery_kind="digest")
        event = add_event(conn, created_at=datetime(2026, 5, 12, 9, tzinfo=UTC))

    run(engine, live_settings, now, ("a", "b", "d", "c"))
    assert run(engine, live_settings, AFTER_WINDOW + timedelta(days=1), ("a", "b", "d", "c"))["c"] == NOTHING

    with engine.connect() as conn:
        (delivery,) = conn.execute(sa.select(m.user_alert_deliveries)).mappings().all()
        assert conn.execute(sa.select(sa.func.count()).select_from(m.user_alert_digests)).scalar() == 0
    assert (delivery["alert_event_id"], delivery["status"], delivery["last_error"]) == (
        event, "skipped", "sms_digest_not_supported")
    assert provider_api.sms_messages == []


def test_an_smtp_451_puts_a_digest_back_for_later_and_550_fails_it(engine, live_settings, smtp_server):
    retried, failed = seed_digest(engine), seed_digest(engine, user={"email": "gone@example.com"})
    smtp_server.fail_data(times=1)
    smtp_server.reject_recipient("gone@example.com")

    assert run_c(engine, live_settings, AFTER_WINDOW)["digests"] == counts(retried=1, failed=1)

    status, attempts, last_error, next_retry_at, sent_at = digests(engine, retried)
    assert (status, attempts, sent_at) == ("queued", 1, None) and "451" in last_error
    assert_retry_scheduled(live_settings, AFTER_WINDOW, next_retry_at, attempt=1)
    assert digests(engine, failed) == ("failed", 1, "smtp 550 5.1.1 mailbox unavailable", None, None)
    assert run_c(engine, live_settings, next_retry_at - timedelta(seconds=1)) == NOTHING

    assert run_c(engine, live_settings, next_retry_at)["digests"] == counts(sent=1)
    assert digests(engine, retried) == ("sent", 2, None, None, next_retry_at)
    assert len(smtp_server.messages) == 1


def test_a_telegram_429_holds_a_digest_back_at_least_retry_after(engine, live_settings, provider_api):
    digest = seed_digest(engine, "telegram")
    provider_api.telegram_error(429, "Too Many Requests: retry after 900", retry_after=900, times=1)

    assert run_c(engine, live_settings, AFTER_WINDOW)["digests"] == counts(retried=1)

    status, attempts, last_error, next_retry_at, sent_at = digests(engine, digest)
    assert (status, attempts, sent_at) == ("queued", 1, None) and "429" in last_error
    assert next_retry_at >= AFTER_WINDOW + timedelta(seconds=900)
    assert run_c(engine, live_settings, AFTER_WINDOW + timedelta(seconds=899)) == NOTHING
    assert run_c(engine, live_settings, next_retry_at)["digests"] == counts(sent=1)
    assert len(provider_api.telegram_messages) == 1


@pytest.mark.parametrize("channel, variable", [("email", "ALERTS_SMTP_HOST"),
                                               ("telegram", "ALERTS_TELEGRAM_BOT_TOKEN")])
def test_a_digest_for_an_unconfigured_channel_is_skipped_naming_the_setting(engine, settings, channel, variable):
    digest = seed_digest(engine, channel)

    assert run_c(engine, settings, AFTER_WINDOW) == {"instant": counts(), "digests": counts(skipped=1)}

    status, attempts, last_error, _, sent_at = digests(engine, digest)
    assert (status, attempts, sent_at) == ("skipped", 0, None)
    assert variable in last_error


def test_a_digest_for_a_recipient_without_an_address_is_skipped(engine, live_settings, provider_api):
    digest = seed_digest(engine, "telegram", user={"telegram_chat_id": None})

    assert run_c(engine, live_settings, AFTER_WINDOW)["digests"] == counts(skipped=1)

    status, attempts, last_error, _, sent_at = digests(engine, digest)
    assert (status, attempts, sent_at) == ("skipped", 0, None)
    assert "telegram_chat_id" in last_error
    assert provider_api.telegram_messages == []


# --- hostile event text -------------------------------------------------------------------------

HOSTILE = {"title": HOSTILE_TITLE, "summary": HOSTILE_SUMMARY}


def assert_safe_html(html: str) -> None:
    """Escaped in the markup, and shown to the reader exactly as the producer wrote it."""
    assert "<script>" not in html and "<b>bad</b>" not in html
    page = _HtmlReader(html)
    assert "script" not in page.tags
    assert HOSTILE_TITLE in page.text and HOSTILE_SUMMARY in page.text


def test_hostile_text_is_escaped_in_instant_html_and_verbatim_in_plain_text(engine, live_settings, now,
                                                                           smtp_server, provider_api):
    for channel in ("email", "telegram", "sms"):
        seed_instant(engine, channel, **HOSTILE)

    assert run_c(engine, live_settings, now)["instant"] == counts(sent=3)

    (mail,) = smtp_server.messages
    assert_safe_html(html_part(mail))
    assert HOSTILE_TITLE in text_part(mail) and HOSTILE_SUMMARY in text_part(mail)
    (sent,) = provider_api.telegram_messages
    shown = parse_telegram_html(sent.text)
    assert HOSTILE_TITLE in shown and HOSTILE_SUMMARY in shown
    (sms,) = provider_api.sms_messages
    assert HOSTILE_TITLE in sms.body


def test_hostile_text_is_escaped_in_digests(engine, live_settings, now, smtp_server, provider_api):
    for channel in ("email", "telegram"):
        seed_digest_deliveries(engine, channel, [HOSTILE, {"title": "Calm event"}])
    run(engine, live_settings, now, ("d",))

    assert run_c(engine, live_settings, AFTER_WINDOW)["digests"] == counts(sent=2)

    (mail,) = smtp_server.messages
    assert_safe_html(html_part(mail))
    assert HOSTILE_TITLE in text_part(mail) and HOSTILE_SUMMARY in text_part(mail)
    (sent,) = provider_api.telegram_messages
    shown = parse_telegram_html(sent.text)
    assert HOSTILE_TITLE in shown and HOSTILE_SUMMARY in shown
