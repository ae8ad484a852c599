"""``alerts check``: exit 0 and ``ok`` when nothing is stuck, else exit 1 and one line per
kind of problem (docs/operations.md)."""
from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta

import sqlalchemy as sa
from click.testing import CliRunner

from alerts.channels.registry import build_channels
from alerts.cli import cli
from alerts.core import tables as m
from alerts.phases.pipeline import run_phases
from tests.support.clock import clock_at
from tests.support.fakes.fixtures import with_fakes
from tests.support.fakes.smtp_server import FakeSmtpServer
from tests.support.factories import WINDOW_END, add_delivery, add_digest, add_event, add_user

NOW = WINDOW_END + timedelta(hours=1)
LONG_AGO = NOW - timedelta(seconds=1000)  # due for longer than the default 900 s
LATELY = NOW - timedelta(seconds=100)


def check(db_url, *args, env=None):
    return CliRunner().invoke(cli, ["check", "--now", NOW.isoformat(), *args],
                              env={"DATABASE_URL": db_url, **(env or {})}, catch_exceptions=False)


def test_an_empty_database_is_ok(db_url):
    result = check(db_url)
    assert (result.exit_code, result.output) == (0, "ok\n")


def test_rows_due_lately_held_or_sent_are_ok(db, db_url):
    with db.transaction() as conn:
        user = add_user(conn)
        add_delivery(conn, user, add_event(conn), created_at=LATELY)
        add_delivery(conn, user, add_event(conn), created_at=LONG_AGO, status="sent")
        # Held by quiet hours (or waiting for a retry): not due before its next_retry_at.
        add_delivery(conn, user, add_event(conn), created_at=LONG_AGO, next_retry_at=NOW + timedelta(hours=6))
        # A digest delivery waits for its digest, not for a send.
        add_delivery(conn, user, add_event(conn), created_at=LONG_AGO, delivery_kind="digest")
        add_digest(conn, user, next_retry_at=LATELY)
        add_delivery(conn, user, add_event(conn), status="sending", claimed_at=NOW - timedelta(seconds=599))
    result = check(db_url)
    assert (result.exit_code, result.output) == (0, "ok\n")


def test_an_instant_delivery_due_longer_than_max_age_is_a_problem(db, db_url):
    with db.transaction() as conn:
        user = add_user(conn)
        add_delivery(conn, user, add_event(conn), created_at=LONG_AGO)
        add_delivery(conn, user, add_event(conn), created_at=NOW - timedelta(hours=2), next_retry_at=LONG_AGO)
    result = check(db_url)
    assert result.exit_code == 1
    assert result.output == "instant deliveries: 2 queued and due for more than 900s (oldest due 1000s ago)\n"
    assert check(db_url, "--max-age", "1001").output == "ok\n"


def test_a_digest_due_longer_than_max_age_is_a_problem(db, db_url):
    with db.transaction() as conn:
        add_digest(conn, add_user(conn), next_retry_at=NOW - timedelta(seconds=3600))
    result = check(db_url, "--max-age", "60")
    assert result.exit_code == 1
    assert result.output == "digests: 1 queued and due for more than 60s (oldest due 3600s ago)\n"


def test_a_row_in_sending_past_the_lease_is_a_stuck_send(db, db_url):
    with db.transaction() as conn:
        user = add_user(conn)
        add_delivery(conn, user, add_event(conn), status="sending", claimed_at=NOW - timedelta(seconds=700))
        add_digest(conn, user, status="sending", claimed_at=NOW - timedelta(seconds=601))
    result = check(db_url, env={"ALERTS_SENDING_LEASE_SECONDS": "600"})
    assert result.exit_code == 1
    assert result.output == "stuck sends: 2 row(s) in sending past the 600s lease (oldest claimed 700s ago)\n"


def test_each_kind_of_problem_is_one_line_and_json_lists_them(db, db_url):
    with db.transaction() as conn:
        user = add_user(conn)
        for _ in range(3):
            add_delivery(conn, user, add_event(conn), created_at=LONG_AGO)
        add_digest(conn, user, next_retry_at=LONG_AGO)
        add_delivery(conn, user, add_event(conn), status="sending", claimed_at=LONG_AGO)
    text = check(db_url)
    assert text.exit_code == 1
    assert [line.split(":")[0] for line in text.output.splitlines()] == [
        "instant deliveries", "digests", "stuck sends"]

    result = check(db_url, "--json")
    assert result.exit_code == 1
    assert json.loads(result.output) == {
        "ok": False, "max_age_seconds": 900, "lease_seconds": 600,
        "problems": [{"kind": "instant", "count": 3, "oldest_seconds": 1000},
                     {"kind": "digests", "count": 1, "oldest_seconds": 1000},
                     {"kind": "stuck_sends", "count": 1, "oldest_seconds": 1000}]}


def test_json_when_healthy(db_url):
    result = check(db_url, "--json")
    assert result.exit_code == 0
    assert json.loads(result.output) == {"ok": True, "max_age_seconds": 900, "lease_seconds": 600, "problems": []}


def test_a_bad_max_age_exits_2_naming_it(db_url):
    for bad in ("0", "-5", "ten", "1.5", str(10 ** 12)):
        result = check(db_url, "--max-age", bad)
        assert result.exit_code == 2, bad
        assert "--max-age" in result.output


def test_a_bad_now_exits_2_naming_it(db_url):
    result = CliRunner().invoke(cli, ["check", "--now", "yesterday"], env={"DATABASE_URL": db_url})
    assert result.exit_code == 2
    assert "--now" in result.output


# --- silence is not health: rows created within --max-age that went wrong quietly ----------------

def test_rows_skipped_because_their_channel_is_not_configured_are_a_problem(db, db_url):
    with db.transaction() as conn:
        user = add_user(conn)
        for _ in range(2):
            add_delivery(conn, user, add_event(conn), status="skipped", created_at=LATELY,
                         last_error="email not configured: ALERTS_SMTP_HOST is not set")
        add_digest(conn, user, channel="telegram", status="skipped", created_at=LATELY,
                   last_error="telegram not configured: ALERTS_TELEGRAM_BOT_TOKEN is not set")
        # Long ago, or skipped for another reason: not this problem.
        add_delivery(conn, user, add_event(conn), status="skipped", created_at=LONG_AGO,
                     last_error="email not configured: ALERTS_SMTP_HOST is not set")
        add_delivery(conn, user, add_event(conn), status="skipped", created_at=LATELY, last_error="unsubscribed")
    result = check(db_url)
    assert result.exit_code == 1
    assert result.output == ("unconfigured channels: 3 row(s) created in the last 900s skipped because their "
                             "channel is not configured (email 2, telegram 1)\n")


def test_rows_failed_by_an_internal_error_are_a_problem(db, db_url):
    with db.transaction() as conn:
        user = add_user(conn)
        add_delivery(conn, user, add_event(conn), status="failed", created_at=LATELY, attempts=1,
                     last_error="internal error: KeyError")
        add_digest(conn, user, status="failed", created_at=LATELY, last_error="internal error: UndefinedError")
        add_delivery(conn, user, add_event(conn), status="failed", created_at=LATELY,
                     last_error="smtp 554 5.7.1 message content rejected")
    result = check(db_url, "--json")
    assert result.exit_code == 1
    assert json.loads(result.output)["problems"] == [
        {"kind": "internal_errors", "count": 2, "oldest_seconds": 100, "channels": {"email": 2}}]


def test_rows_whose_last_attempt_met_a_credentials_refusal_are_a_problem_queued_or_failed(db, db_url):
    with db.transaction() as conn:
        user = add_user(conn)
        add_delivery(conn, user, add_event(conn), status="queued", attempts=1, created_at=LATELY,
                     next_retry_at=NOW + timedelta(minutes=2),
                     last_error="credentials refused: smtp 535 5.7.8 Authentication credentials invalid")
        add_delivery(conn, user, add_event(conn), channel="sms", status="failed", attempts=5, created_at=LATELY,
                     last_error="credentials refused: twilio 401 20003: Authenticate (gave up after 5 attempts)")
        add_digest(conn, user, channel="telegram", status="queued", attempts=2, created_at=LATELY,
                   next_retry_at=NOW + timedelta(minutes=2), last_error="credentials refused: telegram 401: Unauthorized")
        # Its last attempt went through: the refusal is history.
        add_delivery(conn, user, add_event(conn), status="sent", created_at=LATELY,
                     last_error="credentials refused: smtp 535 5.7.8 Authentication credentials invalid")
    result = check(db_url)
    assert result.exit_code == 1
    assert result.output == ("credentials refused: 3 row(s) created in the last 900s refused our credentials "
                             "(a wrong password, token or key?) (email 1, sms 1, telegram 1)\n")


def test_every_kind_is_one_line_in_a_fixed_order(db, db_url):
    with db.transaction() as conn:
        user = add_user(conn)
        add_delivery(conn, user, add_event(conn), created_at=LONG_AGO)
        add_delivery(conn, user, add_event(conn), status="failed", created_at=LATELY, last_error="internal error: X")
        add_delivery(conn, user, add_event(conn), channel="sms", status="skipped", created_at=LATELY,
                     last_error="sms not configured: ALERTS_TWILIO_FROM is not set")
        add_delivery(conn, user, add_event(conn), channel="telegram", status="queued", created_at=LATELY,
                     next_retry_at=NOW, last_error="credentials refused: telegram 401: Unauthorized")
    result = check(db_url)
    assert result.exit_code == 1
    assert [line.split(":")[0] for line in result.output.splitlines()] == [
        "instant deliveries", "unconfigured channels", "internal errors", "credentials refused"]
    assert check(db_url, "--max-age", "60").output.splitlines()[0].startswith("instant deliveries")
    assert check(db_url, "--max-age", "60").exit_code == 1


def test_a_silent_problem_older_than_max_age_is_no_longer_reported(db, db_url):
    with db.transaction() as conn:
        add_delivery(conn, add_user(conn), add_event(conn), status="failed", created_at=LATELY,
                     last_error="internal error: KeyError")
    assert check(db_url).exit_code == 1
    result = check(db_url, "--max-age", "99")
    assert (result.exit_code, result.output) == (0, "ok\n")


def test_a_critical_alert_skipped_for_want_of_smtp_makes_check_fail(db, db_url, settings):
    """End to end: the reason the channel registry writes is the one check looks for."""
    with db.transaction() as conn:
        add_delivery(conn, add_user(conn), add_event(conn, severity=5, status="fanned_out"), created_at=LATELY)
    channels = build_channels(settings)  # no ALERTS_SMTP_HOST
    try:
        result = run_phases(db, ("c",), clock_at(NOW), settings, channels)
    finally:
        channels.close()
    assert result["c"]["instant"]["skipped"] == 1

    output = check(db_url).output
    assert output.startswith("unconfigured channels: 1 row(s)") and output.endswith("(email 1)\n")


def test_a_wrong_smtp_password_leaves_the_queue_waiting_unblocked_and_check_names_it(db, db_url, settings):
    """Before, 535 counted as permanent: every queued email failed at once."""
    with FakeSmtpServer(users={"alerts": "right-password"}) as server:
        smtp = replace(with_fakes(settings, server), smtp_user="alerts", smtp_password="wrong-password")
        with db.transaction() as conn:
            user = add_user(conn)
            for _ in range(3):
                add_delivery(conn, user, add_event(conn, status="fanned_out"), created_at=LATELY)
        channels = build_channels(smtp)
        try:
            result = run_phases(db, ("c",), clock_at(NOW), smtp, channels)
        finally:
            channels.close()

    assert result["c"]["instant"] == {"sent": 0, "retried": 3, "failed": 0, "skipped": 0}
    with db.transaction() as conn:
        rows = conn.execute(sa.select(m.user_alert_deliveries.c.status, m.user_alert_deliveries.c.last_error)).all()
        blocks = conn.execute(sa.select(sa.func.count()).select_from(m.user_channel_blocks)).scalar_one()
    assert {status for status, _ in rows} == {"queued"} and blocks == 0
    assert all(error.startswith("credentials refused: smtp 535") for _, error in rows)
    assert "wrong-password" not in " ".join(error for _, error in rows)
    output = check(db_url).output
    assert output.startswith("credentials refused: 3 row(s) created in the last 900s") and "(email 3)" in output
