"""`--dry-run` as an operator runs it (docs/architecture.md): every phase reports what it would do,
as if the earlier phases had run, and afterwards every row of every table is as it was
and nothing reached the SMTP server or the provider API. On PostgreSQL and SQLite."""
from __future__ import annotations

import subprocess
from datetime import datetime, timezone

from alerts.policy.windows import digest_key
from tests.support.e2e_runner import ROOT, RUN_TIMEOUT_SECONDS, dump_database, run_phase, runner_args, runner_env
from tests.support.factories import WINDOW_START, add_delivery, add_digest, add_event, add_pref, add_user

AFTER_THE_WINDOWS = "2026-05-13T00:00:00+00:00"  # the 11 and 12 May Amsterdam days have closed
MAY_11 = datetime(2026, 5, 11, 9, 0, tzinfo=timezone.utc)


def seed_a_busy_database(engine) -> None:
    """Users on every channel and kind; new events (one bad), a queued instant delivery,
    a digest delivery of a closed window not yet in a digest, and a due queued digest."""
    with engine.begin() as conn:
        alice = add_user(conn, email="alice@example.com")
        bob = add_user(conn, email=None, telegram_chat_id="5001")
        carol = add_user(conn, email="carol@example.com")
        dave = add_user(conn, email=None, telegram_chat_id="5002")
        add_pref(conn, alice, channel="email", delivery_kind="instant")
        add_pref(conn, bob, channel="telegram", delivery_kind="instant")
        add_pref(conn, carol, channel="email", delivery_kind="digest")
        add_pref(conn, dave, channel="telegram", delivery_kind="digest")
        add_event(conn, title="Terminal fire at Eemshaven")
        add_event(conn, title="TTF day-ahead +40%", severity=4)
        add_event(conn, title="Bad severity", severity=9)
        earlier = add_event(conn, title="Earlier outage", status="fanned_out")
        add_delivery(conn, alice, earlier)
        yesterday = add_event(conn, title="Yesterday's outage", status="fanned_out", created_at=MAY_11)
        add_delivery(conn, carol, yesterday, delivery_kind="digest")
        add_digest(conn, dave, events=2, channel="telegram",
                   digest_key=digest_key(dave, "telegram", "daily", WINDOW_START))


def test_a_dry_run_of_everything_reports_every_phase_changes_no_row_and_sends_nothing(
        db_url, engine, smtp_server, provider_api):
    seed_a_busy_database(engine)
    env = runner_env(db_url, smtp_server, provider_api)
    before = dump_database(db_url)
    assert before["alembic_version"] and before["user_alert_digests"]

    result = run_phase(env, "all", AFTER_THE_WINDOWS, dry_run=True)

    assert result["a"] == {"accepted": 2, "rejected": 1}
    assert result["b"] == {"events_fanned_out": 2, "deliveries_created": 8}
    # carol: a digest for 12 May (2 new events) and one for 11 May; dave's open digest gains 2.
    assert result["d"] == {"digests_created": 2, "digest_items_attached": 5, "deliveries_marked_batched": 5}
    assert result["c"] == {"instant": {"sent": 5, "retried": 0, "failed": 0, "skipped": 0},
                           "digests": {"sent": 3, "retried": 0, "failed": 0, "skipped": 0}}
    would_send = sorted((w["channel"], w["recipient"], w["summary"]) for w in result["would_send"])
    assert [(channel, recipient) for channel, recipient, _ in would_send] == [
        ("email", "alice@example.com")] * 3 + [("email", "carol@example.com")] * 2 + [
        ("telegram", "5001")] * 2 + [("telegram", "5002")]
    alice_subjects = [summary for _, recipient, summary in would_send if recipient == "alice@example.com"]
    assert sorted(alice_subjects) == ["[EnergyRiskIQ] ELEVATED: Earlier outage",
                                      "[EnergyRiskIQ] ELEVATED: Terminal fire at Eemshaven",
                                      "[EnergyRiskIQ] HIGH: TTF day-ahead +40%"]
    carol_subjects = sorted(summary for _, recipient, summary in would_send if recipient == "carol@example.com")
    assert carol_subjects == ["EnergyRiskIQ daily digest — 2026-05-11 (1 alert)",
                              "EnergyRiskIQ daily digest — 2026-05-12 (2 alerts)"]
    assert "daily digest" in would_send[-1][2]

    assert dump_database(db_url) == before
    assert smtp_server.messages == [] and smtp_server.connections == 0
    assert provider_api.requests == []

    # The plain output says the same, and a second dry run still finds all the work to do.
    text = subprocess.run([a for a in runner_args("all", AFTER_THE_WINDOWS, dry_run=True) if a != "--json"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS)
    assert text.returncode == 0, text.stderr
    assert "[dry run] phase d: digests_created: 2" in text.stdout
    assert text.stdout.count("[dry run] would send") == 8
    assert "[dry run] would send email to carol@example.com: EnergyRiskIQ daily digest" in text.stdout
    assert dump_database(db_url) == before
    assert smtp_server.messages == [] and provider_api.requests == []
