"""A 07:30 digest end to end (docs/policy.md): events in through `alerts ingest`, the runner
as cron runs it, the digest out to the fake SMTP server at 07:30 with the night in it."""
from __future__ import annotations

from alerts.core import tables as m
from alerts.core.db import make_engine
from tests.support.e2e_runner import email_event_ids, event, ingest, plain_part, run_phase, runner_env
from tests.support.factories import add_pref, add_user, rows

# Europe/Amsterdam is UTC+2 in May: 07:30 local is 05:30 UTC.
EVENTS = ["2026-05-12T06:00:00+00:00", "2026-05-12T20:00:00+00:00", "2026-05-13T03:00:00+00:00"]  # 08:00, 22:00, 05:00
NEXT_WINDOW = "2026-05-13T05:45:00+00:00"  # 07:45 on the 13th: tomorrow's digest


def test_a_0730_reader_gets_the_night_at_0730_and_not_a_minute_before(db_url, smtp_server):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        user = add_user(conn, email="ann@example.com", digest_send_time="07:30")
        add_pref(conn, user, channel="email", delivery_kind="digest")
    env = runner_env(db_url, smtp_server)
    assert ingest(env, [event(f"st-{n}", at) for n, at in enumerate(EVENTS + [NEXT_WINDOW])])["stored"] == 4

    early = run_phase(env, "all", "2026-05-13T05:29:00+00:00")  # 07:29
    assert early["d"]["digests_created"] == 2  # this window and the one that began at 07:30 on the 13th
    assert early["c"]["digests"]["sent"] == 0 and smtp_server.messages == []

    assert run_phase(env, "all", "2026-05-13T05:31:00+00:00")["c"]["digests"]["sent"] == 1
    (mail,) = smtp_server.messages
    with engine.connect() as conn:
        events = {e["event_key"]: e["id"] for e in rows(conn, m.alert_events)}
        digests = {g["window_start"].isoformat(): g for g in rows(conn, m.user_alert_digests)}
    engine.dispose()
    assert sorted(email_event_ids(mail)) == sorted(events[f"st-{n}"] for n in range(3))
    assert mail.message["Subject"] == "EnergyRiskIQ daily digest — 2026-05-12 (3 alerts)"
    assert "Tue 12 May 07:30 – Wed 13 May 07:30 Europe/Amsterdam" in plain_part(mail)
    sent = digests["2026-05-12T05:30:00+00:00"]
    assert (sent["status"], sent["digest_key"]) == ("sent", f"{user}:email:daily:2026-05-12T05:30:00Z")
    assert digests["2026-05-13T05:30:00+00:00"]["status"] == "queued"  # due at 07:30 on the 14th
