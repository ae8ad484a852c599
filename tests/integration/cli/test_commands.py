"""Operator commands: ``alerts retry``, ``alerts preview`` and ``alerts status``."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from alerts.core import tables as m
from alerts.cli import cli
from alerts.core.settings import Settings
from alerts.phases.digests import run_phase_d
from tests.support.factories import WINDOW_END, add_delivery, add_digest, add_event, add_user
from tests.support.clock import NO_CHANNELS, clock_at

UTC = timezone.utc
AFTER_WINDOW = WINDOW_END + timedelta(minutes=5)
SECRET = "s3cr3t-smtp-password"


def invoke(db_url, *args, env=None):
    result = CliRunner().invoke(cli, list(args), env={"DATABASE_URL": db_url, **(env or {})},
                                catch_exceptions=False)
    return result


def dump(engine) -> dict:
    with engine.connect() as conn:
        return {t.name: [dict(r._mapping) for r in conn.execute(sa.select(t).order_by(*t.primary_key.columns or t.c))]
                for t in m.metadata.sorted_tables}


# --- retry ----------------------------------------------------------------------------------

def test_retry_requeues_failed_deliveries_and_digests_due_at_once(db_url, db, engine):
    with db.transaction() as conn:
        user = add_user(conn)
        failed = add_delivery(conn, user, add_event(conn), status="failed", attempts=5,
                              last_error="smtp 550 mailbox unavailable")
        sent = add_delivery(conn, user, add_event(conn), status="sent", attempts=1)
        digest = add_digest(conn, user, status="failed", attempts=5, last_error="smtp 550 mailbox unavailable",
                            enqueued_at=WINDOW_END)

    result = invoke(db_url, "retry", "--now", AFTER_WINDOW.isoformat())
    assert result.exit_code == 0, result.output
    assert "user_alert_deliveries: re-queued 1" in result.output
    assert "user_alert_digests: re-queued 1" in result.output

    with engine.connect() as conn:
        d = conn.execute(sa.select(m.user_alert_deliveries).where(m.user_alert_deliveries.c.id == failed)).one()
        g = conn.execute(sa.select(m.user_alert_digests).where(m.user_alert_digests.c.id == digest)).one()
        untouched = conn.execute(sa.select(m.user_alert_deliveries.c.status)
                                 .where(m.user_alert_deliveries.c.id == sent)).scalar_one()
    assert (d.status, d.attempts) == ("queued", 0)
    assert (g.status, g.attempts, g.next_retry_at, g.enqueued_at) == ("queued", 0, AFTER_WINDOW, None)
    assert g.last_error == "smtp 550 mailbox unavailable", "the reason stays for the operator"
    assert untouched == "sent"


def test_a_retried_digest_is_not_reopened_for_new_items(db_url, db, engine):
    """Its message may already be half-way out: later events go to a follow-up digest."""
    with db.transaction() as conn:
        user = add_user(conn)
        digest = add_digest(conn, user, events=1, status="failed", attempts=5, last_error="smtp 550")
    assert invoke(db_url, "retry", "--now", AFTER_WINDOW.isoformat()).exit_code == 0
    with db.transaction() as conn:
        late = add_delivery(conn, user, add_event(conn, status="fanned_out",
                                                  created_at=datetime(2026, 5, 12, 20, tzinfo=UTC)),
                            delivery_kind="digest")
    settings = Settings.from_env({"DATABASE_URL": db_url})
    assert run_phase_d(db, clock_at(AFTER_WINDOW), settings, NO_CHANNELS)["digests_created"] == 1
    with engine.connect() as conn:
        items = conn.execute(sa.select(m.user_alert_digest_items.c.digest_id)
                             .where(m.user_alert_digest_items.c.delivery_id == late)).scalar_one()
    assert items != digest


def test_retry_by_id_touches_only_that_row(db_url, db, engine):
    with db.transaction() as conn:
        user = add_user(conn)
        one = add_delivery(conn, user, add_event(conn), status="failed", attempts=5, last_error="x")
        other = add_delivery(conn, user, add_event(conn), status="failed", attempts=5, last_error="x")
    result = invoke(db_url, "retry", "--no-digests", "--id", str(one))
    assert "re-queued 1" in result.output
    with engine.connect() as conn:
        statuses = dict(conn.execute(sa.select(m.user_alert_deliveries.c.id, m.user_alert_deliveries.c.status)).all())
    assert statuses == {one: "queued", other: "failed"}


# --- preview --------------------------------------------------------------------------------

def test_preview_of_a_built_digest_prints_email_and_changes_nothing(db_url, db, engine, tmp_path):
    with db.transaction() as conn:
        user = add_user(conn, timezone="Europe/Amsterdam", telegram_chat_id="42")
        digest = add_digest(conn, user, events=3)
    before = dump(engine)
    result = invoke(db_url, "preview", "--digest", str(digest), "--out", str(tmp_path / "pv"))
    assert result.exit_code == 0, result.output
    assert "3 item(s)" in result.output
    assert "Subject:" in result.output and "X-Alerts-Digest-Key" in result.output
    text = (tmp_path / "pv" / "digest.txt").read_text()
    html = (tmp_path / "pv" / "digest.html").read_text()
    assert text.count("#") >= 3 and "<html" in html.lower()
    telegram = invoke(db_url, "preview", "--digest", str(digest), "--channel", "telegram")
    assert "=== telegram (parse_mode=HTML) ===" in telegram.output
    assert dump(engine) == before


def test_preview_of_a_window_not_built_yet_lists_its_pending_events(db_url, db, engine):
    with db.transaction() as conn:
        user = add_user(conn, timezone="Europe/Amsterdam")
        for hour, title in ((7, "Morning outage"), (21, "Evening spike")):
            add_delivery(conn, user, add_event(conn, title=title, status="fanned_out",
                                               created_at=datetime(2026, 5, 12, hour, tzinfo=UTC)),
                         delivery_kind="digest")
        # 23:00 UTC on the 12th is already the 13th in Amsterdam: not in this window.
        add_delivery(conn, user, add_event(conn, title="Next day", status="fanned_out",
                                           created_at=datetime(2026, 5, 12, 23, tzinfo=UTC)),
                     delivery_kind="digest")
    before = dump(engine)
    result = invoke(db_url, "preview", "--user", str(user), "--date", "2026-05-12", "--channel", "email")
    assert result.exit_code == 0, result.output
    assert "2 item(s)" in result.output
    assert "Morning outage" in result.output and "Evening spike" in result.output
    assert "Next day" not in result.output
    assert dump(engine) == before


@pytest.mark.parametrize("args,needle", [
    ([], "--digest"),
    (["--digest", "999"], "no digest with id 999"),
    (["--user", "999", "--date", "2026-05-12"], "no user with id 999"),
])
def test_preview_usage_errors_exit_2(db_url, args, needle):
    result = CliRunner().invoke(cli, ["preview", *args], env={"DATABASE_URL": db_url})
    assert result.exit_code == 2
    assert needle in result.output


# --- status ---------------------------------------------------------------------------------

def test_status_reports_counts_oldest_pending_and_errors_without_secrets(db_url, db):
    with db.transaction() as conn:
        user = add_user(conn)
        add_delivery(conn, user, add_event(conn), status="failed", attempts=5, last_error="smtp 550 no such user",
                     created_at=datetime(2026, 5, 12, 9, tzinfo=UTC))
        add_delivery(conn, user, add_event(conn), status="queued", created_at=datetime(2026, 5, 12, 10, tzinfo=UTC))
        add_event(conn, status="rejected", reject_reason="severity: must be 1..5")
    env = {"ALERTS_SMTP_PASSWORD": SECRET, "ALERTS_SMTP_HOST": "127.0.0.1"}
    text = invoke(db_url, "status", "--now", "2026-05-12T12:00:00+00:00", env=env).output
    assert "user_alert_deliveries: failed 1, queued 1" in text
    assert "oldest pending: 2h 0m" in text
    assert "smtp 550 no such user" in text and "severity: must be 1..5" in text
    report = json.loads(invoke(db_url, "status", "--json", "--now", "2026-05-12T12:00:00+00:00", env=env).output)
    assert report["tables"]["user_alert_deliveries"] == {"failed": 1, "queued": 1}
    assert report["oldest_pending"]["user_alert_deliveries"] == 7200
    assert SECRET not in text and SECRET not in json.dumps(report)
