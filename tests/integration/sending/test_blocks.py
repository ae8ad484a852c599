"""Destination health (docs/policy.md): blocks recorded from the providers' real error
answers, the rows they stop, chat migration, 401, and the operator commands — through the
runner's Phase C (PostgreSQL and SQLite) and several sender processes racing on
PostgreSQL (the Celery send tasks: test_destination_health_tasks.py and _worker.py).

The fakes answer as the providers do: the Bot API's ``{"ok": false, "error_code",
"description", "parameters"}`` and aiosmtpd replies to RCPT TO and DATA.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from alerts.core import tables as m
from alerts.cli import cli
from alerts.core.db import make_engine
from alerts.phases.pipeline import run_phases, session
from tests.support.clock import clock_at
from tests.support.e2e_runner import ROOT, finish, runner_env
from tests.support.factories import WINDOW_END, add_delivery, add_digest, add_event, add_user
from tests.support.fakes.provider_api import (BAD_ENTITIES, BLOCKED, CHAT_NOT_FOUND, DEACTIVATED, KICKED, UNAUTHORIZED,
                                      UPGRADED)
from tests.support.fakes.smtp_server import (MAILBOX_NAME_NOT_ALLOWED, MAILBOX_UNAVAILABLE, MESSAGE_REJECTED,
                                     USER_NOT_LOCAL)

CHAT = "424242"
OTHER_CHAT = "515151"
GONE_EMAIL = "gone@example.com"
NEW_CHAT = "-1001234567890"

GONE = [
    ("telegram", lambda smtp, api: api.telegram_error(*BLOCKED, chat_id=CHAT),
     "telegram 403: Forbidden: bot was blocked by the user"),
    ("telegram", lambda smtp, api: api.telegram_error(*DEACTIVATED, chat_id=CHAT),
     "telegram 403: Forbidden: user is deactivated"),
    ("telegram", lambda smtp, api: api.telegram_error(*KICKED, chat_id=CHAT),
     "telegram 403: Forbidden: bot was kicked from the group chat"),
    ("telegram", lambda smtp, api: api.telegram_error(*CHAT_NOT_FOUND, chat_id=CHAT),
     "telegram 400: Bad Request: chat not found"),
    ("email", lambda smtp, api: smtp.reject_recipient(GONE_EMAIL, MAILBOX_UNAVAILABLE),
     "smtp 550 5.1.1 mailbox unavailable"),
    ("email", lambda smtp, api: smtp.reject_recipient(GONE_EMAIL, USER_NOT_LOCAL),
     "smtp 551 5.1.6 user not local; please try <gone@example.net>"),
    ("email", lambda smtp, api: smtp.reject_recipient(GONE_EMAIL, MAILBOX_NAME_NOT_ALLOWED),
     "smtp 553 5.1.3 mailbox name not allowed"),
]
GONE_IDS = ["tg-blocked", "tg-deactivated", "tg-kicked", "tg-chat-not-found", "smtp-550-rcpt", "smtp-551-rcpt",
            "smtp-553-rcpt"]
ADDRESS = {"telegram": CHAT, "email": GONE_EMAIL}


# --- helpers ------------------------------------------------------------------------------

def run_c(engine, settings, now, dry_run=False) -> dict:
    with session(engine, settings, dry_run=dry_run) as (db, channels):
        return run_phases(db, ("c",), clock_at(now), settings, channels)["c"]


def counts(sent=0, retried=0, failed=0, skipped=0) -> dict:
    return {"sent": sent, "retried": retried, "failed": failed, "skipped": skipped}


def seed_user(conn, **cols) -> int:
    return add_user(conn, **{"email": GONE_EMAIL, "telegram_chat_id": CHAT, **cols})


def instant(conn, user: int, channel: str, **cols) -> int:
    return add_delivery(conn, user, add_event(conn, status="fanned_out"), channel=channel, **cols)


def status_of(engine, table, row_id) -> tuple:
    with engine.connect() as c:
        r = c.execute(sa.select(table.c.status, table.c.last_error).where(table.c.id == row_id)).one()
    return tuple(r)


def blocks_in(engine) -> list[dict]:
    with engine.connect() as c:
        return [dict(r._mapping) for r in c.execute(sa.select(m.user_channel_blocks)
                                                     .order_by(m.user_channel_blocks.c.user_id))]


def attempts_to(smtp, api, channel: str, address: str) -> int:
    """Requests the provider received for ``address`` (refused ones included)."""
    log = api.telegram_requests if channel == "telegram" else smtp.rcpt_log
    return sum(1 for key, _ in log if key == address)


def invoke(db_url, *args):
    return CliRunner().invoke(cli, list(args), env={"DATABASE_URL": db_url}, catch_exceptions=False)


# --- blocks recorded by Phase C ----------------------------------------------------------------

@pytest.mark.parametrize("channel, script, reason", GONE, ids=GONE_IDS)
def test_a_gone_destination_is_blocked_and_the_users_other_queued_rows_on_it_are_skipped(
        engine, live_settings, now, smtp_server, provider_api, channel, script, reason):
    other = "telegram" if channel == "email" else "email"
    with engine.begin() as conn:
        user, bystander = seed_user(conn), add_user(conn, telegram_chat_id=OTHER_CHAT)
        first, second = instant(conn, user, channel), instant(conn, user, channel)
        retried = instant(conn, user, channel, attempts=2, next_retry_at=now + timedelta(minutes=30),
                          last_error="smtp 451 4.3.0 try later")
        later_digest = add_digest(conn, user, channel=channel)  # not due before WINDOW_END
        other_channel = instant(conn, user, other, next_retry_at=now + timedelta(hours=1))
        bystanders = instant(conn, bystander, channel)
    script(smtp_server, provider_api)

    assert run_c(engine, live_settings, now)["instant"] == counts(sent=1, failed=1, skipped=1)

    disabled = ("skipped", m.destination_disabled(reason))
    assert status_of(engine, m.user_alert_deliveries, first) == ("failed", reason)
    assert status_of(engine, m.user_alert_deliveries, second) == disabled
    assert status_of(engine, m.user_alert_deliveries, retried) == disabled
    assert status_of(engine, m.user_alert_digests, later_digest) == disabled
    assert status_of(engine, m.user_alert_deliveries, other_channel) == ("queued", None)
    assert status_of(engine, m.user_alert_deliveries, bystanders) == ("sent", None)
    assert attempts_to(smtp_server, provider_api, channel, ADDRESS[channel]) == 1, "the second row was not tried"
    (block,) = blocks_in(engine)
    assert block == {"user_id": user, "channel": channel, "address": ADDRESS[channel], "reason": reason,
                     "created_at": now}


@pytest.mark.parametrize("channel, script, reason", [
    ("telegram", lambda smtp, api: api.telegram_error(*BAD_ENTITIES, chat_id=CHAT, times=1),
     f"telegram 400: {BAD_ENTITIES[1]}"),
    ("email", lambda smtp, api: smtp.fail_data(MESSAGE_REJECTED, times=1), "smtp 554 5.7.1 message content rejected"),
    ("email", lambda smtp, api: smtp.fail_data(MAILBOX_UNAVAILABLE, times=1), "smtp 550 5.1.1 mailbox unavailable"),
], ids=["tg-bad-entities", "smtp-554-data", "smtp-550-data"])
def test_a_refused_message_fails_alone_and_blocks_nothing(engine, live_settings, now, smtp_server, provider_api,
                                                          channel, script, reason):
    with engine.begin() as conn:
        user = seed_user(conn)
        refused, next_one = instant(conn, user, channel), instant(conn, user, channel)
    script(smtp_server, provider_api)

    assert run_c(engine, live_settings, now)["instant"] == counts(sent=1, failed=1)

    assert status_of(engine, m.user_alert_deliveries, refused) == ("failed", reason)
    assert status_of(engine, m.user_alert_deliveries, next_one) == ("sent", None)
    assert blocks_in(engine) == []


def test_a_telegram_401_is_retried_later_and_blocks_nothing(engine, live_settings, now, provider_api):
    with engine.begin() as conn:
        delivery = instant(conn, seed_user(conn), "telegram")
    provider_api.telegram_error(*UNAUTHORIZED)

    assert run_c(engine, live_settings, now)["instant"] == counts(retried=1)

    with engine.connect() as conn:
        row = conn.execute(sa.select(m.user_alert_deliveries).where(m.user_alert_deliveries.c.id == delivery)).one()
    assert (row.status, row.attempts, row.last_error) == ("queued", 1, "credentials refused: telegram 401: Unauthorized")
    assert row.next_retry_at >= now + timedelta(seconds=live_settings.retry_base_seconds / 2)
    assert blocks_in(engine) == []


# --- what a block does afterwards ------------------------------------------------------------

def block_chat(engine, settings, now, provider_api) -> int:
    """A user whose chat blocked the bot, as a first run of Phase C leaves them."""
    with engine.begin() as conn:
        user = seed_user(conn)
        instant(conn, user, "telegram")
    provider_api.telegram_error(*BLOCKED, chat_id=CHAT)
    assert run_c(engine, settings, now)["instant"] == counts(failed=1)
    return user


def test_rows_made_after_the_block_are_skipped_without_calling_the_provider(engine, live_settings, now,
                                                                            provider_api):
    user = block_chat(engine, live_settings, now, provider_api)
    with engine.begin() as conn:
        late = instant(conn, user, "telegram")  # as Phase B makes it after the block
        digest = add_digest(conn, user, channel="telegram")
    before = attempts_to(None, provider_api, "telegram", CHAT)

    assert run_c(engine, live_settings, WINDOW_END + timedelta(minutes=1)) == {
        "instant": counts(skipped=1), "digests": counts(skipped=1)}

    reason = m.destination_disabled("telegram 403: Forbidden: bot was blocked by the user")
    assert status_of(engine, m.user_alert_deliveries, late) == ("skipped", reason)
    assert status_of(engine, m.user_alert_digests, digest) == ("skipped", reason)
    assert attempts_to(None, provider_api, "telegram", CHAT) == before


def test_an_open_digest_skipped_by_a_block_gets_a_follow_up_that_is_skipped_too(engine, live_settings, now,
                                                                                 provider_api):
    with engine.begin() as conn:
        user = seed_user(conn)
        open_digest = add_digest(conn, user, channel="telegram", events=1)
        instant(conn, user, "telegram")
    provider_api.telegram_error(*BLOCKED, chat_id=CHAT)
    assert run_c(engine, live_settings, now)["instant"] == counts(failed=1)
    with engine.begin() as conn:  # a digest delivery for the same window, after the block
        late = add_delivery(conn, user, add_event(conn, status="fanned_out"), channel="telegram",
                            delivery_kind="digest")

    with session(engine, live_settings) as (db, channels):
        result = run_phases(db, ("d", "c"), clock_at(WINDOW_END + timedelta(minutes=1)), live_settings, channels)

    assert result["d"]["digests_created"] == 1 and result["c"]["digests"] == counts(skipped=1)
    reason = m.destination_disabled("telegram 403: Forbidden: bot was blocked by the user")
    with engine.connect() as conn:
        digests = conn.execute(sa.select(m.user_alert_digests.c.id, m.user_alert_digests.c.sequence,
                                         m.user_alert_digests.c.status, m.user_alert_digests.c.last_error)
                               .order_by(m.user_alert_digests.c.id)).all()
        item_of_late = conn.execute(sa.select(m.user_alert_digest_items.c.digest_id)
                                    .where(m.user_alert_digest_items.c.delivery_id == late)).scalar_one()
    assert [tuple(g)[1:] for g in digests] == [(0, "skipped", reason), (1, "skipped", reason)]
    assert digests[0].id == open_digest and item_of_late == digests[1].id, "the late item is in the follow-up"
    assert attempts_to(None, provider_api, "telegram", CHAT) == 1


def test_a_new_address_is_tried_again_and_the_block_stays_as_history(db_url, engine, live_settings, now,
                                                                     provider_api):
    user = block_chat(engine, live_settings, now, provider_api)
    with engine.begin() as conn:
        conn.execute(sa.update(m.users).where(m.users.c.id == user).values(telegram_chat_id=OTHER_CHAT))
        fresh = instant(conn, user, "telegram")

    assert run_c(engine, live_settings, now)["instant"] == counts(sent=1)

    assert status_of(engine, m.user_alert_deliveries, fresh) == ("sent", None)
    assert [msg.chat_id for msg in provider_api.telegram_messages] == [OTHER_CHAT]
    (block,) = blocks_in(engine)
    assert block["address"] == CHAT
    listed = json.loads(invoke(db_url, "destinations", "--json").output)
    assert [(b["user_id"], b["in_force"]) for b in listed] == [(user, False)]


def test_a_dry_run_reports_blocked_rows_skipped_and_changes_nothing(engine, live_settings, now, provider_api):
    user = block_chat(engine, live_settings, now, provider_api)
    with engine.begin() as conn:
        late = instant(conn, user, "telegram")
    before = blocks_in(engine)

    assert run_c(engine, live_settings, now, dry_run=True)["instant"] == counts(skipped=1)

    assert status_of(engine, m.user_alert_deliveries, late) == ("queued", None)
    assert blocks_in(engine) == before


# --- chat migration -------------------------------------------------------------------------------

def test_a_group_that_became_a_supergroup_gets_its_new_chat_id_and_the_message_at_once(engine, live_settings, now,
                                                                                       provider_api):
    with engine.begin() as conn:
        user = seed_user(conn, telegram_chat_id="-4242")
        first, second = instant(conn, user, "telegram"), instant(conn, user, "telegram")
    provider_api.telegram_error(*UPGRADED, chat_id="-4242", parameters={"migrate_to_chat_id": int(NEW_CHAT)})

    assert run_c(engine, live_settings, now)["instant"] == counts(sent=2)

    assert [msg.chat_id for msg in provider_api.telegram_messages] == [NEW_CHAT, NEW_CHAT]
    assert attempts_to(None, provider_api, "telegram", "-4242") == 1, "the batch's second row went to the new chat"
    with engine.connect() as conn:
        assert conn.execute(sa.select(m.users.c.telegram_chat_id).where(m.users.c.id == user)).scalar_one() == NEW_CHAT
        rows = conn.execute(sa.select(m.user_alert_deliveries.c.id, m.user_alert_deliveries.c.attempts)
                            .order_by(m.user_alert_deliveries.c.id)).all()
    assert [tuple(r) for r in rows] == [(first, 1), (second, 1)], "moving is not a failed attempt"
    assert blocks_in(engine) == []


def test_a_digest_for_a_group_that_moved_is_sent_to_its_new_chat(engine, live_settings, provider_api):
    with engine.begin() as conn:
        digest = add_digest(conn, seed_user(conn, telegram_chat_id="-4242"), channel="telegram")
    provider_api.telegram_error(*UPGRADED, chat_id="-4242", parameters={"migrate_to_chat_id": int(NEW_CHAT)})

    assert run_c(engine, live_settings, WINDOW_END)["digests"] == counts(sent=1)

    assert [msg.chat_id for msg in provider_api.telegram_messages] == [NEW_CHAT]
    assert status_of(engine, m.user_alert_digests, digest) == ("sent", None)


def test_a_chat_that_moves_twice_in_one_attempt_fails_that_row(engine, live_settings, now, provider_api):
    with engine.begin() as conn:
        delivery = instant(conn, seed_user(conn, telegram_chat_id="-4242"), "telegram")
    provider_api.telegram_error(*UPGRADED, parameters={"migrate_to_chat_id": int(NEW_CHAT)})  # every chat

    assert run_c(engine, live_settings, now)["instant"] == counts(failed=1)

    status, last_error = status_of(engine, m.user_alert_deliveries, delivery)
    assert status == "failed" and f"group moved to chat {NEW_CHAT}" in last_error
    assert attempts_to(None, provider_api, "telegram", "-4242") == 1
    assert attempts_to(None, provider_api, "telegram", NEW_CHAT) == 1


# --- several senders racing (PostgreSQL) --------------------------------------------------------------

SENDERS = 3
NOW = "2026-05-12T12:00:00+00:00"


def test_senders_racing_on_a_blocked_chat_try_it_at_most_once_each_and_lose_nothing(pg_url, provider_api,
                                                                                    tmp_path):
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        blocked = seed_user(conn)
        healthy = [add_user(conn, telegram_chat_id=str(1000 + n)) for n in range(10)]
        for _ in range(30):
            instant(conn, blocked, "telegram")
        for user in healthy:
            for _ in range(3):
                instant(conn, user, "telegram")
    provider_api.telegram_error(*BLOCKED, chat_id=CHAT)
    env = runner_env(pg_url, api=provider_api, ALERTS_SEND_BATCH_SIZE="1")
    go = tmp_path / "go"
    senders = [subprocess.Popen([sys.executable, "-m", "tests.support.e2e_race", "send", "--now", NOW, "--go", str(go)],
                                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(SENDERS)]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("go.ready.*"))) < SENDERS and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    results = [finish(p) for p in senders]

    with engine.connect() as conn:
        rows = conn.execute(sa.select(m.user_alert_deliveries.c.user_id, m.user_alert_deliveries.c.status,
                                      m.user_alert_deliveries.c.last_error)).all()
    engine.dispose()
    outcomes = Counter((r.user_id == blocked, r.status, r.last_error) for r in rows)
    tried = attempts_to(None, provider_api, "telegram", CHAT)
    reason = "telegram 403: Forbidden: bot was blocked by the user"
    assert 1 <= tried <= SENDERS, "each sender can have at most one claim loaded before the block"
    assert outcomes == {(True, "failed", reason): tried, (True, "skipped", m.destination_disabled(reason)): 30 - tried,
                        (False, "sent", None): 30}
    assert Counter(msg.chat_id for msg in provider_api.telegram_messages) == {str(1000 + n): 3 for n in range(10)}
    assert sum(r["sent"] for r in results) == 30


# --- operator commands ------------------------------------------------------------------------------

def test_destinations_lists_blocks_and_enable_lifts_one(db_url, engine, live_settings, now, provider_api):
    user = block_chat(engine, live_settings, now, provider_api)

    listed = invoke(db_url, "destinations")
    assert listed.exit_code == 0
    assert f"user {user} telegram {CHAT} since 2026-05-12 12:00 UTC (in force): telegram 403: " \
           "Forbidden: bot was blocked by the user" in listed.output
    (as_json,) = json.loads(invoke(db_url, "destinations", "--json").output)
    assert as_json == {"user_id": user, "channel": "telegram", "address": CHAT, "in_force": True,
                       "reason": "telegram 403: Forbidden: bot was blocked by the user",
                       "since": str(now)}

    lifted = invoke(db_url, "destinations", "--enable", str(user), "telegram")
    assert (lifted.exit_code, lifted.output.strip()) == (0, f"lifted the block of user {user} on telegram")
    assert blocks_in(engine) == []
    assert invoke(db_url, "destinations").output.strip() == "no blocked destinations"


@pytest.mark.parametrize("args, message", [
    (["--enable", "1", "telegram"], "--enable: user 1 has no block on telegram"),
    (["--enable", "1", "pigeon"], "CHANNEL must be one of email, telegram, sms, got 'pigeon'"),
    (["--enable", "alice", "email"], "USER must be a user id, got 'alice'"),
])
def test_destinations_enable_exits_2_naming_what_is_wrong(db_url, args, message):
    result = invoke(db_url, "destinations", *args)
    assert result.exit_code == 2 and message in result.output


def test_retry_lifts_the_blocks_of_the_destinations_it_requeues(db_url, engine, live_settings, now, provider_api):
    user = block_chat(engine, live_settings, now, provider_api)
    with engine.begin() as conn:
        other = add_user(conn, email="kept@example.com")
        instant(conn, other, "email", status="failed", last_error="smtp 550 5.1.1 mailbox unavailable")
        conn.execute(sa.insert(m.user_channel_blocks).values(user_id=other, channel="email", address="kept@example.com",
                                                             reason="smtp 550 5.1.1 mailbox unavailable",
                                                             created_at=now))
        (failed,) = conn.execute(sa.select(m.user_alert_deliveries.c.id)
                                 .where(m.user_alert_deliveries.c.user_id == user)).scalars()
    provider_api.reset()

    result = invoke(db_url, "retry", "--id", str(failed), "--now", now.isoformat())
    assert result.exit_code == 0
    assert "user_alert_deliveries: re-queued 1, lifted 1 block(s)" in result.output
    assert [(b["user_id"], b["channel"]) for b in blocks_in(engine)] == [(other, "email")]

    assert run_c(engine, live_settings, now + timedelta(minutes=1))["instant"] == counts(sent=1)
    assert [msg.chat_id for msg in provider_api.telegram_messages] == [CHAT]


def test_status_counts_blocks_in_force_by_channel_and_reason(db_url, engine, live_settings, now, provider_api):
    block_chat(engine, live_settings, now, provider_api)
    with engine.begin() as conn:
        moved = add_user(conn, telegram_chat_id="777")
        conn.execute(sa.insert(m.user_channel_blocks).values(user_id=moved, channel="telegram", address="666",
                                                             reason="telegram 400: Bad Request: chat not found",
                                                             created_at=now))

    report = json.loads(invoke(db_url, "status", "--json").output)
    assert report["blocked_destinations"] == {"telegram": {"telegram 403: Forbidden: bot was blocked by the user": 1}}
    text = invoke(db_url, "status").output
    assert "blocked destinations (alerts destinations):\n  telegram: 1 telegram 403: Forbidden: bot was blocked" in text


# --- the soak's checker (tests/system/soak/soak_check.py) -----------------------------------------------------

def test_the_soak_checker_flags_requests_after_a_block_and_blocks_of_healthy_destinations(engine, now):
    from tests.system.soak import soak_check

    with engine.begin() as conn:
        user, healthy = seed_user(conn), add_user(conn, email="fine@example.com")
        instant(conn, user, "email", status="skipped", last_error=m.destination_disabled("smtp 550 5.1.1 gone"))
        instant(conn, healthy, "email", status="skipped", last_error=m.destination_disabled("smtp 550 5.1.1 gone"))
        # A block for an address the fake never refused, with another reason than its skip says.
        for who, address, reason in ((user, GONE_EMAIL, "smtp 550 5.1.1 gone"),
                                     (healthy, "fine@example.com", "smtp 451 later")):
            conn.execute(sa.insert(m.user_channel_blocks).values(user_id=who, channel="email", address=address,
                                                                 reason=reason, created_at=now))
    at = now.timestamp()
    in_flight, late = at + 0.2, at + soak_check.IN_FLIGHT_SECONDS + 1

    report = soak_check.Report()
    with engine.connect() as conn:
        soak_check.check_blocks(report, conn, {"email": {GONE_EMAIL}},
                                {"email": [(GONE_EMAIL, at - 5), (GONE_EMAIL.upper(), in_flight), (GONE_EMAIL, late)]})

    assert Counter(v.kind for v in report.violations) == {
        "block_for_healthy_destination": 1, "disabled_without_block": 1, "sent_after_block": 1}
    assert report.counts["requests_after_block"] == 2
