"""``--max-seconds N`` (docs/deployment.md): after N seconds from the runner's start no new send
starts — the one in progress is finished and recorded, rows claimed but not sent go back
to ``queued`` as they were, later phases are not started, exit 0 with the counts, and
nothing is left in ``sending``."""
from __future__ import annotations

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from alerts.core import tables as m
from alerts.channels.registry import ChannelSet, build_channels
from alerts.cli import cli
from alerts.core.db import Database
from alerts.phases.pipeline import ALL, run_phases
from tests.support.clock import clock_at
from tests.support.factories import add_delivery, add_digest, add_event, add_pref, add_user, rows

SEND_SECONDS = 4  # how long each send takes on the manual clock


class SlowChannel:
    """The real channel; each send takes SEND_SECONDS of the run's (manual) clock."""

    def __init__(self, channel, clock):
        self.channel, self.clock = channel, clock

    def send(self, recipient, message):
        self.channel.send(recipient, message)
        self.clock.advance(SEND_SECONDS)

    def close(self):
        self.channel.close()


def slow_email(settings, clock) -> ChannelSet:
    real = build_channels(settings)
    return ChannelSet(channels={"email": SlowChannel(real.get("email"), clock)}, unconfigured=real.unconfigured)


def seed_due(engine, now, deliveries: int) -> tuple[list[int], int]:
    """``deliveries`` due instant emails (the last one a retry with an earlier attempt and
    error) and one due digest."""
    with engine.begin() as conn:
        user = add_user(conn, email="reader@example.com")
        ids = [add_delivery(conn, user, add_event(conn, status="fanned_out")) for _ in range(deliveries - 1)]
        ids.append(add_delivery(conn, user, add_event(conn, status="fanned_out"), attempts=2,
                                last_error="smtp 451 try later", next_retry_at=now - timedelta(minutes=1)))
        digest = add_digest(conn, user, next_retry_at=now - timedelta(minutes=1))
    return ids, digest


def test_no_send_starts_after_the_limit_and_unsent_claims_go_back_as_they_were(engine, live_settings, now,
                                                                                 smtp_server):
    ids, digest = seed_due(engine, now, deliveries=5)
    with engine.connect() as conn:
        before = {row["id"]: row for row in rows(conn, m.user_alert_deliveries)}
    clock = clock_at(now)
    clock.limit_seconds = 10  # sends start at 0, 4 and 8 s; the one at 12 s does not

    channels = slow_email(live_settings, clock)
    results = run_phases(Database(engine), ALL, clock, live_settings, channels)

    assert results["c"]["instant"] == {"sent": 3, "retried": 0, "failed": 0, "skipped": 0}
    assert results["c"]["digests"] == {"sent": 0, "retried": 0, "failed": 0, "skipped": 0}
    assert len(smtp_server.messages) == 3
    with engine.connect() as conn:
        after = {row["id"]: row for row in rows(conn, m.user_alert_deliveries)}
        digest_row = conn.execute(sa.select(m.user_alert_digests).where(m.user_alert_digests.c.id == digest)).one()
    assert [after[i]["status"] for i in ids] == ["sent"] * 3 + ["queued"] * 2
    for row_id in ids[3:]:
        assert after[row_id] == before[row_id], "given back exactly as it was: no attempt counted"
    assert after[ids[-1]]["attempts"] == 2
    assert (digest_row.status, digest_row.attempts, digest_row.claimed_at) == ("queued", 0, None)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(m.user_alert_deliveries)
                            .where(m.user_alert_deliveries.c.status == m.SENDING)).scalar() == 0


def test_the_next_run_sends_what_the_limited_run_gave_back(engine, live_settings, now, smtp_server):
    ids, _ = seed_due(engine, now, deliveries=3)
    clock = clock_at(now)
    clock.limit_seconds = 1  # only the first send starts
    run_phases(Database(engine), ("c",), clock, live_settings, slow_email(live_settings, clock))
    assert len(smtp_server.messages) == 1

    later = clock_at(now + timedelta(minutes=5))
    results = run_phases(Database(engine), ("c",), later, live_settings, slow_email(live_settings, later))
    assert results["c"]["instant"]["sent"] == 2 and results["c"]["digests"]["sent"] == 1
    assert sorted(mail.message["To"] for mail in smtp_server.messages) == ["reader@example.com"] * 4


def test_phases_after_the_limit_are_not_started(engine, live_settings, now, smtp_server):
    with engine.begin() as conn:
        add_pref(conn, add_user(conn, email="reader@example.com"))
        add_event(conn)
    clock = clock_at(now).advance(30)
    clock.limit_seconds = 30
    results = run_phases(Database(engine), ALL, clock, live_settings, slow_email(live_settings, clock))
    assert results == {name: {"not_started": True} for name in ALL}
    with engine.connect() as conn:
        assert [row["status"] for row in rows(conn, m.alert_events)] == ["new"]
    assert smtp_server.messages == []


def test_without_a_limit_the_clock_is_never_out_of_time(now):
    assert not clock_at(now).advance(10 ** 9).out_of_time()


# --- the command ----------------------------------------------------------------------------

def invoke(db_url, settings, smtp_server, *args):
    env = {"DATABASE_URL": db_url, "ALERTS_SMTP_HOST": smtp_server.host, "ALERTS_SMTP_PORT": str(smtp_server.port),
           "ALERTS_SMTP_TLS": "none", "ALERTS_OUTBOX_DIR": settings.outbox_dir}
    return CliRunner().invoke(cli, ["run", *args], env=env, catch_exceptions=False)


def test_the_runner_stops_sending_at_max_seconds_and_exits_0_with_counts(db_url, engine, settings, smtp_server):
    """A slow SMTP server (0.5 s per message) and 10 due emails: a 2 s budget sends some."""
    with engine.begin() as conn:
        user = add_user(conn, email="reader@example.com")
        for _ in range(10):
            add_delivery(conn, user, add_event(conn, status="fanned_out"))
    smtp_server.data_delay = 0.5

    result = invoke(db_url, settings, smtp_server, "--phase", "all", "--max-seconds", "2", "--json")

    assert result.exit_code == 0, result.output + result.stderr
    sent = json.loads(result.stdout)["c"]["instant"]["sent"]
    assert 1 <= sent < 10
    assert len(smtp_server.messages) == sent
    with engine.connect() as conn:
        statuses = [(row["status"], row["attempts"]) for row in rows(conn, m.user_alert_deliveries)]
    assert statuses.count(("sent", 1)) == sent
    assert statuses.count(("queued", 0)) == 10 - sent, "nothing left in sending, no attempt counted"


@pytest.mark.parametrize("bad", ["0", "-1", "1.5", "soon"])
def test_a_bad_max_seconds_exits_2_naming_it(db_url, settings, smtp_server, bad):
    result = invoke(db_url, settings, smtp_server, "--max-seconds", bad)
    assert result.exit_code == 2
    assert "--max-seconds" in result.stderr
    assert smtp_server.messages == []
