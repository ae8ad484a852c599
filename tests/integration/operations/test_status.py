"""``alerts status`` counts skipped and failed rows by reason, so a channel without
configuration, a wrong password or a bug shows up as what it is."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import sqlalchemy as sa
from click.testing import CliRunner

from alerts.cli import cli
from alerts.core.db import make_engine
from alerts.operations import status
from tests.support.factories import add_delivery, add_digest, add_event, add_user

NOW = "2026-05-12T12:00:00+00:00"
UNCONFIGURED = "email not configured: ALERTS_SMTP_HOST is not set"


def run_status(db_url, *args):
    result = CliRunner().invoke(cli, ["status", "--now", NOW, *args], env={"DATABASE_URL": db_url},
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_skipped_and_failed_rows_are_counted_by_reason(db, db_url):
    with db.transaction() as conn:
        user = add_user(conn)
        for _ in range(3):
            add_delivery(conn, user, add_event(conn), status="skipped", last_error=UNCONFIGURED)
        add_delivery(conn, user, add_event(conn), status="skipped", last_error="unsubscribed")
        add_delivery(conn, user, add_event(conn), status="skipped", last_error="superseded by #7")
        add_delivery(conn, user, add_event(conn), status="skipped", last_error="superseded by #9")
        add_delivery(conn, user, add_event(conn), status="failed", last_error="internal error: KeyError")
        add_delivery(conn, user, add_event(conn), status="failed", attempts=5,
                     last_error="credentials refused: smtp 535 5.7.8 bad (gave up after 5 attempts)")
        add_digest(conn, user, status="skipped", last_error="telegram not configured: ALERTS_TELEGRAM_BOT_TOKEN is not set")

    report = json.loads(run_status(db_url, "--json"))

    assert report["by_reason"] == {
        "user_alert_deliveries": {
            # add_digest's items are batched into it: that is a reason too.
            "skipped": {UNCONFIGURED: 3, "batched_into_digest": 2, "superseded by #…": 2, "unsubscribed": 1},
            "failed": {"credentials refused: smtp 535 5.7.8 bad (gave up after 5 attempts)": 1,
                       "internal error: KeyError": 1}},
        "user_alert_digests": {"skipped": {"telegram not configured: ALERTS_TELEGRAM_BOT_TOKEN is not set": 1}},
    }
    text = run_status(db_url)
    assert f"user_alert_deliveries skipped by reason:\n        3  {UNCONFIGURED}\n" in text
    assert "user_alert_deliveries failed by reason:\n" in text and "        1  internal error: KeyError" in text


def test_past_the_first_ten_reasons_the_rest_are_summed(db, db_url):
    with db.transaction() as conn:
        user = add_user(conn)
        for n in range(14):
            add_delivery(conn, user, add_event(conn), status="failed", last_error=f"smtp 554 rejected id={n}")

    failed = json.loads(run_status(db_url, "--json"))["by_reason"]["user_alert_deliveries"]["failed"]

    assert len(failed) == 11 and failed[status.OTHER_REASONS] == 4


def test_an_event_whose_time_the_driver_cannot_read_does_not_break_status(pg_url):
    """A producer's plain INSERT of -infinity, not yet judged by intake."""
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        bad = add_event(conn)
        add_event(conn, created_at=datetime(2026, 5, 12, 10, tzinfo=timezone.utc))
        conn.execute(sa.text("UPDATE alert_events SET created_at = '-infinity' WHERE id = :id"), {"id": bad})
    engine.dispose()

    report = json.loads(run_status(pg_url, "--json"))

    assert report["tables"]["alert_events"] == {"new": 2}
    assert report["oldest_pending"]["alert_events"] == 7200
